"""Soak: thousands of jobs through a real redis-server and a real worker on the tiny model.

The worker replaces its child every ``--max-tasks-per-child`` jobs. The run checks that no job is lost
or run twice (every ``glyphq:runs:<id>`` counter is 1), that the worker's main process keeps its
resident memory (within ``--rss-tolerance`` of its size after the warm-up), and that once results,
blobs and sessions have expired (after ``--ttl`` seconds) Redis holds as many keys as before the run.

Everything it needs it starts itself: a redis-server on a free port, the tiny model (``python -m
worker.tiny``) and ``celery -A glyphq.tasks worker``. The producer is this process, with the same settings.

Run from the repository root:  python -m bench.soak [--jobs 20000]
Prints one table and writes bench/results/soak.json. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also runnable as ``python bench/soak.py``
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "soak.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png(seed: int) -> bytes:
    """A small PNG that differs for every seed, so every job has a blob of its own."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 64), (seed % 251, seed // 251 % 251, 200))
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), str(seed), fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for(condition, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Sampler(threading.Thread):
    """Samples the worker main process's RSS and Redis's key count every ``interval`` seconds."""

    def __init__(self, pid: int, client: Any, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.client = client
        self.interval = interval
        self.phase = "warmup"
        self.samples: list[dict[str, Any]] = []
        self._done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._done.is_set():
            with contextlib.suppress(Exception):
                children = self.process.children()
                self.samples.append({
                    "t": round(time.monotonic() - start, 2),
                    "phase": self.phase,
                    "parent_rss_mb": round(self.process.memory_info().rss / 2**20, 1),
                    "child_rss_mb": round(sum(c.memory_info().rss for c in children) / 2**20, 1),
                    "keys": int(self.client.dbsize()),
                })
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(10)


#: With ``--repeat-pages``: the start of every question, long enough that a prompt fills a KV cache
#: block with the page, so that later jobs about the same page share it (docs/documents.md).
PREAMBLE = " ".join(["Read the page with care, line by line, and answer from what it shows."] * 5)


def run_jobs(count: int, first_seed: int, in_flight: int, max_new_tokens: int, client: Any,
             job_timeout: float, repeat_pages: int = 0) -> list[dict[str, Any]]:
    """Submit ``count`` jobs, at most ``in_flight`` unanswered at once; return one record per job.
    With ``repeat_pages`` the jobs ask about that many pages in turn, after ``PREAMBLE``.

    Each job's result and runs counter are read as soon as it is answered, well within their TTL.
    """
    from glyphq.producer import JobFailed, JobTimeout, submit
    from glyphq.producer.store import runs_key

    records: list[dict[str, Any]] = []
    pending: collections.deque = collections.deque()

    def collect() -> None:
        seed, job, submitted = pending.popleft()
        record: dict[str, Any] = {"seed": seed, "job_id": job.id}
        try:
            result = job.result(timeout=job_timeout)
            record.update(outcome="answered", latency_s=time.monotonic() - submitted,
                          pid=result["worker"]["pid"], task_index=result["worker"]["task_index"],
                          tokens_in=result["tokens_in"],
                          prefix_cached_tokens=result["timings"].get("prefix_cached_tokens", 0))
        except JobFailed as exc:
            record.update(outcome="failed", error=f"{exc.error_type}: {exc.message}")
        except JobTimeout:
            record.update(outcome="lost")
        record["runs"] = int(client.get(runs_key(job.id)) or 0)
        records.append(record)

    for seed in range(first_seed, first_seed + count):
        while len(pending) >= in_flight:
            collect()
        session = f"soak-session-{seed % 7}" if seed % 10 == 0 else None
        question = f"Question {seed}: what does the picture show?"
        if repeat_pages:
            question = f"{PREAMBLE} {question}"
        job = submit(png(seed % repeat_pages if repeat_pages else seed), question, max_new_tokens=max_new_tokens,
                     priority=seed % 10, session=session)
        pending.append((seed, job, time.monotonic()))
    while pending:
        collect()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000, help="jobs after the warm-up (default 20000)")
    parser.add_argument("--warmup", type=int, default=100, help="jobs before memory is measured (default 100)")
    parser.add_argument("--max-tasks-per-child", type=int, default=50, help="GLYPHQ_MAX_TASKS_PER_CHILD (50)")
    parser.add_argument("--ttl", type=int, default=60,
                        help="GLYPHQ_RESULT_EXPIRES, GLYPHQ_BLOB_TTL and GLYPHQ_SESSION_TTL in seconds (60)")
    parser.add_argument("--in-flight", type=int, default=64, help="most unanswered jobs at once (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens per answer (default 8)")
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS change (default 0.10)")
    parser.add_argument("--model", help="model directory (default: build the tiny model)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--repeat-pages", type=int, default=0,
                        help="ask about this many pages in turn, so the worker's caches of pages read before serve "
                             "(default 0: every job a page of its own)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="glyphq-soak-"))
    redis_proc = worker = log_file = None
    try:
        port = free_port()
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise RuntimeError("redis-server is not on PATH; `make redis` installs it")
        redis_proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(workdir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        wait_for(lambda: _ping(client), 20, "redis-server")

        model = args.model
        if model is None:
            model = str(workdir / "tiny-model")
            subprocess.run([sys.executable, "-m", "glyphq.worker.tiny", model], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        settings = {
            "GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "GLYPHQ_MODEL": model,
            "GLYPHQ_MAX_TASKS_PER_CHILD": str(args.max_tasks_per_child),
            "GLYPHQ_RESULT_EXPIRES": str(args.ttl),
            "GLYPHQ_BLOB_TTL": str(args.ttl),
            "GLYPHQ_SESSION_TTL": str(args.ttl),
        }
        os.environ.pop("GLYPHQ_RESULT_BACKEND", None)
        os.environ.update(settings)  # the producer in this process reads the worker's settings
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log_path = workdir / "worker.log"
        log_file = open(log_path, "wb")  # noqa: SIM115  (closed below)
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker", "-l", "info",
                                   "-n", "soak@%h", "--without-mingle", "--without-gossip"],
                                  cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: " ready." in log_path.read_text(errors="replace"), 180, "the worker")
        keys_before = int(client.dbsize())
        key_names_before = sorted(k.decode() for k in client.keys("*"))

        sampler = Sampler(worker.pid, client)
        sampler.start()
        started = time.monotonic()
        warm = run_jobs(args.warmup, 0, args.in_flight, args.max_new_tokens, client, job_timeout=300,
                        repeat_pages=args.repeat_pages)
        sampler.phase = "run"
        run_started = time.monotonic()
        records = run_jobs(args.jobs, args.warmup, args.in_flight, args.max_new_tokens, client, job_timeout=300,
                           repeat_pages=args.repeat_pages)
        run_s = time.monotonic() - run_started
        sampler.phase = "expiry"

        # Every key glyphq writes expires; wait for the last of them (a result stored just now).
        expiry_started = time.monotonic()
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: client.dbsize() <= keys_before, args.ttl + 120, "keys to expire", interval=1.0)
        expiry_s = time.monotonic() - expiry_started
        keys_after = int(client.dbsize())
        extra_keys = sorted(set(k.decode() for k in client.keys("*")) - set(key_names_before))
        sampler.stop()
        total_s = time.monotonic() - started
        log = log_path.read_text(errors="replace")
        worker_alive = worker.poll() is None
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
        if log_file is not None:
            log_file.close()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    all_records = warm + records
    received = collections.Counter(re.findall(r"glyphq\.answer\[([0-9a-f]+)\] received", log))
    rss = [s["parent_rss_mb"] for s in sampler.samples if s["phase"] == "run"]
    rss_base = rss[0] if rss else float("nan")
    answered = [r for r in records if r["outcome"] == "answered"]
    latencies = sorted(r["latency_s"] for r in answered)
    figures = {
        "jobs": len(records),
        "warmup_jobs": len(warm),
        "answered": len(answered),
        "failed": sum(r["outcome"] == "failed" for r in all_records),
        "lost": sum(r["outcome"] == "lost" for r in all_records),
        "duplicated": sum(r["runs"] != 1 for r in all_records if r["outcome"] != "lost"),
        "received_more_than_once": sum(n > 1 for n in received.values()),
        "children": len({r["pid"] for r in answered}),
        "max_task_index": max((r["task_index"] for r in answered), default=0),
        "jobs_per_s": round(len(answered) / run_s, 2),
        "prefix_cached_share": round(sum(r["prefix_cached_tokens"] for r in answered)
                                     / max(1, sum(r["tokens_in"] for r in answered)), 4),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "parent_rss_mb_after_warmup": rss_base,
        "parent_rss_mb_at_end": rss[-1] if rss else None,
        "parent_rss_mb_min": min(rss, default=None),
        "parent_rss_mb_max": max(rss, default=None),
        "parent_rss_change_max": round(max(abs(v - rss_base) for v in rss) / rss_base, 4) if rss else None,
        "child_rss_mb_max": max((s["child_rss_mb"] for s in sampler.samples), default=None),
        "redis_keys_before": keys_before,
        "redis_keys_peak": max((s["keys"] for s in sampler.samples), default=None),
        "redis_keys_after_expiry": keys_after,
        "redis_keys_left_over": extra_keys[:20],
        "seconds_to_expiry": round(expiry_s, 1),
        "run_s": round(run_s, 1),
        "total_s": round(total_s, 1),
        "worker_alive_at_end": worker_alive,
    }
    failures = [r.get("error") for r in all_records if r["outcome"] == "failed"][:10]
    checks = {
        "no job lost": figures["lost"] == 0,
        "no job failed": figures["failed"] == 0,
        "no job run twice": figures["duplicated"] == 0 and figures["received_more_than_once"] == 0,
        f"parent RSS within ±{args.rss_tolerance:.0%}": (figures["parent_rss_change_max"] is not None
                                                         and figures["parent_rss_change_max"] <= args.rss_tolerance),
        "Redis keys back to baseline": keys_after <= keys_before and not extra_keys,
        "worker still up": worker_alive,
    }

    print()
    print(f"glyphq soak: {len(records)} jobs (+{len(warm)} warm-up), max {args.max_tasks_per_child} jobs per child, "
          f"TTLs {args.ttl} s")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        if key != "redis_keys_left_over" or value:
            print(f"  {key:<{width}}  {value}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for error in failures:
        print(f"  failed job: {error}")

    output = {
        "benchmark": "soak",
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {**{k: v for k, v in settings.items() if k not in ("GLYPHQ_BROKER_URL", "GLYPHQ_MODEL")},
                     "GLYPHQ_MODEL": "tiny (python -m glyphq.worker.tiny)" if args.model is None else args.model,
                     "in_flight": args.in_flight, "max_new_tokens": args.max_new_tokens},
        "figures": figures,
        "checks": checks,
        "failed_jobs": failures,
        "samples": sampler.samples[:: max(1, len(sampler.samples) // 400)],
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            **{name: version(name) for name in ("celery", "kombu", "redis", "torch", "transformers")},
            "redis_server": subprocess.run([shutil.which("redis-server") or "redis-server", "--version"],
                                           capture_output=True, text=True).stdout.strip(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"  wrote {args.out}")
    return 0 if all(checks.values()) else 1


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001  (not up yet)
        return False


if __name__ == "__main__":
    sys.exit(main())
