"""Images as phones, scanners and screenshot tools make them, extreme shapes and text the tokenizer cannot
encode, through a real worker on the tiny model: what a person sees is what is answered, and what the
model cannot take is refused at ``submit`` (nothing queued) or fails its own job only."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import image_files as files
import pytest
from conftest import WorkerProcess, png_bytes, queued_messages, raw_job
from PIL import Image, ImageDraw

from glyphq.celeryconfig import settings
from faults.helpers import ready_worker, runs, tail
from glyphq.producer import InvalidJob, Job, JobFailed, submit
from glyphq.producer.images import decode_checked_image
from glyphq.producer.schema import ANSWER_TASK
from glyphq.producer.store import blob_key
from glyphq.tasks.app import app

#: A batch leaves when it holds 4 jobs, or a second after its first: long enough that jobs sent
#: together on a busy machine share a batch.
BATCH = 4


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_url: str) -> Iterator[WorkerProcess]:
    """One worker shared by the tests of this module."""
    log = tmp_path_factory.mktemp("intake") / "worker.log"
    with ready_worker(redis_url, tiny_model, log, max_batch=BATCH, batch_delay_ms=1000) as process:
        yield process


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _opaque_text_png() -> bytes:
    """What ``files.transparent_text_png`` looks like: black text on white, no transparency at all."""
    image = Image.new("RGB", files.SEEN_SIZE, files.WHITE)
    image.paste(files.BLACK, mask=Image.open(io.BytesIO(files.grey_alpha_png())).getchannel("A"))
    return _encode(image)


def _grey_bands_png() -> bytes:
    """What ``files.grey16_png`` looks like, in 8 bits: black, mid grey and white bands."""
    image = Image.new("L", files.SEEN_SIZE, 0)
    draw = ImageDraw.Draw(image)
    third = files.SEEN_SIZE[0] // 3
    draw.rectangle([third, 0, 2 * third - 1, files.SEEN_SIZE[1]], fill=128)
    draw.rectangle([2 * third, 0, files.SEEN_SIZE[0], files.SEEN_SIZE[1]], fill=255)
    return _encode(image)


#: (name, file, size a person sees, size used after fitting into 1280x720, a plain file of the same pixels)
CASES = [
    ("phone-portrait", files.phone_jpeg(6, size=(1600, 1200)), [1600, 1200], [960, 720],
     files.phone_jpeg(1, size=(1600, 1200))),
    ("phone-upside-down", files.phone_jpeg(3), [96, 64], [96, 64], files.phone_jpeg(1)),
    ("grey16-scan", files.grey16_png(), [96, 64], [96, 64], _grey_bands_png()),
    ("transparent-screenshot", files.transparent_text_png(), [96, 64], [96, 64], _opaque_text_png()),
    ("palette-screenshot", files.palette_png(), [96, 64], [96, 64], _opaque_text_png()),
    ("fax-tiff", files.fax_tiff(), [96, 64], [96, 64], None),
    ("cmyk-print", files.cmyk_jpeg(), [96, 64], [96, 64], None),
    ("long-strip", _encode(Image.new("L", (10_000, 50), 255)), [10_000, 50], [5600, 28], None),
    ("long-receipt", _encode(Image.new("L", (800, 12_000), 255)), [800, 12_000], [86, 1280], None),
]


def test_images_as_people_make_them_are_answered_as_they_see_them(worker):
    """Each file is answered, reports the size a person sees and the size after fitting, and gets the same
    answer as a plain file of the same pixels: the model saw what a viewer shows."""
    for _, data, _, _, twin in CASES:
        if twin is not None:
            seen, plain = decode_checked_image(data, settings), decode_checked_image(twin, settings)
            assert seen.tobytes() == plain.tobytes(), "the twin must hold the very same pixels"
    jobs = [(name, submit(data, "What does this say?", max_new_tokens=6), seen, used, twin)
            for name, data, seen, used, twin in CASES]
    plain_twins = {name: submit(twin, "What does this say?", max_new_tokens=6)
                   for name, _, _, _, twin in CASES if twin is not None}
    for name, job, seen, used, _ in jobs:
        result = job.result(timeout=120)
        assert result["image_size"] == seen, (name, result)
        assert result["image_size_used"] == used, (name, result)
        assert result["answer"] and result["tokens_in"] > 0, (name, result)
        if name in plain_twins:
            twin_result = plain_twins[name].result(timeout=120)
            assert result["answer"] == twin_result["answer"], (name, result, twin_result)
    assert worker.proc.poll() is None


def _glyphq_keys(client) -> set[bytes]:
    """The keys a submit writes: blobs, job claims and run counters."""
    return {key for pattern in ("glyphq:blob:*", "glyphq:job:*", "glyphq:runs:*") for key in client.keys(pattern)}


REFUSED_AT_SUBMIT = [
    ({"image": _encode(Image.new("1", (10_000, 40), 1))},
     "image: is 10000x40, an aspect ratio of 250.0:1; the limit is 200:1 (GLYPHQ_MAX_ASPECT_RATIO)"),
    ({"image": _encode(Image.new("L", (30, 9000), 255), "TIFF")},
     "image: is 30x9000, an aspect ratio of 300.0:1; the limit is 200:1 (GLYPHQ_MAX_ASPECT_RATIO)"),
    ({"question": "What is the total?\ud800"},
     "question: cannot be encoded as UTF-8: a lone surrogate U+D800 at character 18"),
    ({"question": "\u200b\u200c\u200d\u2060\ufeff"},
     "question: must not be empty: it holds only invisible characters, such as U+200B"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED_AT_SUBMIT,
                         ids=["banner-10000x40", "tiff-30x9000", "lone-surrogate", "zero-width-only"])
def test_refused_at_submit_with_nothing_queued(worker, redis_client, change, message):
    """The worker is running: anything that reached the queue would be taken. Nothing does."""
    job = {"image": png_bytes((64, 48), seed=1700), "question": "What is the total?", **change}
    keys_before, queued_before = _glyphq_keys(redis_client), queued_messages(redis_client)
    job_id = f"refused-{uuid.uuid4().hex}"
    with pytest.raises(InvalidJob) as info:
        submit(job["image"], job["question"], job_id=job_id)
    assert str(info.value) == message
    assert info.value.field == message.split(":")[0]
    assert _glyphq_keys(redis_client) == keys_before
    assert queued_messages(redis_client) == queued_before
    assert Job(job_id).state == "UNKNOWN"


@pytest.fixture
def stored_blob(redis_client) -> str:
    image = png_bytes((64, 48), seed=1800)
    key = blob_key(hashlib.sha256(image).hexdigest())
    redis_client.set(key, image, ex=600)
    return key


HAND_MADE = [
    ({"question": "Total?\udcff"}, "question: cannot be encoded as UTF-8: a lone surrogate U+DCFF at character 6"),
    ({"question": "\u2063\u180e\u3164"}, "question: must not be empty: it holds only invisible characters"),
]


@pytest.mark.parametrize(("fields", "message"), HAND_MADE, ids=["lone-surrogate", "invisible-only"])
def test_hand_made_message_with_bad_text_fails_only_its_own_job(worker, redis_client, stored_blob, fields, message):
    """A producer that skips ``submit`` sends such a question with good jobs around it: it fails alone as
    InvalidJob, once, before the batch is answered; the good jobs share one generate (no re-run one by
    one) and the worker keeps running."""
    bad_id = f"bad-text-{uuid.uuid4().hex}"
    log_before = len(worker.log())
    first = submit(png_bytes((64, 48), seed=1810), "Still answering?", max_new_tokens=4)
    app.send_task(ANSWER_TASK, kwargs={"job": raw_job(stored_blob, (64, 48), **fields)}, task_id=bad_id,
                  queue="gpu")
    good = [first] + [submit(png_bytes((64, 48), seed=1811 + i), "Still answering?", max_new_tokens=4)
                      for i in range(BATCH - 2)]

    with pytest.raises(JobFailed) as failure:
        Job(bad_id).result(timeout=120)
    assert failure.value.error_type == "InvalidJob", failure.value
    assert message in failure.value.message
    results = [job.result(timeout=120) for job in good]
    assert all(r["answer"] for r in results)
    assert [r["worker"]["batch_size"] for r in results] == [BATCH - 1] * (BATCH - 1), "answered together"
    assert "answering each job alone" not in worker.log()[log_before:], tail(worker)
    assert runs(redis_client, bad_id) == 1
    assert worker.proc.poll() is None


def test_hand_made_message_naming_an_extreme_image_fails_as_invalid_job(worker, redis_client):
    """The worker checks the aspect ratio of a blob as ``submit`` does, before the processor would refuse it."""
    banner = _encode(Image.new("L", (12_000, 40), 255))
    key = blob_key(hashlib.sha256(banner).hexdigest())
    redis_client.set(key, banner, ex=600)
    task_id = f"banner-{uuid.uuid4().hex}"
    app.send_task(ANSWER_TASK, kwargs={"job": raw_job(key, (12_000, 40))}, task_id=task_id, queue="gpu")
    with pytest.raises(JobFailed) as failure:
        Job(task_id).result(timeout=120)
    assert failure.value.error_type == "InvalidJob"
    assert "image: is 12000x40, an aspect ratio of 300.0:1; the limit is 200:1 (GLYPHQ_MAX_ASPECT_RATIO)" in \
        failure.value.message
    assert runs(redis_client, task_id) == 1
    assert submit(png_bytes((64, 48), seed=1830), "Still answering?", max_new_tokens=4).result(timeout=120)["answer"]
