"""A worker child dies mid-job: the job comes back exactly once, and a job that always kills it is stopped."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from conftest import png_bytes, queued_messages, wait_until

from faults.helpers import (
    endless_worker_settings,
    long_settings,
    only_child,
    pending_task_ids,
    runs,
    submit_long,
    submit_short,
    tail,
    wait_started,
)
from glyphq.producer import JobFailed, submit
from glyphq.producer.store import session_lock_key


def _success_publications(pubsub, job_id: str, seen: list[str]) -> int:
    """Count SUCCESS results the backend published for ``job_id`` (it publishes every store)."""
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "message":
            seen.append(json.loads(message["data"])["status"])
    return seen.count("SUCCESS")


#: The limit on deliveries of a job whose child dies (the default, set here because the test counts on it).
MAX_DELIVERIES = 3


@pytest.fixture(scope="class")
def endless_worker(start_class_worker, endless_model):
    """One worker on the endless model, shared by the tests of ``TestChildDies``."""
    return start_class_worker(**endless_worker_settings(endless_model, max_deliveries=MAX_DELIVERIES))


class TestChildDies:
    """Children killed mid-job, one worker for both tests: each waits for its jobs' answers, and the
    worker's replacement child is the only one again before the next test (``only_child``)."""

    def test_child_killed_mid_job_is_answered_exactly_once(self, endless_worker, redis_client):
        """Scenario 1: SIGKILL the child mid-job; the job is redelivered, run twice in all, stored once."""
        worker = endless_worker
        job = submit_long(seed=101, tokens=2000)
        pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"glyphq:celery-task-meta-{job.id}")
        try:
            wait_started(redis_client, job)
            child = only_child(worker)
            os.kill(child, signal.SIGKILL)

            result = job.result(timeout=180)
            assert result["tokens_out"] == 2000
            assert result["worker"]["pid"] != child, "the killed child cannot have answered"
            assert runs(redis_client, job.id) == 2

            # Nothing can run it a third time: no copy of its message is queued or unacknowledged, and
            # a job submitted afterwards is answered while its counter stays at 2.
            after = submit_short(seed=102)
            assert after.result(timeout=60)["answer"]
            assert job.id not in pending_task_ids(redis_client)
            assert runs(redis_client, job.id) == 2
            assert job.state == "SUCCESS"

            statuses: list[str] = []
            assert wait_until(lambda: _success_publications(pubsub, job.id, statuses) >= 1, 10)
            assert _success_publications(pubsub, job.id, statuses) == 1, f"result stored as {statuses}"
        finally:
            pubsub.close()
        log = worker.log()
        assert log.count(f"glyphq.answer[{job.id}] received") == 2, tail(worker)
        assert log.count(f"glyphq.answer[{job.id}] succeeded") == 1, tail(worker)
        assert worker.proc.poll() is None


    def test_a_turn_whose_child_died_takes_its_session_lock_back(self, endless_worker, redis_client):
        """SIGKILL the child mid-turn: the session's lock still names the turn, which comes back and takes it
        back at once rather than waiting for it to expire; the next turn, held meanwhile, sees its answer."""
        session = f"killed-mid-turn-{uuid.uuid4().hex[:8]}"
        lock = session_lock_key(session)
        first = submit(png_bytes((64, 48), seed=120), "First turn", session=session, max_new_tokens=1000,
                       settings=long_settings())
        wait_started(redis_client, first)
        assert redis_client.get(lock) == first.id.encode(), "the running turn did not hold its session's lock"
        os.kill(only_child(endless_worker), signal.SIGKILL)
        second = submit(png_bytes((64, 48), seed=121), "Second turn", session=session, max_new_tokens=4)

        result = first.result(timeout=120)  # the lock would expire after GLYPHQ_TIME_LIMIT + 60 s
        assert runs(redis_client, first.id) == 2
        assert result["session"]["turns_used"] == 0
        assert second.result(timeout=60)["session"]["turns_used"] == 1, "the second turn missed the first"
        assert not redis_client.exists(lock)
        assert endless_worker.proc.poll() is None

    def test_poison_job_is_failed_after_max_deliveries(self, endless_worker, redis_client):
        """Scenario 6: a job whose child dies on every run fails with PoisonJob; the jobs behind it run."""
        max_deliveries = MAX_DELIVERIES
        worker = endless_worker
        poison = submit_long(seed=110, question="This one kills its worker")
        behind = [submit_short(seed=111 + i) for i in range(3)]

        # The test plays the part of the job: each time the job is started (its runs counter goes up),
        # its child is killed. A start past the limit is refused before the job's work begins, so
        # nothing is killed then.
        killed: list[int] = []
        deadline = time.monotonic() + 240
        while not poison.ready():
            assert time.monotonic() < deadline, f"poison job not finished; runs {runs(redis_client, poison.id)}"
            started = runs(redis_client, poison.id)
            if len(killed) < started <= max_deliveries:
                child = only_child(worker)
                os.kill(child, signal.SIGKILL)
                killed.append(child)
            assert started <= max_deliveries + 1, f"poison job started {started} times"
            time.sleep(0.02)

        with pytest.raises(JobFailed) as failure:
            poison.result(timeout=10)
        assert failure.value.error_type == "PoisonJob"
        assert f"GLYPHQ_MAX_DELIVERIES={max_deliveries}" in failure.value.message
        assert len(killed) == max_deliveries
        assert runs(redis_client, poison.id) == max_deliveries + 1

        for job in behind:
            assert job.result(timeout=120)["answer"]
            # A job that joined the running batch beside the poison job's first run died with it and ran
            # again; the poison job's later runs were alone (a redelivered job runs by itself).
            assert runs(redis_client, job.id) <= 2
        # It never comes round again: no copy is left, and a later job runs while its counter stays put.
        assert submit_short(seed=119).result(timeout=60)["answer"]
        assert poison.id not in pending_task_ids(redis_client)
        assert runs(redis_client, poison.id) == max_deliveries + 1
        assert queued_messages(redis_client) == []
        assert worker.proc.poll() is None, tail(worker)
