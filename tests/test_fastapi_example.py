"""examples/fastapi_app.py over real HTTP: uvicorn in a subprocess, a real worker, the session's Redis."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, png_bytes

EXAMPLES = ROOT / "examples"


class Server:
    """``uvicorn fastapi_app:app`` on a free port, with its own log."""

    def __init__(self, broker_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.log_path = log_path
        env = {**os.environ, "GLYPHQ_BROKER_URL": broker_url}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--app-dir", str(EXAMPLES), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(redis_url, tmp_path_factory.mktemp("uvicorn") / "uvicorn.log")
    yield srv
    srv.stop()


def post_job(server: Server, image: bytes, question: str, **fields: int) -> httpx.Response:
    return httpx.post(f"{server.url}/jobs", files={"image": ("page.png", image, "image/png")},
                      data={"question": question, **{k: str(v) for k, v in fields.items()}}, timeout=30)


def test_post_then_poll_until_answered(server, start_worker):
    start_worker()
    image = png_bytes((900, 600), seed=70)
    response = post_job(server, image, "What is the total?", max_new_tokens=6, priority=8)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    states = []
    deadline = time.monotonic() + 90
    while True:
        body = httpx.get(f"{server.url}/jobs/{job_id}", timeout=30).json()
        states.append(body["state"])
        if body["state"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert body["state"] == "SUCCESS", (states, body)
    assert set(states) <= {"PENDING", "STARTED", "SUCCESS"}
    result = body["result"]
    assert result["job_id"] == job_id and result["answer"]
    assert 1 <= result["tokens_out"] <= 6
    assert result["image_size"] == [900, 600]
    assert "error" not in body


def test_refused_job_is_422_with_glyphqs_message(server):
    for blank in ("", "   "):
        empty = post_job(server, png_bytes(seed=71), blank)
        assert empty.status_code == 422, empty.text
        assert empty.json() == {"detail": "question: must not be empty", "error_type": "InvalidJob"}
    no_question = httpx.post(f"{server.url}/jobs", files={"image": ("page.png", png_bytes(seed=71), "image/png")},
                             timeout=30)
    assert no_question.status_code == 422 and no_question.json()["detail"] == "question: must not be empty"
    no_image = httpx.post(f"{server.url}/jobs", data={"question": "Where is the image?"}, timeout=30)
    assert no_image.status_code == 422 and no_image.json()["detail"].startswith("image: is required")

    corrupt = post_job(server, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "Readable?")
    assert corrupt.status_code == 422 and corrupt.json()["detail"].startswith("image: cannot be decoded")

    tokens = post_job(server, png_bytes(seed=72), "Too long", max_new_tokens=10**6)
    assert tokens.status_code == 422 and tokens.json()["detail"].startswith("max_new_tokens: must be from 1 to")


def test_oversized_upload_is_413_with_its_real_size(server):
    from glyphq.celeryconfig import settings

    size = settings.max_image_bytes + 5 * 1024 * 1024
    response = post_job(server, b"\x89PNG" + b"\x00" * (size - 4), "Too big?")
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == (f"image: is {size} bytes; the limit is {settings.max_image_bytes} "
                                         "(GLYPHQ_MAX_IMAGE_BYTES)")


def test_unknown_job_is_404_and_the_server_never_loads_torch(server):
    assert httpx.get(f"{server.url}/jobs/never-submitted-1", timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/jobs/bad%20id!", timeout=30).status_code == 404
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps


def test_unreachable_redis_is_a_fast_503(tmp_path):
    down = Server(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "uvicorn-down.log")
    try:
        for request in (lambda: post_job(down, png_bytes(seed=73), "Anyone there?"),
                        lambda: httpx.get(f"{down.url}/jobs/some-job", timeout=30)):
            started = time.monotonic()
            response = request()
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert "cannot reach Redis" in response.json()["detail"]
            assert response.json()["error_type"] == "BrokerUnavailable" and response.headers["Retry-After"]
            assert elapsed < 1.5, f"503 after {elapsed:.1f} s"
    finally:
        down.stop()
