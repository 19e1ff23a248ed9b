"""Two workers on the ``gpu`` queue share it: every job answered once, by one or the other, and the turns
of one session one after the other."""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter

import pytest
from celery.result import AsyncResult
from conftest import _worker_starter, png_bytes

from glyphq.celeryconfig import settings
from glyphq.producer import submit
from glyphq.producer.store import Store, session_key, session_lock_key
from glyphq.tasks.app import app
from glyphq.worker.runtime import SESSION_LOCK_MARGIN_S

JOBS = 20
#: Pairs of turns submitted together until one pair has gone to both workers.
SESSION_ROUNDS = 4


@pytest.fixture(autouse=True)
def _empty_queue(redis_client) -> None:
    """Start with nothing queued, so the two workers share this test's jobs only."""
    keys = [k for k in redis_client.keys("glyphq:gpu*") if redis_client.type(k) == b"list"]
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(scope="class")
def two_workers(tmp_path_factory, tiny_model, endless_model, redis_url):
    """Two GPU workers at the same settings, shared by the tests of a class, stopped after them."""
    started: list = []
    start = _worker_starter(tmp_path_factory.mktemp("two-workers"), tiny_model, redis_url, started)
    try:
        # Two workers on two cores: one torch thread each, as one worker per GPU would have one GPU each.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OMP_NUM_THREADS", "1")
            # A worker reserves up to two batches of GLYPHQ_MAX_BATCH jobs; small batches let 20 jobs
            # spread over both.
            workers = [start(wait=False, model=endless_model, max_batch=4) for _ in range(2)]
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in started:
            worker.stop_soon()


class TestTwoWorkers:
    def test_two_workers_share_the_queue_and_no_job_runs_twice(self, two_workers):
        workers = two_workers
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

    def test_turns_of_one_session_never_run_side_by_side(self, two_workers, redis_client):
        """Two turns of one session submitted together: the one that starts second sees the first's answer,
        whichever worker each goes to, and the session's lock, held meanwhile by one turn, is gone after."""
        names = {w.name for w in two_workers}
        crossed = False
        for round_ in range(SESSION_ROUNDS):
            session = f"two-workers-{round_}-{uuid.uuid4().hex[:6]}"
            lock = session_lock_key(session)
            jobs = [submit(png_bytes(seed=300 + i), f"Turn {i}?", session=session, max_new_tokens=40)
                    for i in range(2)]
            holders: set[bytes] = set()
            ttls: set[int] = set()
            while not all(job.ready() for job in jobs):
                holder, ttl = redis_client.get(lock), redis_client.ttl(lock)
                if holder is not None and ttl > 0:
                    holders.add(holder)
                    ttls.add(ttl)
                time.sleep(0.01)
            results = [job.result(timeout=120) for job in jobs]

            used = sorted(result["session"]["turns_used"] for result in results)
            assert used == [0, 1], f"round {round_}: turns used {used}: the two turns ran side by side"
            assert redis_client.llen(session_key(session)) == 2
            assert holders <= {job.id.encode() for job in jobs}, f"the lock named another job: {holders}"
            assert holders, "no turn held the session's lock while it ran"
            assert all(settings.time_limit_s < ttl <= settings.time_limit_s + SESSION_LOCK_MARGIN_S
                       for ttl in ttls), f"lock TTLs {ttls} do not cover the hard time limit"
            assert not redis_client.exists(lock), "the lock outlived the session's turns"
            nodes = {AsyncResult(job.id, app=app).worker for job in jobs}
            assert nodes <= names
            if len(nodes) == 2:
                crossed = True
                break
        assert crossed, f"in {SESSION_ROUNDS} rounds both turns went to one worker: nothing crossed workers"
        assert all(w.proc.poll() is None for w in two_workers)
