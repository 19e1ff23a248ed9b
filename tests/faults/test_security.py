"""Hostile or careless producers (pickled messages, oversized fields, paths), Redis with a password, and
what a producer gets back for a job that Celery revoked."""

from __future__ import annotations

import hashlib
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import WorkerProcess, png_bytes, raw_job, wait_until

from glyphq.celeryconfig import settings
from faults.helpers import pending_task_ids, rational_strip_offsets_tiff, ready_worker, runs, tail
from glyphq.producer import GlyphqError, Job, JobFailed, submit
from glyphq.producer.schema import ANSWER_TASK
from glyphq.producer.store import blob_key
from glyphq.tasks.app import app


class _TouchOnUnpickle:
    """Unpickling this creates a file: what a pickled message could make a worker do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_url: str) -> Iterator[WorkerProcess]:
    """One worker with the default settings, shared by the tests of this module."""
    with ready_worker(redis_url, tiny_model, tmp_path_factory.mktemp("security") / "worker.log") as process:
        yield process


@pytest.fixture
def stored_blob(redis_client) -> str:
    """A real image blob, so that a hand-built message's only fault is the one the test puts in."""
    image = png_bytes((64, 48), seed=900)
    key = blob_key(hashlib.sha256(image).hexdigest())
    redis_client.set(key, image, ex=600)
    return key


def _answered(worker: WorkerProcess, seed: int) -> None:
    job = submit(png_bytes((64, 48), seed=seed), "Still answering?", max_new_tokens=4)
    assert job.result(timeout=60)["answer"], tail(worker)
    assert worker.proc.poll() is None


def test_pickled_message_is_refused_and_never_unpickled(worker, redis_client, tmp_path):
    """Scenario 9a: a pickle message on queue ``gpu`` is refused unread; it runs nothing and stays nowhere."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))  # the payload works: unpickling runs it
    assert probe.exists()

    marker = tmp_path / "pwned"
    task_id = f"pickled-{uuid.uuid4().hex}"
    app.send_task(ANSWER_TASK, kwargs={"job": _TouchOnUnpickle(marker)}, task_id=task_id, queue="gpu",
                  serializer="pickle")
    _answered(worker, seed=901)  # queued behind the pickle message: once it is answered, that was dealt with

    assert not marker.exists(), "the worker unpickled the message"
    assert runs(redis_client, task_id) == 0
    assert not redis_client.exists(f"glyphq:celery-task-meta-{task_id}")
    assert task_id not in pending_task_ids(redis_client), "the refused message was kept or requeued"
    log = worker.log()
    assert "Refusing to deserialize untrusted content of type pickle" in log, tail(worker)


LIMITS = [
    ({"question": "q" * (settings.max_question_chars + 1)},
     ["question: ", f"is {settings.max_question_chars + 1} characters", "GLYPHQ_MAX_QUESTION_CHARS"]),
    ({"max_new_tokens": settings.max_new_tokens_limit + 1},
     ["max_new_tokens: ", "GLYPHQ_MAX_NEW_TOKENS_LIMIT", f"got {settings.max_new_tokens_limit + 1}"]),
    ({"max_new_tokens": 0}, ["max_new_tokens: ", "GLYPHQ_MAX_NEW_TOKENS_LIMIT"]),
    ({"max_new_tokens": "4"}, ["max_new_tokens: must be an integer"]),
    ({"question": ["not", "a", "string"]}, ["question: must be a string"]),
]


@pytest.mark.parametrize(("fields", "expected"), LIMITS, ids=["question-long", "tokens-high", "tokens-zero",
                                                             "tokens-str", "question-list"])
def test_message_over_a_limit_fails_with_invalid_job(worker, redis_client, stored_blob, fields, expected):
    """Scenario 9c: a message that bypassed ``submit`` with a field over its limit fails as InvalidJob.

    The error names the field and the limit; the job is not retried, and the worker answers the next.
    """
    task_id = f"over-limit-{uuid.uuid4().hex}"
    app.send_task(ANSWER_TASK, kwargs={"job": raw_job(stored_blob, (64, 48), **fields)}, task_id=task_id,
                  queue="gpu")
    with pytest.raises(JobFailed) as failure:
        Job(task_id).result(timeout=60)
    assert failure.value.error_type == "InvalidJob"
    for text in expected:
        assert text in failure.value.message, failure.value.message
    assert runs(redis_client, task_id) == 1
    _answered(worker, seed=902)
    assert runs(redis_client, task_id) == 1, "an invalid job was run again"


TRAVERSALS = [
    (lambda key: {"text_key": "glyphq:blob:../../../etc/passwd"}, "text_key: must be a glyphq:blob:<sha256> key"),
    (lambda key: {"text_key": "/etc/passwd"}, "text_key: must be a glyphq:blob:<sha256> key"),
    (lambda key: {"image_keys": [key, "glyphq:blob:../../../etc/passwd"], "image_sizes": [[64, 48], [64, 48]]},
     "image_keys: must be a glyphq:blob:<sha256> key"),
]


@pytest.mark.parametrize(("make_fields", "expected"), TRAVERSALS,
                         ids=["text-key-dots", "text-key-path", "second-image-key"])
def test_paths_in_other_message_fields_are_refused(worker, redis_client, stored_blob, make_fields, expected):
    """Scenario 9d, beyond tests/test_queue.py (a path as the only image key): a path as the document's
    ``text_key``, or as the second of two image keys next to a valid one, is refused before anything is read.
    """
    task_id = f"traversal-{uuid.uuid4().hex}"
    fields = make_fields(stored_blob)
    app.send_task(ANSWER_TASK, kwargs={"job": raw_job(stored_blob, (64, 48), **fields)}, task_id=task_id,
                  queue="gpu")
    with pytest.raises(JobFailed) as failure:
        Job(task_id).result(timeout=60)
    assert failure.value.error_type == "InvalidJob"
    assert expected in failure.value.message, failure.value.message
    assert runs(redis_client, task_id) == 1
    assert worker.proc.poll() is None


def test_damaged_tiff_reaching_the_worker_fails_as_invalid_job(worker, redis_client):
    """Scenario 9c/10: a blob that Pillow chokes on (found by fuzzing) fails its job as InvalidJob, once."""
    image = rational_strip_offsets_tiff()
    key = blob_key(hashlib.sha256(image).hexdigest())
    redis_client.set(key, image, ex=600)
    task_id = f"damaged-tiff-{uuid.uuid4().hex}"
    app.send_task(ANSWER_TASK, kwargs={"job": raw_job(key, (45, 9))}, task_id=task_id, queue="gpu")
    with pytest.raises(JobFailed) as failure:
        Job(task_id).result(timeout=60)
    assert runs(redis_client, task_id) == 1
    _answered(worker, seed=903)
    if failure.value.error_type != "InvalidJob":
        pytest.fail(f"the job failed as {failure.value.error_type}, not InvalidJob: {failure.value}")


def test_result_of_a_revoked_job_raises(worker):
    """Scenario 3, the producer's side: for a job Celery marked REVOKED (what a Redis restart does to the
    running job, see test_redis_outage.py; also Flower's revoke button) ``Job.result`` raises a GlyphqError
    instead of returning Celery's TaskRevokedError as if it were the answer.
    """
    task_id = f"revoked-{uuid.uuid4().hex}"
    app.control.revoke(task_id)
    assert wait_until(lambda: f"Tasks flagged as revoked: {task_id}" in worker.log(), 30), tail(worker)
    job = submit(png_bytes((64, 48), seed=904), "Revoked before it ran", max_new_tokens=4, job_id=task_id)
    assert wait_until(job.ready, 30), job.state
    with pytest.raises(GlyphqError):
        value = job.result(timeout=10)
        pytest.fail(f"Job.result returned {value!r}")


def test_redis_with_password_works_end_to_end(start_worker, fault_redis, producer_process):
    """Scenario 9b: a redis-server with --requirepass and a redis://:PASSWORD@host:port/0 URL works end to end.

    The password is never written to the worker's log.
    """
    password = f"pw-{uuid.uuid4().hex}"
    server = fault_redis(appendonly=False, password=password)
    with redis.Redis(host="127.0.0.1", port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()  # the server does require the password

    worker = start_worker(broker_url=server.url)
    producer = producer_process(broker_url=server.url)
    job_id = producer.submit(seed=910)
    result = producer.result(job_id, timeout=60)
    assert result["answer"] and result["job_id"] == job_id
    with server.client() as client:
        assert runs(client, job_id) == 1
    assert password not in worker.log()
    assert "Connected to redis://:**@127.0.0.1" in worker.log()
