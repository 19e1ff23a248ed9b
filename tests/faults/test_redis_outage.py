"""Redis goes away under a running worker: restarted from its append-only file, or down for a while.

Each test has a redis-server of its own. The test process's ``celeryconfig`` points at the session's
Redis, so these tests submit through ``producer_helper.py`` in a subprocess whose ``GLYPHQ_*``
environment matches the worker's.
"""

from __future__ import annotations

import time

import pytest
from conftest import wait_until

from faults.helpers import LONG_TOKENS, RUN_TOKENS, pending_task_ids, runs, tail

TIME_LIMIT, VISIBILITY_TIMEOUT = 10, 21
SUBMIT_BOUND_S = 10.0  # how long submit may take to raise BrokerUnavailable while Redis is down


def _settings(redis, **extra: str | int) -> dict[str, str | int]:
    """GLYPHQ_* settings shared by the worker and the producer of one test (batching on, the default).

    A batching worker holds more jobs than it runs, so when Redis goes away it has unacknowledged
    jobs that were never started: they must come back after the outage like the running one.
    """
    return {"broker_url": redis.url, "time_limit": TIME_LIMIT, "soft_time_limit": TIME_LIMIT,
            "visibility_timeout": VISIBILITY_TIMEOUT, "max_new_tokens_limit": LONG_TOKENS, **extra}


def _durable_redis(fault_redis):
    """A Redis that writes its append-only file on every command. With the deployed ``everysec`` a
    crash loses up to the last second of writes (docs/deploy.md), which would make these tests' counts
    depend on how soon after the submissions Redis is killed."""
    return fault_redis(appendonly=True, appendfsync="always")


def _wait_running(producer, client, job_id: str) -> None:
    assert wait_until(lambda: runs(client, job_id) == 1 and producer.call("state", job_id=job_id)["state"]
                      == "STARTED", 90), f"job {job_id} never started"


def _assert_ran_again_once(producer, client, worker, side_by_side: list[str]) -> None:
    """Each job that was decoding when Redis went away is answered in full, started exactly twice: once
    before the outage, cut short by it, and once more to its end. A job that had ended before the outage
    would show one run, a job run twice after it three; a job taken as revoked fails ``result``."""
    for job_id in side_by_side:
        result = producer.result(job_id, timeout=90)
        assert result["tokens_out"] == RUN_TOKENS, tail(worker)
        assert runs(client, job_id) == 2, f"job {job_id} started {runs(client, job_id)} times\n{tail(worker)}"


def test_redis_restart_from_aof_same_worker_keeps_consuming_with_recycling(
        start_worker, endless_model, fault_redis, producer_process):
    """Scenario 3: Redis crashes and restarts from its append-only file while two jobs decode side by
    side and more wait for the child.

    The worker runs with GLYPHQ_MAX_TASKS_PER_CHILD=2 (celery#7800: a worker that recycles children
    could stop consuming after a reconnect), so its child takes the two long jobs and the queued ones
    wait in the worker. The two that were decoding are cancelled and run again, once each, alone; the
    queued jobs survive the restart and run once, in the batch; and the same worker process, never
    restarted, keeps consuming and recycling children after it.
    """
    redis = _durable_redis(fault_redis)
    settings = _settings(redis, max_tasks_per_child=2)
    worker = start_worker(model=endless_model, **settings)
    producer = producer_process(**settings)
    client = redis.client()
    try:
        side_by_side = [producer.submit(seed=300 + i, max_new_tokens=RUN_TOKENS) for i in range(2)]
        queued = [producer.submit(seed=302 + i) for i in range(6)]
        for job_id in side_by_side:
            _wait_running(producer, client, job_id)

        redis.stop()  # SIGKILL: only what the append-only file holds survives
        time.sleep(1.0)
        redis.start()

        _assert_ran_again_once(producer, client, worker, side_by_side)
        for job_id in queued:
            assert producer.result(job_id, timeout=90)["answer"], tail(worker)
            assert runs(client, job_id) == 1
        log = worker.log()
        for job_id in side_by_side:  # its run died with the child: it runs alone once
            assert f"[{job_id}] runs alone" in log, tail(worker)
        for job_id in queued:  # redelivered too, but no child had started it: it runs in the batch
            assert f"[{job_id}] runs alone" not in log, tail(worker)
        after = [producer.submit(seed=310 + i) for i in range(6)]
        results = [producer.result(job_id, timeout=90) for job_id in after]
        assert all(r["answer"] for r in results)
        assert max(r["worker"]["task_index"] for r in results) <= 2
        assert len({r["worker"]["pid"] for r in results}) >= 3, "children were not recycled after the restart"
        assert worker.proc.poll() is None, tail(worker)
        assert worker.log().count(" ready.") == 1, "the worker restarted instead of reconnecting"
        assert worker.log().count("Connected to ") >= 2, tail(worker)
    finally:
        client.close()


def test_job_running_when_redis_restarts_is_redelivered_and_answered(
        start_worker, endless_model, fault_redis, producer_process):
    """Scenario 3: the job that was running when Redis restarted is answered, after all.

    README: "On a lost connection it cancels the running job, which is then redelivered". Redis is
    down for 2 s (a restart that reloads its append-only file). The job must never be lost: until it
    is answered, its message must be queued or unacknowledged (so that it is redelivered), or the
    job running again. The wait allows the visibility timeout plus kombu's 100 s restore sweep.
    """
    redis = _durable_redis(fault_redis)
    settings = _settings(redis)
    worker = start_worker(model=endless_model, **settings)
    producer = producer_process(**settings)
    client = redis.client()
    try:
        running = producer.submit(seed=320, max_new_tokens=RUN_TOKENS)
        _wait_running(producer, client, running)
        redis.stop()
        time.sleep(2.0)
        redis.start()

        deadline = time.monotonic() + VISIBILITY_TIMEOUT + 100 + 30
        missing_since = None
        while (state := producer.call("state", job_id=running)["state"]) != "SUCCESS":
            assert time.monotonic() < deadline, f"job still {state} after the restart"
            if state == "STARTED" or running in pending_task_ids(client):
                missing_since = None
            else:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > 5:
                    pytest.fail(f"job lost: state {state}, runs {runs(client, running)}, and no message left to "
                                f"redeliver it\n{tail(worker)}")
            time.sleep(0.2)
        result = producer.result(running, timeout=10)
        assert result["tokens_out"] == RUN_TOKENS
        assert runs(client, running) == 2
    finally:
        client.close()


def test_redis_down_10s_submit_raises_and_worker_resumes_by_itself(
        start_worker, endless_model, fault_redis, producer_process):
    """Scenario 4: Redis is down for 10 s while three jobs decode side by side.

    ``submit`` raises the documented ``BrokerUnavailable`` within a bound and queues nothing. Once
    Redis is back, the same worker, never restarted, answers every job it held, none taken as revoked
    (glyphq issue 14): the three that were decoding run again once each, the next turn of a session,
    which waited in the child for the turn before it, runs once; then the jobs submitted after the outage.
    """
    redis = _durable_redis(fault_redis)
    settings = _settings(redis)
    worker = start_worker(model=endless_model, **settings)
    producer = producer_process(**settings)
    client = redis.client()
    try:
        side_by_side = [producer.submit(seed=330 + i, max_new_tokens=RUN_TOKENS, session="outage" if i == 0 else None)
                        for i in range(3)]
        next_turn = producer.submit(seed=333, session="outage")
        for job_id in side_by_side:
            _wait_running(producer, client, job_id)
        assert runs(client, next_turn) == 0, "the next turn started before the turn it waits for had ended"

        redis.stop()
        down_at = time.monotonic()
        refused = []
        for i in range(3):
            reply = producer.call("submit", seed=340 + i, job_id=f"during-outage-{i}")
            assert not reply["ok"] and reply["error_type"] == "BrokerUnavailable", reply
            assert f"127.0.0.1:{redis.port}" in reply["message"]
            refused.append(reply["elapsed"])
        assert max(refused) < SUBMIT_BOUND_S, f"submit took {max(refused)} s to raise BrokerUnavailable"
        time.sleep(max(0.0, 10.0 - (time.monotonic() - down_at)))
        assert worker.proc.poll() is None, tail(worker)
        redis.start()

        _assert_ran_again_once(producer, client, worker, side_by_side)
        assert producer.result(next_turn, timeout=90)["answer"], tail(worker)
        assert runs(client, next_turn) == 1
        after = [producer.submit(seed=350 + i) for i in range(3)]
        for job_id in after:
            assert producer.result(job_id, timeout=90)["answer"], tail(worker)
            assert runs(client, job_id) == 1
        for i in range(3):  # refused submissions left nothing behind
            assert producer.call("state", job_id=f"during-outage-{i}")["state"] == "UNKNOWN"
        assert worker.proc.poll() is None and worker.log().count(" ready.") == 1, tail(worker)
    finally:
        client.close()


def test_job_state_and_result_raise_broker_unavailable_while_redis_is_down(fault_redis, producer_process):
    """Scenario 4, the producer's other calls: with Redis down, ``Job.state`` and ``Job.result`` raise
    ``BrokerUnavailable``, as ``submit`` does (README: every glyphq exception is a ``GlyphqError``).
    """
    redis = fault_redis(appendonly=True)
    producer = producer_process(**_settings(redis))
    job_id = producer.submit(seed=360)  # no worker: it stays queued
    redis.stop()
    replies = {"state": producer.call("state", job_id=job_id), "result": producer.call("result", job_id=job_id,
                                                                                    timeout=5)}
    redis.start()
    assert not any(reply["ok"] for reply in replies.values()), replies
    leaked = {op: f"{reply['error_type']}: {reply['message']}" for op, reply in replies.items()
              if reply["error_type"] != "BrokerUnavailable"}
    if leaked:
        pytest.fail(f"raised other than BrokerUnavailable: {leaked}")
