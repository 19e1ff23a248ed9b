"""What a queued job costs in Redis memory, for sizing ``maxmemory``.

Starts a redis-server of its own (no persistence), then, with no worker, submits through the real
``submit``:

- ``messages``: N jobs that all share one image, so the blob is stored once: the cost of a message,
  its id claim and its reference to the blob;
- ``pages``: N jobs, each with its own 1280x720 screenshot-like PNG: a typical image job;
- ``results``: N results of the shape a worker stores (a 64-token answer, with the request's
  arguments as ``result_extended`` keeps them), through Celery's result backend.

Prints one table and writes ``--out`` (JSON). Run: ``python bench/redis_memory.py --out bench/results``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _screenshot(seed: int) -> bytes:
    """A 1280x720 PNG with text-like rows, about as large as a real screenshot of a document."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1280, 720), "white")
    draw = ImageDraw.Draw(image)
    for row in range(40):
        y = 12 + row * 17
        for word in range((seed + row) % 7 + 6):
            x = 20 + word * 95 + (seed * 13 + row * 7) % 40
            draw.text((x, y), f"w{seed}{row}{word}", fill=(20, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _used(client) -> int:
    return int(client.info("memory")["used_memory"])


def measure(jobs: int) -> dict:
    import redis

    port = _free_port()
    folder = tempfile.mkdtemp(prefix="glyphq-redis-memory-")
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        os.environ["GLYPHQ_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
        from glyphq.producer import submit
        from glyphq.producer.schema import ANSWER_TASK, JobMessage
        from glyphq.tasks.app import app

        shared = _screenshot(0)
        base = _used(client)
        for i in range(jobs):
            submit(shared, f"What does line {i} say?", job_id=f"m{i}")
        messages = _used(client) - base

        images = [_screenshot(i + 1) for i in range(jobs)]
        base = _used(client)
        for i, image in enumerate(images):
            submit(image, f"What does page {i} say?", job_id=f"p{i}")
        pages = _used(client) - base
        mean_png = sum(len(image) for image in images) / jobs

        result = {"job_id": "x" * 32, "answer": "word " * 48, "reasoning": None, "finish_reason": "stop",
                  "model": "zai-org/Glyph", "tokens_in": 1230, "tokens_out": 64, "vision_tokens": 1196,
                  "image_size": [1280, 720], "image_size_used": [1280, 720],
                  "timings": {"queue_s": 1.2345, "preprocess_s": 0.0123, "generate_s": 0.8765, "cleanup_s": 0.0012},
                  "gpu": {"peak_mb": 30000.0, "reserved_mb": 30100.0, "allocated_mb": 19200.0},
                  "worker": {"pid": 12345, "task_index": 17, "batch_size": 16}, "session": None}
        # result_extended stores the request's name, arguments and worker beside the result.
        message = JobMessage(image_keys=("glyphq:blob:" + "0" * 64,), image_sizes=((1280, 720),), image_bytes=62_000,
                             question="What does page 7 say about the total?", max_new_tokens=256, session=None,
                             submitted_at=time.time())
        request = SimpleNamespace(task=ANSWER_TASK, args=[], kwargs={"job": message.to_dict()},
                                  hostname="gpu0@host", retries=0, delivery_info={"routing_key": "gpu"},
                                  children=[], group=None, parent_id=None, ignore_result=False)
        base = _used(client)
        for i in range(jobs):
            app.backend.store_result(f"r{i}", result, "SUCCESS", request=request)
        results = _used(client) - base
        result_json = len(json.dumps(result))
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "jobs": jobs,
        "message_bytes_per_job": round(messages / jobs),
        "image_job_bytes_per_job": round(pages / jobs),
        "mean_png_bytes": round(mean_png),
        "overhead_per_image_job": round(pages / jobs - mean_png),
        "result_bytes_per_job": round(results / jobs),
        "result_json_bytes": result_json,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    figures = measure(args.jobs)
    figures["machine"] = f"{platform.node()} ({os.cpu_count()} cores), {platform.python_version()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "redis_memory.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("| figure | bytes |\n| --- | --- |")
    for name, value in figures.items():
        if name not in ("jobs", "machine"):
            print(f"| {name} | {value:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
