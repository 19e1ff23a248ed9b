"""Messages that name keys which are not their own, blobs whose bytes are not what their key says, and
Redis values that are not glyphq's: each fails its own job, touches nothing else, and the worker goes on."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WorkerProcess, png_bytes, queued_messages, raw_job, wait_until
from PIL import Image

from faults.helpers import EMBED, publish_raw, ready_worker, tail
from glyphq.producer import Job, JobFailed, submit
from glyphq.producer.schema import ANSWER_PAGES_TASK, ANSWER_TASK
from glyphq.producer.store import blob_key
from glyphq.tasks.app import app

#: The worker's byte limit in this module; submit's stays at the default 20 MB, so only the worker refuses.
WORKER_MAX_IMAGE_BYTES = 150_000


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_url: str) -> Iterator[WorkerProcess]:
    """One worker with a small byte limit, shared by the tests of this module."""
    log = tmp_path_factory.mktemp("hostile") / "worker.log"
    with ready_worker(redis_url, tiny_model, log, max_image_bytes=WORKER_MAX_IMAGE_BYTES) as process:
        yield process


def send(job: dict, task_id: str | None = None, name: str = ANSWER_TASK, args: tuple = ()) -> Job:
    """Push a hand-made message, as a client that skips ``submit`` could."""
    task_id = task_id or uuid.uuid4().hex
    app.send_task(name, args=args, kwargs={"job": job}, task_id=task_id, queue="gpu")
    return Job(task_id)


def failure(job: Job, worker: WorkerProcess) -> JobFailed:
    with pytest.raises(JobFailed) as caught:
        job.result(timeout=60)
    assert worker.proc.poll() is None, tail(worker)
    return caught.value


def still_answers(worker: WorkerProcess, seed: int) -> None:
    result = submit(png_bytes((64, 48), seed=seed), "Still answering?", max_new_tokens=4).result(timeout=60)
    assert result["answer"], tail(worker)


def test_a_message_naming_keys_that_are_not_its_blobs_fails_and_deletes_nothing(worker, redis_client):
    victim_blob = submit(png_bytes((64, 48), seed=801), "Queued elsewhere?", max_new_tokens=4)
    victim_key = blob_key(hashlib.sha256(png_bytes((64, 48), seed=801)).hexdigest())
    victim_blob.result(timeout=60)
    # The worker releases a job's blob just after storing its result: wait for that, then plant one that
    # another job holds, in one transaction, so that the release cannot fall between its two writes.
    assert wait_until(lambda: not redis_client.exists(victim_key, f"{victim_key}:refs")), "blob never released"
    with redis_client.pipeline(transaction=True) as plant:
        plant.set(victim_key, png_bytes((64, 48), seed=801), ex=600)
        plant.sadd(f"{victim_key}:refs", "someone-else")
        plant.execute()
    bystanders = {
        "glyphq:render:4": lambda: redis_client.rpush("glyphq:render:4", b"queued document job"),
        "glyphq:session:kept": lambda: redis_client.rpush("glyphq:session:kept", json.dumps({"q": 1})),
        "glyphq:celery-task-meta-other": lambda: redis_client.set("glyphq:celery-task-meta-other", b"{}"),
        "glyphq:job:other": lambda: redis_client.set("glyphq:job:other", b"1"),
        "glyphq:runs:other": lambda: redis_client.set("glyphq:runs:other", b"1"),
        "outside-glyphq": lambda: redis_client.set("outside-glyphq", b"kept"),
    }
    for create in bystanders.values():
        create()
    named = [*bystanders, victim_key]
    try:
        job = send(raw_job(victim_key, image_keys=named, image_sizes=[[1, 1]] * len(named)))
        assert failure(job, worker).error_type == "InvalidJob"
        for key in named:
            assert redis_client.exists(key), f"{key} was deleted by a message that named it"
        assert redis_client.llen("glyphq:render:4") == 1

        # A pages job whose rendered keys come from the message, not from a render step, is no different.
        pages = send(raw_job(victim_key, text_key=None), name=ANSWER_PAGES_TASK,
                     args=({"page_keys": named, "page_sizes": [[1, 1]] * len(named), "page_bytes": 1},))
        assert failure(pages, worker).error_type == "InvalidJob"
        assert all(redis_client.exists(key) for key in named)
        # A valid blob key the job holds no reference to is read, but never deleted by that job.
        borrowed = send(raw_job(victim_key, size=(64, 48)))
        assert borrowed.result(timeout=60)["answer"]
        assert redis_client.exists(victim_key)
    finally:
        redis_client.delete(*named, f"{victim_key}:refs")
    still_answers(worker, 802)


def test_a_task_id_that_is_not_a_job_id_fails_before_it_becomes_a_key(worker, redis_client, tmp_path):
    key = blob_key(hashlib.sha256(png_bytes((64, 48), seed=803)).hexdigest())
    redis_client.set(key, png_bytes((64, 48), seed=803), ex=600)
    job = send(raw_job(key, size=(64, 48)), task_id="glyphq:render:4 }{")
    error = failure(job, worker)
    assert error.error_type == "InvalidJob" and "task_id" in error.message
    assert not redis_client.exists("glyphq:runs:glyphq:render:4 }{")
    still_answers(worker, 804)


def test_bytes_that_do_not_match_their_key_fail_the_job_and_are_deleted(worker, redis_client):
    image_a, image_b = png_bytes((64, 48), seed=805), png_bytes((96, 32), seed=806)
    key_a = blob_key(hashlib.sha256(image_a).hexdigest())
    redis_client.set(key_a, image_b, ex=600)  # B's bytes under A's key
    job = send(raw_job(key_a, size=(64, 48)))
    error = failure(job, worker)
    assert error.error_type == "BlobCorrupt" and key_a in error.message
    assert not redis_client.exists(key_a)

    # Bad bytes planted before a submit are replaced by the submit, never kept alive by it.
    redis_client.set(key_a, image_b, ex=600)
    job = submit(image_a, "Which image?", max_new_tokens=4)
    assert hashlib.sha256(redis_client.get(key_a) or b"").hexdigest() == key_a.rsplit(":", 1)[1]
    assert job.result(timeout=60)["image_size_used"] == [64, 48]  # A's pixels, not B's 96x32


def test_the_worker_enforces_the_image_byte_limit_itself(worker, redis_client):
    noise = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) > WORKER_MAX_IMAGE_BYTES
    job = submit(data, "Too big for this worker?", max_new_tokens=4)  # submit's own limit is 20 MB
    error = failure(job, worker)
    assert error.error_type == "InvalidJob" and str(WORKER_MAX_IMAGE_BYTES) in error.message
    still_answers(worker, 807)


def test_session_turns_that_are_not_glyphq_values_are_left_out(worker, redis_client):
    session = f"s-{uuid.uuid4().hex[:8]}"
    redis_client.rpush(f"glyphq:session:{session}", b"not json", json.dumps(["a list"]),
                       json.dumps({"question": "q", "answer": 42}))
    result = submit(png_bytes((64, 48), seed=808), "First real turn?", session=session,
                    max_new_tokens=4).result(timeout=60)
    assert result["session"] == {"id": session, "turns_used": 0}
    still_answers(worker, 809)


@pytest.mark.parametrize("body, field", [
    ({"not": "a list"}, "message"),  # Celery's request would raise ValueError('too many values to unpack')
    ([[], ["not", "an", "object"], EMBED], "kwargs"),  # Celery takes it; glyphq must not turn it into a dict
], ids=["body-not-args-kwargs-embed", "kwargs-a-list"])
def test_a_malformed_message_with_an_id_fails_alone(worker, redis_client, body, field):
    task_id = uuid.uuid4().hex
    publish_raw(body, {"task": ANSWER_TASK, "id": task_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""})
    error = failure(Job(task_id), worker)
    assert error.error_type == "InvalidJob" and error.message.startswith(f"{field}:"), error.message
    still_answers(worker, 810)
    assert wait_until(lambda: not queued_messages(redis_client) and not redis_client.hkeys("glyphq:unacked"))


def test_a_message_without_an_id_is_dropped_with_an_error_line(worker, redis_client):
    publish_raw([[], {"job": {"question": "q"}}, EMBED], {"task": ANSWER_TASK, "lang": "py"})
    still_answers(worker, 811)
    assert wait_until(lambda: "dropped a glyphq.answer message without a usable id" in worker.log()), tail(worker)
    assert wait_until(lambda: not queued_messages(redis_client) and not redis_client.hkeys("glyphq:unacked"))
    still_answers(worker, 812)  # and no reconnect loop: it still consumes
    assert "Connection to broker lost" not in worker.log()


def test_a_message_for_an_unknown_task_without_an_id_is_dropped(worker, redis_client):
    publish_raw([[], {}, EMBED], {"task": "someone.elses.task", "lang": "py"})
    still_answers(worker, 813)
    assert wait_until(lambda: not queued_messages(redis_client) and not redis_client.hkeys("glyphq:unacked"))
    still_answers(worker, 814)
    assert "Connection to broker lost" not in worker.log()


@pytest.mark.parametrize("name, args, kwargs", [
    ("glyphq.render", (), {"request": {"text_key": "x"}, "job_id": "doc-1"}),
    # A built-in that would call glyphq.answer's body in the worker's main process, loading a model there.
    ("celery.map", ({"task": ANSWER_TASK, "args": [], "kwargs": {}, "options": {}, "subtask_type": None,
                     "immutable": False}, [[{"question": "q"}]]), {}),
], ids=["render", "celery.map"])
def test_a_task_a_gpu_worker_does_not_answer_fails_alone_and_never_runs_in_its_main_process(
        worker, redis_client, name, args, kwargs):
    task_id = uuid.uuid4().hex
    app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, queue="gpu")
    error = failure(Job(task_id), worker)
    assert error.error_type == "InvalidJob" and error.message.startswith("task:"), error.message
    assert name in error.message and "GPU worker" in error.message, error.message
    assert wait_until(lambda: not queued_messages(redis_client) and not redis_client.hkeys("glyphq:unacked"))
    still_answers(worker, 815)
    assert "Connection to broker lost" not in worker.log()


def test_a_gpu_worker_asked_to_consume_a_cpu_queue_too_refuses_to_start(tiny_model, redis_url):
    import subprocess
    import sys

    env = {**os.environ, "GLYPHQ_BROKER_URL": redis_url, "GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker", "-Q", "gpu,render",
                           "--without-mingle", "--without-gossip"], env=env, capture_output=True, text=True,
                          timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 5, output[-2000:]
    assert "a GPU worker answers glyphq.answer and glyphq.answer_pages only" in output and "render" in output
