"""A producer in its own process, for tests whose Redis is not the session's.

The test process imports ``celeryconfig`` once, pointed at the session's redis-server. A test with its
own redis-server runs this script with ``GLYPHQ_BROKER_URL`` (and any other ``GLYPHQ_*`` setting) in
its environment, exactly as a web backend would, and talks to it in JSON lines on stdin/stdout:

    {"op": "submit", "seed": 1, "question": "q", "max_new_tokens": 4}   -> {"ok": true, "job_id": ...}
    ("size": [w, h] sets the image's size, "noise": true makes it random pixels, "job_id" names the job,
    "session" makes it a turn of that session)
    {"op": "result", "job_id": "...", "timeout": 60}                      -> {"ok": true, "result": {...}}
    {"op": "state", "job_id": "..."}                                      -> {"ok": true, "state": "..."}
    {"op": "exit"}

Errors come back as ``{"ok": false, "error_type": <exception class>, "message": ...}``; a failed job
also gives ``job_error_type`` (``JobFailed.error_type``). Every reply carries ``elapsed``: the
seconds the call took.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _png_bytes():
    spec = importlib.util.spec_from_file_location("glyphq_tests_conftest", HERE.parent / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.png_bytes


def _noise_png(size: tuple[int, ...]) -> bytes:
    import io
    import os

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (size[0], size[1]), os.urandom(size[0] * size[1] * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    from glyphq.producer import Job, JobFailed, submit

    png_bytes = _png_bytes()
    images: dict[tuple[int, int, int], bytes] = {}

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "submit":
            size = tuple(request.get("size", (64, 48)))
            key = (request.get("seed", 0), size[0], size[1])
            if request.get("noise"):  # incompressible: the PNG is about 3 bytes a pixel
                images[key] = _noise_png(size)
            elif key not in images:
                images[key] = png_bytes(size, seed=key[0])
            job = submit(images[key], request.get("question", "What is this?"),
                         max_new_tokens=request.get("max_new_tokens", 4), job_id=request.get("job_id"),
                         session=request.get("session"))
            return {"job_id": job.id}
        if op == "result":
            job = Job(request["job_id"])
            try:
                value = job.result(timeout=request.get("timeout", 60))
            except JobFailed as exc:
                return {"ok": False, "error_type": "JobFailed", "job_error_type": exc.error_type,
                        "message": str(exc)}
            if not isinstance(value, dict):  # Job.result must return the result dict, nothing else
                return {"ok": False, "error_type": "NotAResult", "state": job.state,
                        "message": f"Job.result returned {type(value).__name__}: {value!r}"}
            return {"result": value}
        if op == "state":
            return {"state": Job(request["job_id"]).state}
        raise ValueError(f"unknown op {op!r}")

    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        start = time.monotonic()
        try:
            reply = {"ok": True, **handle(request)}
        except Exception as exc:  # every failure goes back to the test, which asserts on it
            reply = {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}
        reply["elapsed"] = round(time.monotonic() - start, 3)
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
