"""Redis at its memory limit, Redis that evicts, and Redis that lost its data: glyphq fails loudly,
leaves nothing half-done, and never waits on a job that no longer exists."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, WorkerProcess, png_bytes, queued_messages, wait_until
from PIL import Image
from test_gateway import Gateway

from faults.helpers import ready_worker, tail
from glyphq.tasks.signals import EXIT_EVICTING_REDIS

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))
#: Random pixels, so the PNG is about 270 KB: a few dozen fill a Redis of a few MB.
BIG = {"size": [300, 300], "noise": True}
#: A worker needs room in Redis to take, ack and answer jobs: its connections' buffers and each blob it
#: reads count against maxmemory. At this test's 16 MB, half of it; in production 10% of gigabytes.
RESERVE = {"GLYPHQ_REDIS_RESERVE_PCT": "50"}


def _noise_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def worker_on(server, tiny_model: Path, log: Path) -> WorkerProcess:
    env = {**os.environ, "GLYPHQ_BROKER_URL": server.url, "GLYPHQ_MODEL": str(tiny_model),
           "GLYPHQ_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"}
    return WorkerProcess(env, log)


@contextlib.contextmanager
def batch_of(server, folder: Path, lines: int) -> Iterator[subprocess.Popen[str]]:
    """``glyphq batch`` of ``lines`` small jobs against ``server``, in the background; killed if it has not
    finished by the end. Its results go to ``folder/results.jsonl``."""
    (folder / "page.png").write_bytes(png_bytes(seed=7))
    jobs = folder / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"image": "page.png", "question": f"Line {i}?", "max_new_tokens": 3}) + "\n"
                            for i in range(lines)))
    env = {**os.environ, "GLYPHQ_BROKER_URL": server.url, **RESERVE}
    batch = subprocess.Popen([GLYPHQ, "batch", str(jobs), "--out", str(folder / "results.jsonl"), "--no-progress"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield batch
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.communicate()


def glyphq(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GLYPHQ_BROKER_URL": server.url, **RESERVE}
    return subprocess.run([GLYPHQ, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def fill(producer, limit: int = 400) -> tuple[list[str], dict]:
    """Submit big jobs until one is refused; (accepted job ids, the refusal)."""
    accepted = []
    for i in range(limit):
        reply = producer.call("submit", job_id=f"fill-{i}", **BIG)
        if not reply["ok"]:
            return accepted, reply
        accepted.append(reply["job_id"])
    raise AssertionError(f"{limit} jobs of about 90 KB fitted; Redis never filled up")


def test_submits_stop_short_of_maxmemory_and_a_worker_then_drains_the_backlog(
        fault_redis, producer_process, tiny_model, tmp_path):
    server = fault_redis(appendonly=False, maxmemory="16mb", maxmemory_policy="noeviction")
    producer = producer_process(broker_url=server.url, redis_reserve_pct=50)
    accepted, refusal = fill(producer)
    assert refusal["error_type"] == "BrokerFull", refusal
    assert "GLYPHQ_REDIS_RESERVE_PCT" in refusal["message"]
    client = server.client()
    assert not client.exists(f"glyphq:job:fill-{len(accepted)}")  # the refused job left no claim behind
    assert len(queued_messages(client)) == len(accepted) >= 10
    assert client.info("memory")["used_memory"] < 16 * 2**20 * 0.55

    # Redis frees a client's buffers a little later, so a job or two more may fit before the refusal.
    big = tmp_path / "big.png"
    big.write_bytes(_noise_png(300, 300))
    codes = [glyphq(server, "submit", str(big), "Full?") for _ in range(4)]
    refused = [c for c in codes if c.returncode != 0]
    assert refused and refused[0].returncode == 6, [(c.returncode, c.stderr) for c in codes]
    assert "maxmemory" in refused[0].stderr
    accepted += [json.loads(c.stdout)["job_id"] for c in codes if c.returncode == 0]
    # The gateway answers 503 with a Retry-After and OpenAI's error shape, not a 500.
    image = "data:image/png;base64," + base64.b64encode(big.read_bytes()).decode()
    job = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                     {"type": "text", "text": "Full?"}]}]}
    gateway = Gateway(tmp_path / "serve.log", broker_url=server.url, **{k[7:].lower(): v for k, v in RESERVE.items()})
    try:
        posts = [httpx.post(f"{gateway.url}/v1/jobs", json=job, timeout=30) for _ in range(4)]
    finally:
        gateway.stop()
    full = [r for r in posts if r.status_code != 202]
    assert full and full[0].status_code == 503, [(r.status_code, r.text) for r in posts]
    assert full[0].json()["error"]["code"] == "broker_full" and full[0].headers["Retry-After"] == "30"
    accepted += [r.json()["id"] for r in posts if r.status_code == 202]

    # A batch started now backs off on BrokerFull, and finishes once a worker has drained the queue.
    with batch_of(server, tmp_path, 4) as batch:
        time.sleep(3)
        assert batch.poll() is None, batch.communicate()
        assert not (tmp_path / "results.jsonl").exists() or (tmp_path / "results.jsonl").read_text() == ""
        with ready_worker(server.url, tiny_model, tmp_path / "worker.log") as worker:
            for job_id in accepted:
                reply = producer.call("result", job_id=job_id, timeout=120, wait=150)
                assert reply["ok"], (reply, tail(worker))
            stdout, stderr = batch.communicate(timeout=120)
    assert batch.returncode == 0, (stdout, stderr)
    assert json.loads(stdout)["done"] == 4
    assert "waiting" in stderr  # it said why it paused
    assert producer.call("submit", job_id="after-drain", **BIG)["ok"]


def test_a_write_refused_by_a_full_redis_takes_back_the_claim_and_the_blob(fault_redis, producer_process):
    server = fault_redis(appendonly=False, maxmemory="4mb", maxmemory_policy="noeviction")
    producer = producer_process(broker_url=server.url, redis_reserve_pct=0)  # run into Redis's own refusal
    accepted, refusal = fill(producer)
    assert refusal["error_type"] == "BrokerFull", refusal
    assert "maxmemory" in refusal["message"]
    refused = f"fill-{len(accepted)}"
    client = server.client()
    assert not client.exists(f"glyphq:job:{refused}")
    assert not any(client.sismember(key, refused) for key in client.scan_iter("glyphq:blob:*:refs"))

    client.config_set("maxmemory", "0")
    assert producer.call("submit", job_id=refused, **BIG)["ok"]  # the same id runs: no phantom claim
    assert len(queued_messages(client)) == len(accepted) + 1


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_a_redis_that_evicts_keys_is_refused_by_the_worker_and_by_health(fault_redis, tiny_model, tmp_path, policy):
    server = fault_redis(appendonly=False, maxmemory="64mb", maxmemory_policy=policy)
    health = glyphq(server, "health", "--broker-only")
    assert health.returncode == 1, health.stdout
    broker = json.loads(health.stdout)["checks"]["broker"]
    assert broker["ok"] is False and broker["maxmemory_policy"] == policy
    assert "noeviction" in broker["detail"]

    if policy == "allkeys-lru":  # one worker start is enough to show the refusal
        worker = worker_on(server, tiny_model, tmp_path / "worker.log")
        try:
            assert worker.proc.wait(90) == EXIT_EVICTING_REDIS, tail(worker)
            assert f"maxmemory-policy is {policy}" in worker.log()
        finally:
            worker.stop()
        allowed = subprocess.run([GLYPHQ, "health", "--broker-only"], cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "GLYPHQ_BROKER_URL": server.url, "GLYPHQ_ALLOW_EVICTION": "on"})
        assert allowed.returncode == 0, allowed.stdout

    # No worker would ever run a job here, so submit refuses it instead of leaving it PENDING for good.
    image = tmp_path / "page.png"
    image.write_bytes(png_bytes(seed=90))
    refused = glyphq(server, "submit", str(image), "Anyone there?")
    assert refused.returncode == 4, (refused.stdout, refused.stderr)
    error = json.loads(refused.stdout)
    assert error["error_type"] == "BrokerEvicts" and f"maxmemory-policy {policy}" in error["error"]
    assert "GLYPHQ_ALLOW_EVICTION=on" in error["error"] and refused.stderr.startswith("glyphq submit: ")
    client = server.client()
    assert not queued_messages(client) and not list(client.scan_iter("glyphq:blob:*")), "nothing enqueued"

    # The policy comes from the INFO memory reply each submit reads for its memory check: no extra command.
    client.config_resetstat()
    env = {**os.environ, "GLYPHQ_BROKER_URL": server.url, "GLYPHQ_ALLOW_EVICTION": "on"}
    for n in range(3):
        queued = subprocess.run([GLYPHQ, "submit", str(image), f"Question {n}?"], cwd=ROOT, capture_output=True,
                                text=True, env=env, timeout=60)
        assert queued.returncode == 0, (queued.stdout, queued.stderr)
    assert client.info("commandstats")["cmdstat_info"]["calls"] == 3
    assert len(queued_messages(client)) == 3


def test_jobs_lost_with_redis_data_resolve_to_unknown_and_result_raises(fault_redis, producer_process, tiny_model,
                                                                        tmp_path):
    server = fault_redis(appendonly=False)  # no persistence: a crash loses everything
    producer = producer_process(broker_url=server.url)
    lost = producer.submit(seed=1)
    assert producer.call("state", job_id=lost)["state"] == "PENDING"

    with batch_of(server, tmp_path, 3) as batch:
        client = server.client()
        assert wait_until(lambda: len(queued_messages(client)) == 4, timeout=30)
        server.restart()  # kill -9 and start empty
        client = server.client()

        assert producer.call("state", job_id=lost)["state"] == "UNKNOWN"
        reply = producer.call("result", job_id=lost, timeout=None, wait=60)
        assert reply["error_type"] == "JobLost", reply
        assert reply["elapsed"] < 20
        cli = glyphq(server, "result", lost)
        assert cli.returncode == 7, (cli.stdout, cli.stderr)
        assert json.loads(cli.stdout)["state"] == "UNKNOWN"

        # The batch notices its jobs are gone and submits them again; a worker then answers them.
        assert wait_until(lambda: len(queued_messages(client)) == 3, timeout=40)
        with ready_worker(server.url, tiny_model, tmp_path / "worker.log"):
            stdout, stderr = batch.communicate(timeout=120)
    assert batch.returncode == 0, (stdout, stderr)
    assert json.loads(stdout)["done"] == 3
    assert "submitting it again" in stderr
