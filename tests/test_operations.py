"""Operating it: the stats section Flower shows, Prometheus metrics, backpressure and deadlines."""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.request

import pytest
from conftest import free_port, png_bytes, raw_job, wait_until

from glyphq.celeryconfig import Settings, settings
from glyphq.producer import JobExpired, QueueFull, submit
from glyphq.producer.schema import ANSWER_TASK
from glyphq.producer.store import Store, blob_key, queue_depths
from glyphq.tasks.app import app


def _stats(worker) -> dict:
    """The worker's glyphq stats section; asked of that worker alone, so the reply ends the wait."""
    replies = app.control.inspect(destination=[worker.name], timeout=5).stats() or {}
    (reply,) = replies.values()
    return reply["glyphq"]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if metric.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"{name}{labels} not in metrics:\n{text}")


@pytest.fixture(scope="class")
def recycling_worker(start_class_worker):
    """A GPU worker that serves metrics and replaces its child every two jobs, shared by ``TestRecycling``."""
    return start_class_worker(metrics_port=free_port(), max_tasks_per_child=2)


class TestRecycling:
    """The stats section and the metrics of one worker whose children are replaced as the tests run.

    Each test counts from what the worker reports when it begins, so either may run first or alone."""

    def test_stats_carry_the_glyphq_section(self, recycling_worker, tiny_model):
        worker = recycling_worker
        section = _stats(worker)
        assert section["model"] == str(tiny_model)
        assert section["model_loaded"] is True
        assert section["device"] == "cpu" and section["gpu"] is None
        assert section["queues"] == ["gpu"]
        assert section["child_pid"] in worker.children()
        # Two jobs per child: the counts add up to the jobs answered so far (none on a fresh worker; the
        # other test of the class may have run first).
        recycles, done = section["recycles"], section["task_index"]
        text = _scrape(int(worker.env["GLYPHQ_METRICS_PORT"]))
        answered = sum(_value(text, "glyphq_jobs_total", task=ANSWER_TASK, state=state)
                       for state in ("success", "failure"))
        assert 2 * recycles + done == answered, (recycles, done, answered)
        by_reason = section["recycles_by_reason"]
        assert sum(by_reason.values()) == by_reason.get("tasks", 0) == recycles, by_reason

        for i in range(3):
            submit(png_bytes(seed=80 + i), "stats", max_new_tokens=2).result(timeout=60)
        more = (done + 3) // 2
        assert wait_until(lambda: _stats(worker)["recycles"] == recycles + more, timeout=30)
        section = _stats(worker)
        assert section["recycles_by_reason"] == {"tasks": recycles + more}
        assert section["task_index"] == (done + 3) % 2  # from a fresh worker: the third job ran in the second child

    def test_metrics_while_jobs_run_and_across_recycles(self, recycling_worker, redis_client):
        port = int(recycling_worker.env["GLYPHQ_METRICS_PORT"])
        before = _scrape(port)
        done = _stats(recycling_worker)["task_index"]  # jobs the current child answered before this test
        jobs = [submit(png_bytes(seed=90 + i), "metrics", max_new_tokens=3) for i in range(4)]
        key = blob_key(hashlib.sha256(b"not an image").hexdigest())
        redis_client.set(key, b"not an image", ex=600)
        bad = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(key)}, queue="gpu")
        during = _scrape(port)  # while the queue is still being worked
        assert "glyphq_queue_depth" in during
        for job in jobs:
            job.result(timeout=60)
        with pytest.raises(Exception, match="image: cannot be decoded"):
            bad.get(timeout=60)

        def grown(text: str, name: str, **labels: str) -> float:
            return _value(text, name, **labels) - _value(before, name, **labels)

        def settled() -> bool:
            return grown(_scrape(port), "glyphq_jobs_total", task=ANSWER_TASK, state="success") == 4

        assert wait_until(settled, timeout=20)
        text = _scrape(port)
        assert grown(text, "glyphq_jobs_total", task=ANSWER_TASK, state="failure") == 1
        assert grown(text, "glyphq_queue_wait_seconds_count") == 4
        assert grown(text, "glyphq_preprocess_seconds_count") == 4
        assert grown(text, "glyphq_generate_seconds_count") == 4
        assert 4 <= grown(text, "glyphq_generated_tokens_total") <= 12
        # Five jobs at two per child (from a fresh worker: two children replaced), and every replaced
        # child's counts are still summed.
        assert grown(text, "glyphq_recycles_total", reason="tasks") == (done + 5) // 2
        assert _value(text, "glyphq_queue_depth", queue="gpu") == queue_depths(settings, ("gpu",))["gpu"]


def test_queue_depth_gauge_counts_priority_subqueues(start_worker):
    port = free_port()
    start_worker(queues="render", metrics_port=port)  # serves metrics but consumes nothing from gpu
    before = _value(_scrape(port), "glyphq_queue_depth", queue="gpu")
    for priority in (0, 5, 9):
        submit(png_bytes(seed=100 + priority), "depth", priority=priority)
    assert _value(_scrape(port), "glyphq_queue_depth", queue="gpu") == before + 3
    app.control.purge()


def test_queue_full_refuses_and_enqueues_nothing(redis_client):
    depth = queue_depths(settings, ("gpu",))["gpu"]
    limited = Settings.from_env({**os.environ, "GLYPHQ_MAX_QUEUE": str(depth + 2)})
    submit(png_bytes(seed=110), "one", settings=limited)
    submit(png_bytes(seed=111), "two", settings=limited)
    image = png_bytes(seed=112)
    with pytest.raises(QueueFull, match=rf"the limit is {depth + 2} \(GLYPHQ_MAX_QUEUE\)"):
        submit(image, "three", settings=limited, job_id="queue-full-3")
    assert queue_depths(settings, ("gpu",))["gpu"] == depth + 2
    assert not redis_client.exists(blob_key(hashlib.sha256(image).hexdigest()))
    assert not Store(settings).job_exists("queue-full-3")
    app.control.purge()


def test_expired_job_never_runs(start_worker, redis_client):
    image = png_bytes(seed=120)
    job = submit(image, "too late", deadline=0.2)
    on_time = submit(png_bytes(seed=121), "on time", deadline=600)
    time.sleep(0.6)  # past the deadline before any worker runs
    start_worker()
    assert on_time.result(timeout=60)["answer"]
    with pytest.raises(JobExpired, match="never ran"):
        job.result(timeout=30)
    assert job.state == "EXPIRED"
    assert Store(settings).runs(job.id) == 0
    key = blob_key(hashlib.sha256(image).hexdigest())
    assert wait_until(lambda: not redis_client.exists(key))


def test_deadline_is_checked():
    from glyphq.producer import InvalidJob

    with pytest.raises(InvalidJob, match="deadline: must be seconds from now"):
        submit(png_bytes(), "q", deadline=0)


def test_expired_document_never_renders_and_says_so(start_worker, redis_client):
    from glyphq.producer import submit_document

    text = "A document that waits too long for the render worker."
    job = submit_document(text, "too late", deadline=0.2)
    time.sleep(0.6)
    start_worker(queues="render")
    with pytest.raises(JobExpired):
        job.result(timeout=30)
    assert job.state == "EXPIRED"
    key = blob_key(hashlib.sha256(text.encode()).hexdigest())
    assert wait_until(lambda: not redis_client.exists(key))
