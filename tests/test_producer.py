"""submit(): every refusal names its field and limit, and leaves Redis untouched."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, png_bytes, queued_messages
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.producer import InvalidJob, submit
from glyphq.tasks.app import app

SMALL = Settings.from_env({"GLYPHQ_MAX_IMAGE_BYTES": "200000", "GLYPHQ_MAX_IMAGE_PIXELS": "1000000",
                           "GLYPHQ_MAX_QUESTION_CHARS": "50", "GLYPHQ_MAX_NEW_TOKENS_LIMIT": "64"})


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file that decodes to ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


REFUSALS = [
    ({"image": b"not an image"}, "image: cannot be decoded"),
    ({"image": b""}, "image: is empty"),
    ({"image": "/no/such/file.png"}, "image: no such file"),
    ({"image": 42}, "image: must be a path, bytes or a PIL image"),
    ({"image": b"x" * 200_001}, "image: is 200001 bytes; the limit is 200000 (GLYPHQ_MAX_IMAGE_BYTES)"),
    ({"image": _bomb_png(20_000, 20_000)},
     "image: is 400000000 pixels; the limit is 1000000 (GLYPHQ_MAX_IMAGE_PIXELS)"),
    ({"image": _bomb_png(2_000, 1_000)},
     "is 2000x1000 = 2000000 pixels; the limit is 1000000 (GLYPHQ_MAX_IMAGE_PIXELS)"),
    ({"question": ""}, "question: must not be empty"),
    ({"question": "   "}, "question: must not be empty"),
    ({"question": None}, "question: must be a string"),
    ({"question": "What is \ud800 this?"},
     "question: cannot be encoded as UTF-8: a lone surrogate U+D800 at character 8"),
    ({"question": "\udc9f"}, "question: cannot be encoded as UTF-8: a lone surrogate U+DC9F at character 0"),
    ({"question": "\u200b\u200d\ufeff"},
     "question: must not be empty: it holds only invisible characters, such as U+200B"),
    ({"question": " \u00a0\u2060\u3000\u180e\u3164\ufe0f\x00\t"},
     "question: must not be empty: it holds only invisible characters, such as U+2060"),
    ({"image": _bomb_png(10_000, 40)},
     "image: is 10000x40, an aspect ratio of 250.0:1; the limit is 200:1 (GLYPHQ_MAX_ASPECT_RATIO)"),
    ({"question": "q" * 51}, "question: is 51 characters; the limit is 50 (GLYPHQ_MAX_QUESTION_CHARS)"),
    ({"max_new_tokens": 0}, "max_new_tokens: must be from 1 to 64"),
    ({"max_new_tokens": 65}, "max_new_tokens: must be from 1 to 64 (GLYPHQ_MAX_NEW_TOKENS_LIMIT), got 65"),
    ({"max_new_tokens": "5"}, "max_new_tokens: must be an integer from 1 to 64"),
    ({"priority": 10}, "priority: must be an integer from 0 to 9"),
    ({"priority": -1}, "priority: must be an integer from 0 to 9"),
    ({"priority": True}, "priority: must be an integer from 0 to 9"),
    ({"session": "a b"}, "session: must be 1 to 128 characters"),
    ({"job_id": "x" * 129}, "job_id: must be 1 to 128 characters"),
    ({"job_id": "../etc/passwd"}, "job_id: must be 1 to 128 characters"),
]


@pytest.mark.parametrize(("change", "message"), REFUSALS, ids=[m.split(":")[0] + str(i) for i, (_, m) in
                                                               enumerate(REFUSALS)])
def test_refusal_names_field_and_limit_and_enqueues_nothing(change, message, redis_client):
    keys_before = set(redis_client.keys("*"))
    job = {"image": png_bytes((64, 48)), "question": "What is the total?", **change}
    with pytest.raises(InvalidJob) as info:
        submit(job.pop("image"), job.pop("question"), settings=SMALL, **job)
    assert message in str(info.value)
    assert str(info.value).startswith(info.value.field + ":")
    assert set(redis_client.keys("*")) == keys_before


def test_disallowed_format_is_refused(redis_client):
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="ICO")
    with pytest.raises(InvalidJob, match=r"image: format ICO is not allowed; allowed: PNG, JPEG"):
        submit(buffer.getvalue(), "q")


def test_bomb_refused_from_header_alone():
    """A 400-megapixel image is refused without decoding it: the check must finish in well under a second
    of CPU even though decoding it would take far longer and ~400 MB."""
    import resource

    data = _bomb_png(20_000, 20_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidJob, match="GLYPHQ_MAX_IMAGE_PIXELS"):
        submit(data, "q")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100_000, f"peak RSS grew {grown_kb} kB: the image was decoded"


def test_truncated_image_is_refused():
    data = png_bytes((300, 300))
    with pytest.raises(InvalidJob, match="image: cannot be decoded"):
        submit(data[: len(data) // 2], "q")


def test_accepts_path_bytes_and_pil(tmp_path, redis_client):
    path = tmp_path / "page.png"
    path.write_bytes(png_bytes(seed=1))
    for image in (path, str(path), png_bytes(seed=2), Image.new("RGB", (30, 20), "red")):
        job = submit(image, "What is this?")
        assert job.state == "PENDING"
    app.control.purge()


def test_visible_question_with_invisible_characters_in_it_is_accepted(redis_client):
    for question in ("What\u200bis the total?", "\ufeffTotal?", "\U0001f469\u200d\U0001f4bb\ufe0f?", "\u00e9"):
        assert submit(png_bytes((64, 48)), question).state == "PENDING"
    app.control.purge()


@pytest.mark.parametrize(("question", "message"), [
    ("\ud83d", "question: cannot be encoded as UTF-8: a lone surrogate U+D83D at character 0"),
    ("\u200b\u2060", "question: must not be empty: it holds only invisible characters, such as U+200B"),
])
def test_worker_refuses_a_received_question_as_submit_does(question, message):
    """``JobMessage.from_dict`` (the worker's check of a message) uses the same question check."""
    from conftest import raw_job

    from glyphq.producer.schema import JobMessage

    with pytest.raises(InvalidJob, match=re.escape(message)):
        JobMessage.from_dict(raw_job("glyphq:blob:" + "0" * 64, question=question), Settings())


def test_message_for_5mb_image_is_under_4kib(redis_client):
    noise = Image.frombytes("RGB", (1400, 1300), bytes(range(256)) * (1400 * 1300 * 3 // 256 + 1))
    buffer = io.BytesIO()
    noise.save(buffer, format="BMP")
    data = buffer.getvalue()
    assert len(data) > 5_000_000
    job = submit(data, "What is the total on this invoice? " * 10, session="size-test")
    messages = [m for m in queued_messages(redis_client) if job.id.encode() in m]
    assert len(messages) == 1
    assert len(messages[0]) < 4096, f"broker message is {len(messages[0])} bytes"
    body = json.loads(messages[0])
    assert b"blob" in messages[0] and len(body["body"]) < 4096
    blob_keys = redis_client.keys("glyphq:blob:*")
    assert any(redis_client.strlen(k) == len(data) for k in blob_keys if not k.endswith(b":refs"))
    app.control.purge()


def test_same_job_id_is_enqueued_once(redis_client):
    first = submit(png_bytes(seed=3), "q", job_id="dup-enqueue-1")
    second = submit(png_bytes(seed=4), "q", job_id="dup-enqueue-1")
    assert first.id == second.id == "dup-enqueue-1"
    assert len([m for m in queued_messages(redis_client) if b"dup-enqueue-1" in m]) == 1
    app.control.purge()


def test_unknown_job_state():
    from glyphq.producer import Job

    assert Job("never-submitted-123").state == "UNKNOWN"


def test_producer_and_tasks_import_without_torch():
    """A web backend has no torch: importing the producer side must not need it."""
    code = textwrap.dedent(
        """
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "accelerate"):
                    raise ImportError(f"{name} is not installed here")
                return None

        sys.meta_path.insert(0, NoTorch())
        import glyphq.celeryconfig, glyphq.producer, glyphq.producer.cli, glyphq.worker.errors
        from glyphq import tasks
        from glyphq.producer import submit, Job, InvalidJob
        assert tasks.app.tasks["glyphq.answer"]
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        from kombu.transport import redis as kombu_redis
        assert kombu_redis.Channel.close.__module__ == "kombu.transport.redis"  # the worker's fix stays there
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_base_install_brings_no_torch():
    """`pip install glyphq` is the producer side; torch and transformers come only with the worker extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base and "transformers" not in base
    worker = " ".join(project["optional-dependencies"]["worker"]).lower()
    assert "torch" in worker and "transformers" in worker and "accelerate" in worker
    assert project["scripts"]["glyphq"] == "glyphq.producer.cli:main"


def test_result_times_out_with_job_timeout():
    from glyphq.producer import JobTimeout

    job = submit(png_bytes(seed=70), "Nobody is consuming the queue in this test")
    start = time.monotonic()
    with pytest.raises(JobTimeout, match=f"job {job.id} not finished after 0.5 s"):
        job.result(timeout=0.5)
    assert time.monotonic() - start < 10
    app.control.purge()


def test_flower_sees_a_summary_not_the_image(redis_client):
    """Flower shows a task's ``kwargsrepr``: the blob key, its size and the question, never image bytes."""
    image = png_bytes((900, 600), seed=71)
    job = submit(image, "What is shown?")
    (message,) = [json.loads(m) for m in queued_messages(redis_client) if job.id.encode() in m]
    summary = message["headers"]["kwargsrepr"]
    assert f"{len(image)} B, 900x600" in summary and "glyphq:blob:" in summary and "What is shown?" in summary
    assert len(summary) < 300
    app.control.purge()
