"""Two workers on the ``gpu`` queue share it: every job answered once, by one or the other."""

from __future__ import annotations

import socket
from collections import Counter

import pytest
from celery.result import AsyncResult
from conftest import png_bytes

from glyphq.celeryconfig import settings
from glyphq.producer import submit
from glyphq.producer.store import Store
from glyphq.tasks.app import app

JOBS = 20


@pytest.fixture(autouse=True)
def _empty_queue(redis_client) -> None:
    """Start with nothing queued, so the two workers share this test's jobs only."""
    keys = [k for k in redis_client.keys("glyphq:gpu*") if redis_client.type(k) == b"list"]
    if keys:
        redis_client.delete(*keys)


def test_two_workers_share_the_queue_and_no_job_runs_twice(start_worker, endless_model, monkeypatch):
    # Two workers on two cores: one torch thread each, as one worker per GPU would have one GPU each.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # A worker reserves up to two batches of GLYPHQ_MAX_BATCH jobs; small batches let 20 jobs spread
    # over both.
    workers = [start_worker(wait=False, model=endless_model, max_batch=4) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    host = socket.gethostname()
    names = {w.name.replace("%h", host): w for w in workers}
    assert len(names) == 2
    children = {name: set(w.children()) for name, w in names.items()}

    jobs = [submit(png_bytes(seed=200 + i), f"Page {i}?", max_new_tokens=60) for i in range(JOBS)]
    results = [job.result(timeout=120) for job in jobs]

    assert [r["job_id"] for r in results] == [j.id for j in jobs]
    assert all(r["answer"] and r["tokens_out"] == 60 for r in results)
    # Which worker answered: Celery's result meta names the node (result_extended), and the pid in
    # glyphq's result is a child of that node's process.
    served_by = {}
    for job, result in zip(jobs, results, strict=True):
        node = AsyncResult(job.id, app=app).worker
        assert node in names, f"job {job.id} answered by {node!r}, not one of {sorted(names)}"
        assert result["worker"]["pid"] in children[node] | set(names[node].children())
        served_by[job.id] = node
    spread = Counter(served_by.values())
    assert set(spread) == set(names), f"one worker took every job: {dict(spread)}"
    assert min(spread.values()) >= 3, f"jobs barely spread: {dict(spread)}"
    store = Store(settings)
    assert [store.runs(j.id) for j in jobs] == [1] * JOBS, "a job ran more than once"
    assert all(w.proc.poll() is None for w in workers)
