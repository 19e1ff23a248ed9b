"""``glyphq health``: the broker, a worker that answers on the queue, and (queue gpu) its loaded model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, RedisServer, free_port

from glyphq.worker.blocks import BLOCK_TOKENS
from glyphq.worker.paged import CPU_POOL_TOKENS

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))


def health(*args: str, broker_url: str | None = None) -> tuple[int, dict, float]:
    """Run ``glyphq health ARGS``: (exit code, the JSON report, seconds it took)."""
    env = dict(os.environ)
    if broker_url:
        env["GLYPHQ_BROKER_URL"] = broker_url
    start = time.monotonic()
    out = subprocess.run([GLYPHQ, "health", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise AssertionError(f"not JSON: {out.stdout!r}\nstderr: {out.stderr}") from None
    return out.returncode, report, elapsed


def node_name(worker) -> str:
    return worker.name.replace("%h", socket.gethostname())


def test_no_worker_exits_1_naming_the_worker_check():
    code, report, _ = health("--timeout", "1")
    assert code == 1, report
    assert report["ok"] is False
    assert report["checks"]["broker"]["ok"] is True
    assert report["checks"]["worker"]["ok"] is False
    assert "no worker consumes queue 'gpu'" in report["checks"]["worker"]["detail"]
    assert report["checks"]["model"]["ok"] is None  # not reached
    assert report["error"].startswith("worker:")

    code, report, _ = health("--broker-only")  # what Flower's container checks
    assert code == 0, report
    assert report["checks"]["broker"]["ok"] is True and report["checks"]["worker"]["ok"] is None


def test_broker_unreachable_exits_4_within_seconds():
    closed = f"redis://127.0.0.1:{free_port()}/0"
    code, report, elapsed = health("--timeout", "2", broker_url=closed)
    assert code == 4, report
    assert report["checks"]["broker"]["ok"] is False
    assert report["checks"]["worker"]["ok"] is None and report["checks"]["model"]["ok"] is None
    assert report["error"].startswith("broker: cannot reach Redis at 127.0.0.1:")
    assert elapsed < 15, f"took {elapsed:.1f} s"
    code, report, _ = health("--broker-only", broker_url=closed)
    assert code == 4 and report["checks"]["broker"]["ok"] is False, report


def test_hung_broker_exits_4_within_seconds(tmp_path):
    """A Redis that accepts connections but never answers (SIGSTOP) must not hang the probe either."""
    server = RedisServer(tmp_path)
    server.start()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        code, report, elapsed = health("--timeout", "1", broker_url=server.url)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert code == 4, report
    assert report["checks"]["broker"]["ok"] is False
    assert "no answer to PING" in report["checks"]["broker"]["detail"]
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_gpu_worker_with_its_model_loaded_exits_0(start_worker, tiny_model):
    worker = start_worker()
    name = node_name(worker)
    code, report, _ = health("--timeout", "2")
    assert code == 0, report
    assert report["ok"] is True and report["error"] is None
    # GLYPHQ_METRICS_PORT=0 in the tests' workers: no /metrics, so no port.
    assert report["checks"]["worker"] == {"ok": True, "workers": [name], "metrics_ports": {name: None}}
    model = report["checks"]["model"]
    assert model["ok"] is True and model["loaded_on"] == [name]
    assert model["workers"][name]["model"] == str(tiny_model)
    assert model["workers"][name]["model_loaded"] is True
    assert model["workers"][name]["device"] == "cpu"
    # The KV cache pool: on the CPU a fixed token count, idle now.
    pool = model["workers"][name]["pool"]
    assert pool["tokens"] == CPU_POOL_TOKENS and pool["blocks"] == CPU_POOL_TOKENS // BLOCK_TOKENS, pool
    assert pool["blocks_used"] == 0 and pool["blocks_free"] == pool["blocks"] and pool["preemptions"] == 0, pool
    assert pool["bytes"] > 0 and pool["successor_fits"] is True, pool
    # Its caches of pages read before: empty after the warm-up, sized beside the pool.
    assert pool["prefix"] == {"enabled": True, "blocks": 0, "tokens": 0, "hits": 0, "misses": 0, "evictions": 0}, pool
    assert pool["encoder"]["pages"] == 0 and 0 < pool["encoder"]["max_bytes"] <= pool["bytes"] // 16, pool

    # --node checks that one worker only: this one passes, a node that does not exist fails.
    code, report, _ = health("--node", name, "--timeout", "2")
    assert code == 0, report
    code, report, _ = health("--node", "nosuchworker@nowhere", "--timeout", "1")
    assert code == 1 and report["checks"]["worker"]["ok"] is False, report

    # The gpu worker does not serve the render queue.
    code, report, _ = health("--queue", "render", "--timeout", "1")
    assert code == 1 and report["checks"]["worker"]["ok"] is False, report


def test_render_worker_exits_0_for_queue_render_without_a_model_check(start_worker):
    worker = start_worker(queues="render", concurrency=1)
    code, report, _ = health("--queue", "render", "--timeout", "2")
    assert code == 0, report
    assert report["checks"]["worker"]["workers"] == [node_name(worker)]
    assert report["checks"]["model"]["ok"] is None
    assert "loads no model" in report["checks"]["model"]["skipped"]

    # Nothing serves the gpu queue, though a worker answers on render.
    code, report, _ = health("--queue", "gpu", "--timeout", "1")
    assert code == 1, report
    assert report["checks"]["worker"]["ok"] is False
    assert report["checks"]["worker"]["workers_seen"] == {node_name(worker): ["render"]}
