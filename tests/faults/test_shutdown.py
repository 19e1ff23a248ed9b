"""The worker itself stops: a warm shutdown (SIGTERM) and a crash (SIGKILL of the whole worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import queued_messages, wait_until

from faults.helpers import (
    RUN_TOKENS,
    endless_worker_settings,
    kill_worker,
    only_child,
    pending_task_ids,
    runs,
    submit_long,
    submit_short,
    tail,
    unacked_age,
    wait_started,
)

# Small limits, so that a message left unacknowledged by a dead worker comes back within the test. One
# slot: the visibility timeout need only outlast one time limit, which a RUN_TOKENS job keeps well within.
TIME_LIMIT, VISIBILITY_TIMEOUT = 8, 12
LIMITS = {"time_limit": TIME_LIMIT, "soft_time_limit": TIME_LIMIT, "visibility_timeout": VISIBILITY_TIMEOUT}
#: One slot, so the worker reserves only the running job and the jobs behind it wait in Redis.
ONE_SLOT = {"max_batch": 1}


def test_sigterm_finishes_the_running_job_and_a_restarted_worker_answers_the_queue(
        start_worker, endless_model, redis_client):
    """Scenario 2a: SIGTERM to the worker's main process mid-job is a warm shutdown.

    The running job is finished and acknowledged by the stopping worker; the jobs queued behind it
    stay queued, untouched, and a restarted worker answers them.
    """
    settings = endless_worker_settings(endless_model, **ONE_SLOT)
    first = start_worker(**settings)
    running = submit_long(seed=201, tokens=RUN_TOKENS)
    queued = [submit_short(seed=202 + i) for i in range(3)]
    wait_started(redis_client, running)
    child = only_child(first)

    os.kill(first.proc.pid, signal.SIGTERM)
    try:
        first.proc.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker did not stop within 120 s of SIGTERM:\n{tail(first)}")
    assert first.proc.returncode == 0, tail(first)

    assert running.state == "SUCCESS", f"running job is {running.state} after a warm shutdown:\n{tail(first)}"
    result = running.result(timeout=10)
    assert result["worker"]["pid"] == child and runs(redis_client, running.id) == 1
    assert running.id not in pending_task_ids(redis_client), "the finished job was left unacknowledged"
    assert [job.state for job in queued] == ["PENDING"] * 3
    assert sorted(pending_task_ids(redis_client)) == sorted(job.id for job in queued)

    start_worker(**settings)
    for job in queued:
        assert job.result(timeout=60)["answer"]
        assert runs(redis_client, job.id) == 1
    assert runs(redis_client, running.id) == 1, "the finished job ran again after the restart"
    assert queued_messages(redis_client) == []


def _crash_with_a_running_job(start_worker, endless_model, redis_client):
    """Start a worker, give it a running job and three queued ones, then SIGKILL the whole worker."""
    settings = endless_worker_settings(endless_model, **LIMITS, **ONE_SLOT)
    first = start_worker(**settings)
    running = submit_long(seed=210, tokens=RUN_TOKENS)
    queued = [submit_short(seed=211 + i) for i in range(3)]
    wait_started(redis_client, running)
    kill_worker(first)
    assert running.state == "STARTED" and runs(redis_client, running.id) == 1
    # Nothing is lost: the running job's message waits, unacknowledged, for the visibility timeout.
    assert unacked_age(redis_client, running.id) is not None
    assert sorted(pending_task_ids(redis_client)) == sorted([running.id] + [job.id for job in queued])
    return settings, running, queued


def test_sigkill_of_worker_then_restart_answers_every_job(start_worker, endless_model, redis_client):
    """Scenario 2b: SIGKILL of the worker (main process and child) with jobs queued and one running.

    After a restart every job is answered: the queued ones at once, the running one (redelivered once
    its message has been unacknowledged for GLYPHQ_VISIBILITY_TIMEOUT) exactly one more time. The
    worker is restarted after the visibility timeout, so the new worker's first scan finds it.
    """
    settings, running, queued = _crash_with_a_running_job(start_worker, endless_model, redis_client)
    assert wait_until(lambda: (unacked_age(redis_client, running.id) or 0) > VISIBILITY_TIMEOUT + 1, 60)

    second = start_worker(**settings)
    for job in queued:
        assert job.result(timeout=60)["answer"]
        assert runs(redis_client, job.id) == 1
    result = running.result(timeout=60)
    assert result["tokens_out"] == RUN_TOKENS
    assert runs(redis_client, running.id) == 2
    # The result is stored before the worker acknowledges the message; then nothing is left.
    assert wait_until(lambda: pending_task_ids(redis_client) == [], 30), pending_task_ids(redis_client)
    assert second.proc.poll() is None


def test_sigkill_then_immediate_restart_redelivers_after_the_visibility_timeout(
        start_worker, endless_model, redis_client):
    """Scenario 2b: the worker is restarted at once (as systemd or compose do) after the SIGKILL.

    README: "Redis redelivers any message left unacknowledged for GLYPHQ_VISIBILITY_TIMEOUT seconds".
    The running job must be answered soon after its message has been unacknowledged that long (10 s
    of slack), by the worker that is consuming meanwhile.
    """
    settings, running, queued = _crash_with_a_running_job(start_worker, endless_model, redis_client)
    delivered = time.time() - (unacked_age(redis_client, running.id) or 0.0)
    start_worker(**settings)
    for job in queued:
        assert job.result(timeout=60)["answer"]

    bound = delivered + VISIBILITY_TIMEOUT + 10
    answered = wait_until(lambda: running.ready(), max(1.0, bound - time.time()), interval=0.2)
    if not answered:
        pytest.fail(f"job not redelivered {time.time() - delivered:.0f} s after its delivery "
                    f"(GLYPHQ_VISIBILITY_TIMEOUT={VISIBILITY_TIMEOUT})")
    assert running.result(timeout=5)["tokens_out"] == RUN_TOKENS
    assert runs(redis_client, running.id) == 2
