"""The ``glyphq`` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, png_bytes, raw_job

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GLYPHQ, *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=timeout)




def test_submit_without_wait_prints_the_job_id(tmp_path):
    image = tmp_path / "page.png"
    image.write_bytes(png_bytes(seed=61))
    out = run("submit", str(image), "Queued?", "--job-id", "cli-nowait-1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"job_id": "cli-nowait-1", "state": "PENDING"}
    pending = run("result", "cli-nowait-1")
    assert pending.returncode == 3 and json.loads(pending.stdout)["state"] == "PENDING"
    waited = run("result", "cli-nowait-1", "--wait", "--timeout", "1")
    assert waited.returncode == 3, waited.stderr
    assert json.loads(waited.stdout) == {"job_id": "cli-nowait-1", "state": "PENDING"}
    from glyphq.tasks.app import app

    app.control.purge()


def test_refusals_exit_2_and_name_the_field(tmp_path):
    image = tmp_path / "page.png"
    image.write_bytes(png_bytes(seed=62))
    cases = [
        (["submit", str(image), ""], "question: must not be empty"),
        (["submit", str(image), "q", "--priority", "12"], "priority: must be an integer from 0 to 9"),
        (["submit", str(tmp_path / "missing.png"), "q"], "image: no such file"),
        (["submit", str(image), "q", "--max-new-tokens", "99999"], "max_new_tokens: must be from 1 to"),
        (["submit", str(tmp_path / "page.txt"), "q"], "image: cannot be decoded: not an image file"),
    ]
    (tmp_path / "page.txt").write_text("not an image")
    for args, message in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and "0x" not in out.stderr
        error = out.stderr.split(": ", 1)[1].strip()  # "glyphq submit: <the error>"
        assert json.loads(out.stdout) == {"ok": False, "error_type": "InvalidJob", "error": error}




def test_broker_down_exits_4(tmp_path):
    image = tmp_path / "page.png"
    image.write_bytes(png_bytes(seed=63))
    env = {**os.environ, "GLYPHQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([GLYPHQ, "submit", str(image), "q"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 4, out.stderr
    assert "cannot reach Redis at 127.0.0.1:1" in out.stderr
    assert json.loads(out.stdout)["error_type"] == "BrokerUnavailable"


def test_every_command_fails_fast_and_in_one_line_when_redis_is_down():
    env = {**os.environ, "GLYPHQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    for args in (["status", "x"], ["result", "x"], ["result", "x", "--wait"], ["health"]):
        started = time.monotonic()
        out = subprocess.run([GLYPHQ, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 4, (args, out.stdout, out.stderr)
        assert time.monotonic() - started < 5, args
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 1, out.stderr
        assert json.loads(out.stdout)["ok"] is False


def test_version_and_an_unknown_job_id():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("glyphq ")
    unknown = run("result", "no-such-job-ever")
    assert unknown.returncode == 7, (unknown.stdout, unknown.stderr)
    assert json.loads(unknown.stdout)["state"] == "UNKNOWN"


class TestWithAWorker:
    """Commands whose jobs one shared worker answers (``class_worker``)."""

    def test_submit_wait_status_result(self, class_worker, tmp_path):
        image = tmp_path / "page.png"
        image.write_bytes(png_bytes(seed=60))
        out = run("submit", str(image), "What is the total?", "--wait", "--priority", "7", "--session", "cli-1",
                  "--max-new-tokens", "6")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["answer"] and result["tokens_out"] <= 6 and result["session"]["id"] == "cli-1"

        status = run("status", result["job_id"])
        assert status.returncode == 0 and json.loads(status.stdout)["state"] == "SUCCESS"
        again = run("result", result["job_id"])
        assert again.returncode == 0 and json.loads(again.stdout)["answer"] == result["answer"]

    def test_failed_job_exits_1(self, class_worker):
        from glyphq.producer.schema import ANSWER_TASK
        from glyphq.producer.store import blob_key
        from glyphq.tasks.app import app

        app.send_task(ANSWER_TASK, kwargs={"job": raw_job(blob_key("ef" * 32))}, queue="gpu", task_id="cli-fail-1")
        out = run("result", "cli-fail-1", "--wait", "--timeout", "60")
        assert out.returncode == 1
        assert json.loads(out.stdout)["error_type"] == "BlobMissing"
