"""Time limits, the visibility timeout that must outlast them, and the memory guard's child recycling."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_until

from faults.helpers import (
    endless_worker_settings,
    is_ready,
    only_child,
    pending_task_ids,
    runs,
    submit_long,
    submit_short,
    tail,
    unacked_age,
    wait_started,
)
from glyphq.producer import JobFailed

CHILD_TAG = re.compile(r"/GpuChild-(\d+)\]")


def test_hard_time_limit_fails_the_job_and_replaces_the_child(start_worker, endless_model, redis_client):
    """Scenario 5: a job past GLYPHQ_TIME_LIMIT fails with TimeLimitExceeded; a new child answers the next job.

    The hard limit is for a job that cannot take the soft limit's exception, such as one stuck in a
    CUDA kernel. The test makes the job's child such a one: it pauses it (SIGSTOP) as soon as the job
    has started, so the soft limit (2 s) passes unheard and the hard limit (4 s) has to end it.
    """
    worker = start_worker(**endless_worker_settings(endless_model, time_limit=4, soft_time_limit=2))
    job = submit_long(seed=501)
    wait_started(redis_client, job)
    child = only_child(worker)
    os.kill(child, signal.SIGSTOP)

    with pytest.raises(JobFailed) as failure:
        job.result(timeout=60)
    assert failure.value.error_type == "TimeLimitExceeded", failure.value
    assert wait_until(lambda: child not in worker.children() and len(worker.children()) == 1, 60), \
        f"child {child} was not replaced: {worker.children()}"
    assert f"Hard time limit (4s) exceeded for glyphq.answer[{job.id}]" in worker.log()

    after = submit_short(seed=502)
    result = after.result(timeout=60)
    assert result["answer"] and result["worker"]["pid"] != child
    assert runs(redis_client, job.id) == 1, "a job failed by the time limit must not be run again"
    assert job.id not in pending_task_ids(redis_client)
    assert worker.proc.poll() is None


@pytest.mark.parametrize(("time_limit", "visibility"), [(20, 20), (20, 10), (20, 40)],
                         ids=["equal", "shorter", "within-two-batches"])
def test_visibility_timeout_not_above_time_limit_is_refused(time_limit, visibility, tmp_path: Path):
    """Scenario 7: GLYPHQ_VISIBILITY_TIMEOUT <= GLYPHQ_TIME_LIMIT stops the worker (and the producer) at start.

    With batching (GLYPHQ_MAX_BATCH > 1, the default) it must also exceed twice the limit.
    """
    env = {**os.environ, "GLYPHQ_TIME_LIMIT": str(time_limit), "GLYPHQ_SOFT_TIME_LIMIT": str(time_limit),
           "GLYPHQ_VISIBILITY_TIMEOUT": str(visibility)}
    commands = {
        "worker": [sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker",
                   "--without-mingle", "--without-gossip"],
        "producer": [str(Path(sys.executable).with_name("glyphq")), "status", "some-job"],
    }
    for name, command in commands.items():
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} started with GLYPHQ_VISIBILITY_TIMEOUT={visibility} <= GLYPHQ_TIME_LIMIT={time_limit}")
        output = done.stdout + done.stderr
        assert done.returncode != 0, f"{name} exited 0:\n{output[-2000:]}"
        assert f"GLYPHQ_VISIBILITY_TIMEOUT={visibility}" in output, output[-2000:]
        assert f"GLYPHQ_TIME_LIMIT={time_limit}" in output, output[-2000:]


def test_job_near_the_hard_limit_runs_once_with_two_workers(start_worker, endless_model, redis_client):
    """Scenario 7: a job running close to GLYPHQ_TIME_LIMIT, with two workers consuming, runs once.

    The job's child is paused (SIGSTOP, as a slow step would hold it) until the job is 60-80% of the
    hard limit old, while a second worker starts. Its startup scan for expired unacknowledged messages
    happens while the job runs; as the visibility timeout outlasts the hard limit, it leaves it alone.
    """
    time_limit, visibility = 15, 35  # batching: longer than twice the hard limit
    settings = endless_worker_settings(endless_model, time_limit=time_limit, soft_time_limit=time_limit,
                                       visibility_timeout=visibility)
    first = start_worker(**settings)
    job = submit_long(seed=701, tokens=300)
    wait_started(redis_client, job)
    child = only_child(first)
    os.kill(child, signal.SIGSTOP)
    try:
        second = start_worker(wait=False, **settings)
        while True:
            age = unacked_age(redis_client, job.id)
            assert age is not None, "the running job's message is no longer unacknowledged"
            ready = is_ready(second)
            if age >= 0.8 * time_limit or (ready and age >= 0.6 * time_limit):
                break
            time.sleep(0.1)
        assert ready, f"second worker not ready within {age:.0f} s:\n{tail(second)}"
    finally:
        os.kill(child, signal.SIGCONT)

    result = job.result(timeout=60)
    assert result["worker"]["pid"] == child
    assert runs(redis_client, job.id) == 1, "the job ran twice"
    assert f"glyphq.answer[{job.id}] received" not in second.log()
    assert first.proc.poll() is None and second.proc.poll() is None
    more = [submit_short(seed=702 + i) for i in range(4)]
    assert all(j.result(timeout=60)["answer"] for j in more)
    assert [runs(redis_client, j.id) for j in more] == [1] * 4


def test_memory_guard_replaces_the_child_after_every_job(start_worker, redis_client):
    """Scenario 8: GLYPHQ_MAX_MEMORY_PER_CHILD_MB=1 replaces the child after each job; none is lost (celery#4809).

    Each replacement child loads the model (and logs it) and answers; the log shows no child exit
    other than the recycles, which billiard does not report as errors.
    """
    worker = start_worker(max_memory_per_child_mb=1, max_batch=1)  # batched, it is after each batch
    jobs = [submit_short(seed=801 + i) for i in range(6)]
    results = [job.result(timeout=120) for job in jobs]

    pids = [r["worker"]["pid"] for r in results]
    assert len(set(pids)) == 6, f"children reused: {pids}"
    assert [r["worker"]["task_index"] for r in results] == [1] * 6
    assert [runs(redis_client, job.id) for job in jobs] == [1] * 6
    # The child after the last job is a fresh one too: the seventh child, which logged its model load.
    assert wait_until(lambda: len(set(CHILD_TAG.findall(worker.log()))) >= 7 and len(worker.children()) == 1
                      and worker.children()[0] not in pids, 60), tail(worker)
    log = worker.log()
    for bad in ("exitcode", "exited with", "WorkerLostError", "ERROR/", "CRITICAL/"):
        assert bad not in log, f"{bad!r} in the worker log:\n{tail(worker)}"
    assert worker.proc.poll() is None
