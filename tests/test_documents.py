"""Document jobs: text rendered into pages on the CPU ``render`` queue, answered over all pages on ``gpu``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, queued_messages, wait_until
from faults.helpers import publish_raw

from glyphq.celeryconfig import RENDER_TASK, Settings
from glyphq.producer import InvalidJob, Job, JobFailed, submit_document
from glyphq.producer.documents import RENDER_KEYS
from glyphq.producer.store import blob_key
from glyphq.worker.render import RenderConfig

TEXT = "\n".join(f"Line {i}: the invoice total for item {i} is {i * 3} euro." for i in range(220))


SMALL = Settings.from_env({"GLYPHQ_MAX_DOCUMENT_CHARS": "1000"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "text: must not be empty"),
        ({"text": " \n "}, "text: must not be empty"),
        ({"text": b"bytes"}, "text: must be a string"),
        ({"text": "Lease \udfff terms"}, "text: cannot be encoded as UTF-8: a lone surrogate U+DFFF at character 6"),
        ({"text": "\u200b\n\u200c\u2063"}, "text: must not be empty: it holds only invisible characters"),
        ({"question": "\ud800?"}, "question: cannot be encoded as UTF-8: a lone surrogate U+D800"),
        ({"question": "\u2062"}, "question: must not be empty: it holds only invisible characters"),
        ({"text": "x" * 1001}, "text: is 1001 characters; the limit is 1000 (GLYPHQ_MAX_DOCUMENT_CHARS)"),
        ({"render": {"dpi": 96, "colour": "red"}}, "render: unknown key(s) colour; allowed:"),
        ({"render": {"font-path": "/etc/passwd"}}, "render: font-path cannot be set per job"),
        ({"render": ["dpi"]}, "render: must be an object"),
        ({"render": "/no/such/config.json"}, "render: cannot read render config"),
        ({"question": ""}, "question: must not be empty"),
    ],
)
def test_document_refusals_enqueue_nothing(kwargs, message, redis_client):
    before = set(redis_client.keys("*"))
    job = {"text": "Some text.", "question": "q", **kwargs}
    with pytest.raises(InvalidJob) as info:
        submit_document(job.pop("text"), job.pop("question"), settings=SMALL, **job)
    assert message in str(info.value)
    assert set(redis_client.keys("*")) == before


def test_render_config_file_with_hyphenated_keys(tmp_path, redis_client):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dpi": 96, "margin-x": 20}))
    job = submit_document("Some text.", "q", render=path)
    (message,) = [m for m in queued_messages(redis_client, "render") if job.id.encode() in m]
    request = json.loads(json.loads(message)["body"] and _body(message))[1]["request"]
    assert request["render"] == {"dpi": 96, "margin-x": 20}
    redis_client.delete(*redis_client.keys("glyphq:render*"))


def _body(message: bytes) -> str:
    import base64

    return base64.b64decode(json.loads(message)["body"]).decode()


def test_job_render_keys_are_the_renderer_keys_except_font_path():
    assert set(RenderConfig().to_dict()) - {"font-path"} == RENDER_KEYS


def test_cli_render_writes_pages(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "glyphq.producer.cli", "render", str(text),
                          "--out", str(tmp_path / "pages")],
                         cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    pages = sorted(Path(tmp_path / "pages").glob("page-*.png"))
    assert len(pages) == report["pages"] >= 2
    assert report["files"] == [str(p) for p in pages]


@pytest.fixture(scope="class")
def render_and_gpu_workers(start_class_worker) -> None:
    """A render worker (two children) and a GPU worker, shared by the tests of ``TestRenderAndGpuWorkers``."""
    render = start_class_worker(wait=False, queues="render", concurrency=2)  # starts while the GPU worker does
    start_class_worker()
    render.wait_ready()


# The tests that start render workers come last: one still stopping could take the message that
# test_render_config_file_with_hyphenated_keys reads from the queue.
def test_more_pages_than_the_limit_fail_with_invalid_job(start_worker):
    start_worker(queues="render", max_pages=2)
    job = submit_document(TEXT * 3, "Too long?")
    with pytest.raises(JobFailed, match=r"InvalidJob: text: renders to \d+ pages; the limit is 2 \(GLYPHQ_MAX_PAGES\)"):
        job.result(timeout=120)
    assert job.state == "FAILURE"


class TestRenderAndGpuWorkers:
    """Document jobs through both queues, or refused by the render worker; each test waits for its own job."""

    def test_document_answered_through_render_and_gpu_queues(self, render_and_gpu_workers, redis_client):
        blobs_before = set(redis_client.keys("glyphq:blob:*"))
        job = submit_document(TEXT, "What is the total for item 7?", max_new_tokens=8)
        result = job.result(timeout=180)

        assert result["pages"] >= 2
        assert len(result["image_size"]) == len(result["image_size_used"]) == result["pages"]
        # A 72-dpi A4 page fits the default box without shrinking (only its width is cropped to the ink).
        assert all(used == size for used, size in zip(result["image_size_used"], result["image_size"], strict=True))
        assert all(h == 842 for _, h in result["image_size"][:-1])
        assert result["vision_tokens"] == 16 * result["pages"]  # the tiny model's 16 tokens per image
        assert result["text_tokens"] > 1000
        assert result["compression"] == round(result["text_tokens"] / result["vision_tokens"], 2)
        assert result["timings"]["render_s"] > 0
        assert result["answer"] and result["tokens_out"] <= 8
        # Pages and text travelled as blobs and are gone once the result is stored.
        text_key = blob_key(hashlib.sha256(TEXT.encode()).hexdigest())
        # Blobs of earlier tests may expire meanwhile: what counts is that none of this job's is left.
        assert wait_until(lambda: not set(redis_client.keys("glyphq:blob:*")) - blobs_before), \
            set(redis_client.keys("glyphq:blob:*")) - blobs_before
        assert not redis_client.exists(text_key)

    def test_a_malformed_render_message_fails_alone_and_the_render_worker_goes_on(self, render_and_gpu_workers):
        task_id = "bad-render.render"
        publish_raw({"not": "a list"}, {"task": RENDER_TASK, "id": task_id, "lang": "py"}, queue_name="render")
        with pytest.raises(JobFailed, match="InvalidJob: message: could not be read as a glyphq.render request"):
            Job(task_id).result(timeout=60)
        assert submit_document("Some text.", "Still rendering?", max_new_tokens=4).result(timeout=120)["answer"]

    def test_bad_render_value_fails_the_job_clearly(self, render_and_gpu_workers):
        job = submit_document("Some text.", "q", render={"dpi": -5})
        with pytest.raises(JobFailed, match="InvalidJob: render: dpi must be greater than 0"):
            job.result(timeout=120)

    def test_cli_ask_doc(self, render_and_gpu_workers, tmp_path):
        text = tmp_path / "doc.txt"
        text.write_text(TEXT[:2000], encoding="utf-8")
        out = subprocess.run([sys.executable, "-m", "glyphq.producer.cli", "ask-doc", str(text), "What is item 3?",
                              "--wait", "--max-new-tokens", "5"],
                             cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["pages"] == 1 and result["answer"]
