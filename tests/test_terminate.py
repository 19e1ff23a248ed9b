"""``celery revoke --terminate`` of a GPU job ends that job alone: the child and the jobs beside it live on.

A real redis-server, a real worker subprocess (four slots) and the tiny model that never ends a turn,
so each long job decodes for seconds beside the others. A revoked job must be REVOKED, acknowledged
and rid of its blob while the others run, and the child must live on.
"""

from __future__ import annotations

import pytest
from conftest import wait_until
from faults.helpers import (
    endless_worker_settings,
    only_child,
    pending_task_ids,
    runs,
    submit_long,
    submit_short,
    tail,
    wait_started,
)

from glyphq.tasks.app import app

SLOTS = 4
#: New tokens of a job that must end on its own: seconds of decoding, so a revoke lands while it runs.
TOKENS = 2000


def _start(start_class_worker, endless_model, **settings):
    app.control.purge()  # nothing another module left queued joins the batches
    return start_class_worker(**endless_worker_settings(endless_model, max_batch=SLOTS, **settings))


@pytest.fixture(scope="class")
def worker(start_class_worker, endless_model):
    return _start(start_class_worker, endless_model)


def _holds_a_blob(client, job_id: str) -> bool:
    """Whether ``job_id`` still holds a reference to any image blob."""
    return any(client.sismember(key, job_id) for key in client.keys("glyphq:blob:*:refs"))


def _ended(client, job) -> bool:
    """Whether ``job`` is REVOKED, its message acknowledged and its blob released.

    For a job that has not started, Celery's revoke control stores REVOKED itself; the rest is the worker's.
    """
    return job.state == "REVOKED" and job.id not in pending_task_ids(client) and not _holds_a_blob(client, job.id)


class TestTerminate:
    def test_terminate_drops_one_running_job_and_the_others_decode_on(self, worker, redis_client):
        jobs = [submit_long(seed=2100 + i, tokens=TOKENS) for i in range(3)]
        for job in jobs:
            wait_started(redis_client, job)
        child = only_child(worker)
        revoked, others = jobs[0], jobs[1:]
        assert _holds_a_blob(redis_client, revoked.id)

        app.control.revoke(revoked.id, terminate=True)
        assert wait_until(lambda: _ended(redis_client, revoked), 15), f"state {revoked.state}\n{tail(worker)}"
        assert not any(job.ready() for job in others), "the revoke waited for the jobs beside it"

        results = [job.result(timeout=180) for job in others]
        assert [r["tokens_out"] for r in results] == [TOKENS] * 2
        assert {r["worker"]["pid"] for r in results} == {child}, "the child was killed"
        assert all(r["worker"]["batch_size"] <= 2 for r in results), "the revoked row kept decoding"
        assert [runs(redis_client, job.id) for job in jobs] == [1, 1, 1]
        assert only_child(worker) == child
        assert _ended(redis_client, revoked)
        log = worker.log()
        assert f"glyphq.answer[{revoked.id}] revoked: its row left the running batch" in log, tail(worker)
        assert "WorkerLostError" not in log, tail(worker)

    def test_terminate_of_a_job_waiting_in_the_child_ends_it_before_it_runs(self, worker, redis_client):
        running = [submit_long(seed=2200 + i) for i in range(SLOTS)]
        for job in running:
            wait_started(redis_client, job)
        waiting = submit_long(seed=2210)  # every slot is taken: it waits in the child for one
        child = only_child(worker)
        assert wait_until(lambda: f"glyphq.answer[{waiting.id}] received" in worker.log(), 15), tail(worker)

        app.control.revoke(waiting.id, terminate=True)
        assert wait_until(lambda: _ended(redis_client, waiting), 15), f"state {waiting.state}\n{tail(worker)}"
        assert not any(job.ready() for job in running)
        assert runs(redis_client, waiting.id) == 0, "a revoked job that waited was started"
        assert f"glyphq.answer[{waiting.id}] revoked before it started" in worker.log(), tail(worker)

        # The four running jobs are ended the same way, together; the child lives on and answers the next job.
        app.control.revoke([job.id for job in running], terminate=True)
        assert wait_until(lambda: all(_ended(redis_client, job) for job in running), 15), tail(worker)
        after = submit_short(seed=2220).result(timeout=60)
        assert after["worker"]["pid"] == child
        assert only_child(worker) == child
        assert [runs(redis_client, job.id) for job in running] == [1] * SLOTS
        assert "WorkerLostError" not in worker.log(), tail(worker)


    def test_a_plain_revoke_drops_a_job_waiting_in_the_child(self, worker, redis_client):
        """Without terminate, Celery discards a reserved job when it would run it; the child holds such
        a job while it waits for a slot, and drops it too. A job already decoding runs to its end."""
        running = [submit_long(seed=2400 + i, tokens=TOKENS) for i in range(SLOTS)]
        for job in running:
            wait_started(redis_client, job)
        waiting = submit_long(seed=2410)
        child = only_child(worker)
        assert wait_until(lambda: f"glyphq.answer[{waiting.id}] received" in worker.log(), 15), tail(worker)

        app.control.revoke([waiting.id, running[0].id])
        assert wait_until(lambda: _ended(redis_client, waiting), 15), f"state {waiting.state}\n{tail(worker)}"
        assert runs(redis_client, waiting.id) == 0
        assert f"glyphq.answer[{waiting.id}] revoked before it started" in worker.log(), tail(worker)
        results = [job.result(timeout=180) for job in running]
        assert [r["tokens_out"] for r in results] == [TOKENS] * SLOTS, "a plain revoke stopped a running job"
        assert {r["worker"]["pid"] for r in results} == {child}


class TestTerminateHeldBack:
    """Its own class, so that its worker is the only one consuming."""

    def test_terminate_of_a_job_the_worker_holds_back_ends_it_at_once(self, start_class_worker, endless_model,
                                                                      redis_client):
        """A child with room for two more jobs is handed two; the third waits in the main process, which
        announces it revoked at once, not when it would next hand a job over."""
        worker = _start(start_class_worker, endless_model, max_tasks_per_child=2, recycle_overlap_s=0)
        running = [submit_long(seed=2300 + i) for i in range(2)]
        for job in running:
            wait_started(redis_client, job)
        held = submit_long(seed=2310)
        child = only_child(worker)
        assert wait_until(lambda: f"glyphq.answer[{held.id}] received" in worker.log(), 15), tail(worker)

        app.control.revoke(held.id, terminate=True)
        assert wait_until(lambda: _ended(redis_client, held), 15), f"state {held.state}\n{tail(worker)}"
        assert not any(job.ready() for job in running)
        assert only_child(worker) == child
        assert runs(redis_client, held.id) == 0
        assert f"glyphq.answer[{held.id}] revoked before it started" not in worker.log(), "it reached the child"

        app.control.revoke([job.id for job in running], terminate=True)
        assert wait_until(lambda: all(_ended(redis_client, job) for job in running), 15), tail(worker)
        assert "WorkerLostError" not in worker.log(), tail(worker)
