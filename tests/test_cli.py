"""The ``glyphq`` console script, run as a user runs it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from conftest import ROOT, png_bytes, raw_job

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))


def run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GLYPHQ, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def error_of(out: subprocess.CompletedProcess[str], command: str) -> dict:
    """The JSON error on stdout, checked against the one line on stderr that says the same."""
    error = json.loads(out.stdout)
    assert error["ok"] is False and error["error_type"] and "Traceback" not in out.stderr, (out.stdout, out.stderr)
    assert out.stderr.strip() == f"glyphq {command}: {error['error']}", out.stderr
    return error


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (its pixel data is never read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")




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
        (["submit", str(tmp_path / "page.bin"), "q"], "image: cannot be decoded: not an image file"),
        (["submit", str(tmp_path), "q"], f"image: not a file: {tmp_path} is a directory"),
        (["submit", str(tmp_path / "notes.txt"), "q"],
         "image: cannot be decoded: it is text, not an image; to ask about a text document use glyphq ask-doc"),
        (["submit", str(tmp_path / "huge.png"), "q"],
         "image: is 900000000 pixels; the limit is 40000000 (GLYPHQ_MAX_IMAGE_PIXELS)"),
    ]
    (tmp_path / "page.bin").write_bytes(bytes(range(256)))
    (tmp_path / "notes.txt").write_text("Minutes of the meeting: the budget grows by 4%.\n")
    (tmp_path / "huge.png").write_bytes(png_header(30_000, 30_000))
    for args, message in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and "0x" not in out.stderr
        assert "178956970" not in out.stderr and "357913940" not in out.stderr, "glyphq's pixel limit alone"
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
    for command in ("result", "status"):
        unknown = run(command, "no-such-job-ever")
        assert unknown.returncode == 7, (command, unknown.stdout, unknown.stderr)
        error = error_of(unknown, command)
        assert error["state"] == "UNKNOWN" and error["error_type"] == "JobLost" and "no-such-job-ever" in error["error"]


def test_a_broker_url_without_its_scheme_is_a_bad_setting():
    out = run("status", "x", GLYPHQ_BROKER_URL="127.0.0.1:6379")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert json.loads(out.stdout)["error_type"] == "SettingsError"
    assert "GLYPHQ_BROKER_URL='127.0.0.1:6379': expected a Redis URL with its scheme" in out.stderr


#: Makes ``import pypdfium2`` fail, as on a producer-only install without the render extra.
NO_PYPDFIUM2 = """
import sys


class NoPdfium:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pypdfium2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoPdfium())
"""


def test_render_without_the_render_extra_is_a_json_refusal(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_PYPDFIUM2)
    (tmp_path / "notes.txt").write_text("A short note.\n")
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    out = run("render", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "pages"), PYTHONPATH=pythonpath)
    assert out.returncode == 2, (out.stdout, out.stderr)
    error = error_of(out, "render")
    assert error["error_type"] == "MissingExtra" and "pip install 'glyphq[render]'" in error["error"]
    assert "pypdfium2" in error["error"]


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
        error = error_of(out, "result")
        assert error["error_type"] == "BlobMissing" and error["state"] == "FAILURE" and error["job_id"] == "cli-fail-1"
