"""End to end through a real redis-server and a real ``celery -A glyphq.tasks worker`` on the tiny model."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from conftest import png_bytes, raw_job, wait_until

from glyphq.celeryconfig import settings
from glyphq.producer import Job, JobFailed, submit
from glyphq.producer.schema import ANSWER_TASK
from glyphq.producer.store import Store, blob_key, session_key, session_lock_key
from glyphq.tasks.app import app
from glyphq.tasks.signals import MODEL_LOAD_FAILED_EXIT

RESULT_FIELDS = {"answer", "model", "tokens_in", "tokens_out", "image_size", "image_size_used", "timings",
                 "gpu", "worker"}


def test_submitted_job_is_answered(start_worker, tiny_model, redis_client):
    start_worker()
    image = png_bytes((1600, 900), seed=1)
    job = submit(image, "What is the total on this invoice?", max_new_tokens=8)
    result = job.result(timeout=60)

    assert set(result) >= RESULT_FIELDS
    assert isinstance(result["answer"], str) and result["answer"]
    assert result["model"] == str(tiny_model)
    assert result["tokens_in"] > 16 and 1 <= result["tokens_out"] <= 8
    assert result["image_size"] == [1600, 900]
    assert result["image_size_used"] == [1280, 720]
    assert set(result["timings"]) == {"queue_s", "preprocess_s", "generate_s", "cleanup_s", "encoder_cached_pages",
                                      "prefix_cached_tokens"}
    assert all(v >= 0 for v in result["timings"].values())
    assert result["gpu"] is None  # CPU
    assert result["worker"]["task_index"] == 1 and result["worker"]["pid"] > 0
    assert job.state == "SUCCESS"
    # The blob is gone once the result is stored; every key is glyphq's.
    key = blob_key(hashlib.sha256(image).hexdigest())
    assert wait_until(lambda: not redis_client.exists(key, key + ":refs"))
    assert all(k.startswith(b"glyphq:") for k in redis_client.keys("*"))


def test_thirty_jobs_recycling_every_five(start_worker, redis_client):
    start_worker(max_tasks_per_child=5)
    jobs = [submit(png_bytes(seed=i), f"Question number {i}?", max_new_tokens=4) for i in range(30)]
    results = [job.result(timeout=120) for job in jobs]

    assert [r["job_id"] for r in results] == [j.id for j in jobs]
    pids = {r["worker"]["pid"] for r in results}
    assert len(pids) >= 6, f"only {len(pids)} child processes for 30 jobs at 5 per child"
    assert max(r["worker"]["task_index"] for r in results) == 5
    store = Store(settings)
    assert [store.runs(j.id) for j in jobs] == [1] * 30, "a job ran more than once"


def test_shared_blob_survives_until_last_job(start_worker, redis_client):
    image = png_bytes(seed=8)
    key = blob_key(hashlib.sha256(image).hexdigest())
    first = submit(image, "first", max_new_tokens=4)
    second = submit(image, "second", max_new_tokens=4)
    assert redis_client.strlen(key) == len(image)
    assert redis_client.smembers(key + ":refs") == {first.id.encode(), second.id.encode()}
    start_worker()
    assert first.result(timeout=60)["answer"] and second.result(timeout=60)["answer"]
    assert wait_until(lambda: not redis_client.exists(key, key + ":refs"))


def test_priority_9_overtakes_queued_work(start_worker):
    low = [submit(png_bytes(seed=20 + i), "low", priority=0, max_new_tokens=4) for i in range(4)]
    urgent = submit(png_bytes(seed=30), "urgent", priority=9, max_new_tokens=4)
    start_worker()
    order = sorted(low + [urgent], key=lambda j: j.result(timeout=60)["worker"]["task_index"])
    assert order[0].id == urgent.id


def test_rss_guard_recycles_without_losing_jobs(start_worker):
    """max-memory-per-child (the path the GPU guard also takes) replaces the child once its running jobs end.

    The guard trips when a child's first job ends: the job decoding beside it finishes, nothing else
    starts in that child, and the rest go to the next child. Whether a child's second job joined
    before its first ended depends on when its page was decoded, so a child may answer one or two.
    """
    jobs = [submit(png_bytes(seed=40 + i), "guard", max_new_tokens=64) for i in range(4)]
    start_worker(max_memory_per_child_mb=1, max_batch=2)
    results = [j.result(timeout=120) for j in jobs]
    by_child: dict[int, list[dict]] = {}
    for r in results:
        by_child.setdefault(r["worker"]["pid"], []).append(r["worker"])
    assert len(by_child) >= 2, by_child
    for answered in by_child.values():
        assert sorted(w["task_index"] for w in answered) == list(range(1, len(answered) + 1)), by_child
        assert len(answered) <= 2, by_child
        if len(answered) == 2:  # the second started while the first was still decoding
            assert max(w["batch_size"] for w in answered) == 2, by_child


def test_parent_preloads_torch_and_render_worker_does_not(start_worker):
    """The GPU worker's main process has torch loaded before it forks; a render worker never loads it."""
    render = start_worker(wait=False, queues="render")
    gpu = start_worker()
    render.wait_ready()
    maps = Path(f"/proc/{gpu.proc.pid}/maps").read_text()
    assert "libtorch" in maps
    assert "preloaded torch and transformers" in gpu.log()
    assert "libtorch" not in Path(f"/proc/{render.proc.pid}/maps").read_text()
    assert "preloaded" not in render.log()


def test_model_that_cannot_load_stops_the_worker_and_keeps_jobs(start_worker, tmp_path, redis_client):
    job = submit(png_bytes(seed=130), "Kept for a worker that can load its model?", max_new_tokens=2)
    worker = start_worker(wait=False, model=str(tmp_path / "no-such-model"))
    try:
        worker.proc.wait(timeout=90)
    except Exception:
        pytest.fail(f"worker still running after its model failed to load:\n{worker.log()[-2000:]}")
    assert "failed to load; stopping the worker, queued jobs stay queued" in worker.log()
    # A supervisor (systemd, Docker, Kubernetes) sees a failure, not a clean stop.
    assert worker.proc.returncode == MODEL_LOAD_FAILED_EXIT != 0, worker.log()[-2000:]
    assert f"exit code {MODEL_LOAD_FAILED_EXIT}: the model could not be loaded" in worker.log()
    assert job.state == "PENDING"
    assert Store(settings).runs(job.id) == 0
    start_worker()
    assert job.result(timeout=60)["answer"]


class TestOneWorker:
    """Jobs answered by one worker shared by these tests (``class_worker``)."""

    def test_corrupt_image_reaching_worker_fails_cleanly(self, class_worker, redis_client):
        worker = class_worker
        # Bypass submit's checks, as a buggy or hostile producer would.
        garbage = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
        key = blob_key(hashlib.sha256(garbage).hexdigest())  # its true address: only the decode can fail
        redis_client.set(key, garbage, ex=600)
        bad = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(key, (10, 10))}, queue="gpu")
        with pytest.raises(JobFailed, match="image: cannot be decoded") as info:
            Job(bad.id).result(timeout=60)
        assert info.value.error_type == "InvalidJob"
        assert bad.state == "FAILURE"
        assert Store(settings).runs(bad.id) == 1, "a bad image must not be retried"

        good = submit(png_bytes(seed=5), "And this one?", max_new_tokens=4)
        assert good.result(timeout=60)["answer"]
        assert worker.proc.poll() is None

    def test_path_in_message_is_never_read(self, class_worker, tmp_path):
        secret = tmp_path / "secret.png"
        secret.write_bytes(png_bytes())
        for key in (str(secret), "glyphq:blob:../../" + str(secret)):
            bad = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(key)}, queue="gpu")
            with pytest.raises(Exception, match="image_keys: must be a glyphq:blob:<sha256> key"):
                bad.get(timeout=60)

    def test_same_job_id_runs_once(self, class_worker):
        first = submit(png_bytes(seed=7), "Once?", job_id="run-once-1", max_new_tokens=4)
        second = submit(png_bytes(seed=7), "Once?", job_id="run-once-1", max_new_tokens=4)
        assert first.result(timeout=60) == second.result(timeout=60)
        third = submit(png_bytes(seed=7), "Once?", job_id="run-once-1", max_new_tokens=4)  # after it finished
        assert third.result(timeout=10)["job_id"] == "run-once-1"
        time.sleep(1)
        assert Store(settings).runs("run-once-1") == 1

    def test_session_keeps_last_three_turns(self, class_worker, redis_client):
        used = []
        for i in range(5):
            result = submit(png_bytes(seed=i), f"turn {i}", session="chat-1", max_new_tokens=4).result(timeout=60)
            used.append(result["session"]["turns_used"])
        assert used == [0, 1, 2, 3, 3]
        stored = [json.loads(t)["question"] for t in redis_client.lrange("glyphq:session:chat-1", 0, -1)]
        assert stored == ["turn 2", "turn 3", "turn 4"]
        assert 0 < redis_client.ttl("glyphq:session:chat-1") <= settings.session_ttl_s

    def test_failed_job_raises_job_failed(self, class_worker, redis_client):
        key = blob_key("cd" * 32)  # never stored: the blob is missing
        app.send_task(ANSWER_TASK, kwargs={"job": raw_job(key)}, queue="gpu", task_id="missing-blob-1")
        with pytest.raises(JobFailed, match="BlobMissing: blob glyphq:blob:cdcd"):
            Job("missing-blob-1").result(timeout=60)

    def test_a_turn_waits_for_a_dead_worker_s_session_lock_to_expire_and_others_run(self, class_worker,
                                                                                     redis_client):
        """A session lock left by a worker that died mid-turn (planted here with a short expiry) holds the
        session's next turn back until it expires, not forever, while unrelated jobs run; the child
        holding the turn does not spin meanwhile."""
        import psutil

        hold_s = 6
        session = f"dead-holder-{time.time_ns()}"
        lock = session_lock_key(session)
        redis_client.set(lock, "job-of-a-dead-worker", ex=hold_s)
        held_from = time.monotonic()
        turn = submit(png_bytes(seed=40), "Still there?", session=session, max_new_tokens=4)
        others = [submit(png_bytes(seed=41 + i), f"Unrelated {i}?", max_new_tokens=4) for i in range(3)]
        assert all(job.result(timeout=60)["answer"] for job in others)
        assert not turn.ready(), "the turn ran while another job held its session"
        assert redis_client.get(lock) == b"job-of-a-dead-worker"

        children = [psutil.Process(pid) for pid in class_worker.children()]
        cpu_from, wall_from = sum(sum(c.cpu_times()[:2]) for c in children), time.monotonic()
        time.sleep(max(0.5, held_from + hold_s - 0.5 - time.monotonic()))
        cpu_s = sum(sum(c.cpu_times()[:2]) for c in children) - cpu_from
        wall_s = time.monotonic() - wall_from
        assert not turn.ready()
        assert cpu_s < 0.2 * wall_s, f"the child holding the turn used {cpu_s:.2f} s of CPU in {wall_s:.2f} s"

        result = turn.result(timeout=60)
        assert result["timings"]["queue_s"] >= hold_s - 1, "the turn did not wait for the lock to expire"
        assert result["session"]["turns_used"] == 0
        assert not redis_client.exists(lock), "the turn left its session locked"
        assert redis_client.llen(session_key(session)) == 1

    def test_a_redis_error_taking_a_session_lock_holds_the_turn_and_the_child_serves_on(self, class_worker,
                                                                                         redis_client):
        session = f"lock-error-{time.time_ns()}"
        lock = session_lock_key(session)
        redis_client.rpush(lock, "not a lock")  # reading it as a lock, Redis answers WRONGTYPE
        turn = submit(png_bytes(seed=50), "Held?", session=session, max_new_tokens=4)
        other = submit(png_bytes(seed=51), "Unrelated?", max_new_tokens=4)
        assert other.result(timeout=60)["answer"]
        assert wait_until(lambda: f"could not take the lock of session {session}" in class_worker.log(), 10)
        assert not turn.ready(), "the turn ran without its session's lock"

        redis_client.delete(lock)
        result = turn.result(timeout=30)
        assert result["session"]["turns_used"] == 0
        assert not redis_client.exists(lock)
        assert class_worker.proc.poll() is None
