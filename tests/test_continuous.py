"""Continuous batching through the queue: a real redis-server, one real worker subprocess, the tiny model.

One worker (four slots, the tiny model that never ends a turn) serves the whole module; the last
test kills its child. Jobs are submitted while others run, so rows join and leave the running batch.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WorkerProcess, png_bytes, raw_job, wait_until
from PIL import Image

from glyphq.celeryconfig import Settings, settings
from glyphq.producer import submit
from glyphq.producer.schema import ANSWER_TASK
from glyphq.producer.store import Store, blob_key
from glyphq.tasks.app import app
from glyphq.worker.engine import EngineJob, load

SLOTS = 4


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, endless_model: Path, redis_url: str) -> Iterator[WorkerProcess]:
    env = {**os.environ, "GLYPHQ_BROKER_URL": redis_url, "GLYPHQ_MODEL": str(endless_model),
           "GLYPHQ_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1", "GLYPHQ_MAX_BATCH": str(SLOTS)}
    process = WorkerProcess(env, tmp_path_factory.mktemp("continuous") / "worker.log")
    try:
        process.wait_ready(timeout=120)
        yield process
    finally:
        process.stop()


def _long(seed: int, tokens: int, priority: int = 5):
    return submit(png_bytes(seed=seed), "A long answer please", max_new_tokens=tokens, priority=priority)


def _started(jobs) -> bool:
    return all(job.state == "STARTED" for job in jobs)


class _Events:
    """A real Celery event receiver (what Flower runs) on the broker, collecting task events by job id."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, dict]] = {}
        ready = threading.Event()

        def on_event(event: dict) -> None:
            if "uuid" in event:
                self.events.setdefault(event["uuid"], {})[event["type"]] = event

        class Receiver(app.events.Receiver):  # type: ignore[name-defined,misc]
            def on_consume_ready(self, *args, **kwargs):
                ready.set()

        self._connection = app.connection_for_read()
        self._receiver = Receiver(self._connection, handlers={"*": on_event})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"wakeup": False}, daemon=True)
        self._thread.start()
        assert ready.wait(20), "the event receiver did not start"

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(5)
        self._connection.release()


def test_a_short_job_finishes_long_before_the_long_ones_beside_it(worker):
    long_jobs = [_long(1000 + i, 3000) for i in range(2)]
    assert wait_until(lambda: _started(long_jobs), 60), "the long jobs never started"
    submitted = time.time()
    short = submit(png_bytes(seed=1010), "Short?", max_new_tokens=8)
    result = short.result(timeout=60)
    answered = time.time()
    assert not any(job.ready() for job in long_jobs), "the short job waited for the long ones"
    assert result["tokens_out"] == 8
    assert answered - submitted < 10
    longs = [job.result(timeout=180) for job in long_jobs]
    assert [r["tokens_out"] for r in longs] == [3000, 3000]
    assert len({r["worker"]["pid"] for r in [result, *longs]}) == 1


def test_the_most_urgent_waiting_job_takes_the_first_free_slot(worker):
    """Every slot busy and the worker's reservation full: the urgent job, submitted after the low ones,
    runs before all of them, and they run in the order they came."""
    first_to_end = _long(1100, 800)
    running = [_long(1101 + i, 3800) for i in range(SLOTS - 1)]
    filler = _long(1110, 800)  # the one job reserved beyond the slots (GLYPHQ_MAX_BATCH // 4)
    assert wait_until(lambda: _started(running) and first_to_end.state in ("STARTED", "SUCCESS"), 60)
    low = [submit(png_bytes(seed=1120 + i), "low", max_new_tokens=4, priority=0) for i in range(3)]
    urgent = submit(png_bytes(seed=1130), "urgent", max_new_tokens=4, priority=9)
    order = {job.id: job.result(timeout=180)["worker"]["task_index"] for job in [urgent, *low, filler]}
    assert order[urgent.id] < min(order[job.id] for job in low), order
    assert [order[job.id] for job in low] == sorted(order[job.id] for job in low)
    assert not any(job.ready() for job in running), "the urgent job waited for a long one"
    for job in running:
        job.result(timeout=180)


def test_answers_through_the_running_batch_equal_answering_alone(worker, endless_model):
    """Rows that joined and left at different steps write exactly the tokens of each job answered alone."""
    sizes = [(320 + 70 * i, 240 + 30 * i) for i in range(6)]
    questions = ["What is this?", "Describe the picture in a few words please", "Colour?"]
    jobs = [submit(png_bytes(size=size, seed=1200 + i), questions[i % 3], max_new_tokens=10 + 9 * i)
            for i, size in enumerate(sizes)]
    results = [job.result(timeout=120) for job in jobs]
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_DECODE": "generate"}))
    for i, (size, result) in enumerate(zip(sizes, results, strict=True)):
        image = Image.open(io.BytesIO(png_bytes(size=size, seed=1200 + i))).convert("RGB")
        (alone,) = engine.answer([EngineJob([image], questions[i % 3], 10 + 9 * i)], settings.max_image_size)
        assert (result["answer"], result["tokens_out"], result["tokens_in"]) == \
            (alone.answer, alone.tokens_out, alone.tokens_in)
    assert max(r["worker"]["batch_size"] for r in results) > 1, "the jobs ran beside each other"


def test_a_bad_job_fails_alone(worker, redis_client):
    good = [_long(1300 + i, 40) for i in range(3)]
    missing = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(blob_key("cd" * 32))}, queue="gpu")
    broken_bytes = b"\x89PNG\r\n\x1a\n" + b"\x01" * 64
    broken_key = blob_key(hashlib.sha256(broken_bytes).hexdigest())
    redis_client.set(broken_key, broken_bytes)
    broken = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(broken_key)}, queue="gpu")
    more = [_long(1310 + i, 40) for i in range(2)]
    with pytest.raises(Exception, match="blob"):
        missing.get(timeout=60)
    with pytest.raises(Exception, match="image"):
        broken.get(timeout=60)
    assert [job.result(timeout=60)["tokens_out"] for job in good + more] == [40] * 5
    assert worker.proc.poll() is None


def test_flower_sees_each_job_start_and_end_when_it_does(worker):
    events = _Events()
    try:
        short, long_job = _long(1400, 200), _long(1401, 2000)
        results = {job.id: job.result(timeout=120) for job in (short, long_job)}
        assert wait_until(lambda: all("task-succeeded" in events.events.get(job.id, {})
                                      for job in (short, long_job)), 10), events.events
    finally:
        events.stop()
    seen = {job.id: events.events[job.id] for job in (short, long_job)}
    for job_id, kinds in seen.items():
        started, succeeded = kinds["task-started"], kinds["task-succeeded"]
        wall = succeeded["timestamp"] - started["timestamp"]
        assert succeeded["runtime"] > 0.05, "a real runtime, not the tracer's few milliseconds"
        assert abs(wall - succeeded["runtime"]) < 0.5, (wall, succeeded["runtime"])
        assert results[job_id]["tokens_out"] in (200, 2000)
    assert seen[short.id]["task-succeeded"]["timestamp"] < seen[long_job.id]["task-succeeded"]["timestamp"] - 0.5
    assert seen[long_job.id]["task-succeeded"]["runtime"] > 3 * seen[short.id]["task-succeeded"]["runtime"]


@pytest.mark.parametrize("moment", ["mid-decode", "mid-admission"])
def test_sigkill_of_the_child_answers_every_job_exactly_once(worker, moment):
    """The child dies while every slot decodes, or just as a job joins the running batch (its run
    counted, its prompt not yet decoded): every job is answered, and each result is stored once."""
    store = Store(settings)
    count = SLOTS if moment == "mid-decode" else SLOTS - 1  # mid-admission: one slot free for the joiner
    running = [_long(1500 + i, 3000) for i in range(count)]
    assert wait_until(lambda: _started(running), 60)
    joining = [] if moment == "mid-decode" else [_long(1510, 1000)]
    if joining:
        assert wait_until(lambda: store.runs(joining[0].id) >= 1, 60, interval=0.001)
    child = worker.children()[0]
    os.kill(child, signal.SIGKILL)
    later = [_long(1520 + i, 20) for i in range(3)]
    everything = running + joining + later
    results = [job.result(timeout=240) for job in everything]
    assert [r["tokens_out"] for r in results] == [3000] * count + [1000] * len(joining) + [20] * 3
    assert all(r["worker"]["pid"] != child for r in results[:count + len(joining)])
    assert [store.runs(job.id) for job in running + joining] == [2] * (count + len(joining)), "each ran again once"
    assert all(job.state == "SUCCESS" for job in everything)

    def successes_logged() -> list[int]:
        log = worker.log()
        return [log.count(f"glyphq.answer[{job.id}] succeeded") for job in everything]

    # A child logs a job's success after storing its result: wait for the last lines before counting.
    assert wait_until(lambda: all(successes_logged()), 10), successes_logged()
    assert successes_logged() == [1] * len(everything)
    assert worker.proc.poll() is None
