"""What an operator scrapes: a port per worker, every series from the start, the shipped dashboard's series.

A GPU worker and a render worker start on one host with the same ``GLYPHQ_METRICS_PORT``, as the demo
and a small deployment do; each is scraped over HTTP before it has run a single job.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port

from glyphq.tasks.app import app
from glyphq.worker.metrics import JOB_STATES, QUEUE_DEPTH_LEASE_KEY, RECYCLE_REASONS, TASKS

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SCRAPE_EXAMPLE = ROOT / "deploy" / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are both free now."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _dashboard_selectors() -> list[tuple[str, dict[str, str]]]:
    """(metric name, its equality matchers) for every glyphq series a dashboard panel queries."""
    selectors = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            for name, _, matchers in re.findall(r"\b(glyphq_\w+)(\{([^}]*)\})?", target["expr"]):
                selectors.append((name, dict(re.findall(r'(\w+)="([^"]*)"', matchers))))
    return selectors


def _listening_on(pid: int, port: int) -> list[str]:
    """The addresses process ``pid`` listens on at ``port``."""
    import psutil

    return [c.laddr.ip for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _stats_section(node: str) -> dict:
    """The worker's glyphq stats section; asked of that worker alone, so the reply ends the wait."""
    replies = app.control.inspect(destination=[node], timeout=5).stats() or {}
    (reply,) = replies.values()
    return reply["glyphq"]


def _health(queue: str, node: str) -> dict:
    glyphq = Path(sys.executable).with_name("glyphq")
    done = subprocess.run([str(glyphq), "health", "--queue", queue, "--node", node, "--timeout", "5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_workers_on_one_host_each_serve_every_series_from_the_start(start_worker, redis_client):
    redis_client.delete(QUEUE_DEPTH_LEASE_KEY)  # an earlier test's worker may still hold it
    base = _two_free_ports()
    gpu = start_worker(metrics_port=base)
    # The same port setting: it takes the next port. It listens on every address, as asked.
    render = start_worker(queues="render", metrics_port=base, metrics_host="0.0.0.0")

    ports = {}
    for worker, queue in ((gpu, "gpu"), (render, "render")):
        ports[queue] = _stats_section(worker.name)["metrics_port"]
        health = _health(queue, worker.name.replace("%h", socket.gethostname()))
        assert list(health["checks"]["worker"]["metrics_ports"].values()) == [ports[queue]], health
    assert ports == {"gpu": base, "render": base + 1}
    # /metrics has no login: on localhost only, unless GLYPHQ_METRICS_HOST widens it.
    assert _listening_on(gpu.proc.pid, base) == ["127.0.0.1"]
    assert _listening_on(render.proc.pid, base + 1) == ["0.0.0.0"]

    scraped = {queue: _scrape(port) for queue, port in ports.items()}
    # The KV cache pool of the gpu worker's child (loaded: the worker is ready); none on the render worker.
    pool = _stats_section(gpu.name)["pool"]
    assert pool["tokens"] > 0 and pool["blocks_used"] == 0 and pool["preemptions"] == 0, pool
    expected_pool = {"gpu": (pool["tokens"], 0, pool["blocks_free"]), "render": (0, 0, 0)}
    assert _stats_section(render.name)["pool"] is None
    for queue, text in scraped.items():
        samples = _samples(text)
        for task in TASKS:
            for state in JOB_STATES:
                assert ({"task": task, "state": state}, 0.0) in samples["glyphq_jobs_total"], (queue, task, state)
        assert sorted(labels["reason"] for labels, value in samples["glyphq_recycles_total"] if value == 0) == \
            sorted(RECYCLE_REASONS)
        for name in ("glyphq_queue_wait_seconds", "glyphq_preprocess_seconds", "glyphq_generate_seconds",
                     "glyphq_batch_size"):
            assert samples[f"{name}_count"] == [({}, 0.0)], (queue, name)
        for name in ("glyphq_generated_tokens_total", "glyphq_gpu_memory_allocated_bytes",
                     "glyphq_gpu_memory_reserved_bytes", "glyphq_kv_preemptions_total"):
            assert samples[name] == [({}, 0.0)], (queue, name)
        assert tuple(samples[name][0][1] for name in ("glyphq_kv_pool_tokens", "glyphq_kv_pool_blocks_used",
                                                      "glyphq_kv_pool_blocks_free")) == expected_pool[queue], queue

    # The queue depth comes from one of the two, the other leaves it out: a sum counts each job once.
    exporting = [queue for queue, text in scraped.items() if "glyphq_queue_depth" in _samples(text)]
    assert len(exporting) == 1, exporting
    depth = _samples(scraped[exporting[0]])["glyphq_queue_depth"]
    assert sorted(labels["queue"] for labels, _ in depth) == ["gpu", "render"]
    assert redis_client.get(QUEUE_DEPTH_LEASE_KEY).decode().split(":")[1] == str(ports[exporting[0]])

    # Every series the shipped dashboard queries is there, with the label values it selects.
    everything: dict[str, list] = {}
    for text in scraped.values():
        for name, found in _samples(text).items():
            everything.setdefault(name, []).extend(found)
    selectors = _dashboard_selectors()
    assert len(selectors) >= 10
    for name, matchers in selectors:
        assert any(matchers.items() <= labels.items() for labels, _ in everything.get(name, [])), (name, matchers)

    if PROMTOOL is not None:
        for queue, text in scraped.items():
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                                  timeout=30)
            assert lint.returncode == 0 and not lint.stdout.strip(), (queue, lint.stdout, lint.stderr)

    # A worker that stops hands the lease back, so the other one exports the depth at its next scrape.
    (gpu if exporting == ["gpu"] else render).stop()
    other = "render" if exporting == ["gpu"] else "gpu"
    assert "glyphq_queue_depth" in _samples(_scrape(ports[other]))


@needs_promtool
def test_dashboard_queries_and_scrape_example_are_valid(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel{i}",
         "expr": target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".+")}
        for i, target in enumerate(t for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])
    ]}]}
    rules_path = tmp_path / "dashboard-rules.yml"
    rules_path.write_text(json.dumps(rules))  # JSON is YAML
    checked = subprocess.run([PROMTOOL, "check", "rules", str(rules_path)], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in checked.stdout
    config = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE_EXAMPLE)], capture_output=True, text=True,
                            timeout=30)
    assert config.returncode == 0, config.stdout + config.stderr
