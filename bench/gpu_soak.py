"""GPU soak: a real worker on the Glyph-size model answers a long queue with recycling; nothing lost.

    python3 bench/gpu_soak.py --out DIR [--jobs 1000] [--per-child 50] [--budget-s 480]

Starts its own redis-server and a real ``celery -A glyphq.tasks worker`` (prefork, concurrency 1) on the
``glyph-9b`` preset (built into --model-dir if missing), enqueues ``--jobs`` page images of mixed
sizes, and waits for every result. Prints one table and writes ``gpu_soak.json`` into ``--out``:
jobs answered, lost and run twice, recycles, the band of reserved GPU memory after cleanup as a
share of the weights, and the parent's RSS at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Mixed page sizes, kept small so that 1,000 jobs fit in one 10-minute run on the GPU host.
SIZES = [(448, 448), (640, 360), (560, 420), (392, 560)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_preset(model_dir: str | Path, preset: str = "glyph-9b") -> None:
    """Build ``preset`` (a ``worker.tiny`` preset) into ``model_dir`` unless a model is there already."""
    if not (Path(model_dir) / "config.json").exists():
        subprocess.run([sys.executable, "-m", "glyphq.worker.tiny", str(model_dir), "--preset", preset], check=True,
                       cwd=ROOT)


def fresh_process(script: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    """Run ``script`` with ``args`` in a new Python process; its last JSON line, or ``{"error": ...}``.

    ``env`` is added to this process's environment.
    """
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout or "no output")[-3000:]}
    return dict(json.loads(lines[-1]))


def collect(handles: list, budget_s: float, start: float, after_each=None) -> tuple[list, list[str]]:  # noqa: ANN001
    """Wait for each job's result in order until ``budget_s`` after ``start``: (results, failure messages).

    Stops at the first job still unfinished when the budget runs out. ``after_each(results)`` is
    called after each job that finished.
    """
    from glyphq.producer import GlyphqError, JobTimeout

    results: list = []
    failures: list[str] = []
    for handle in handles:
        remaining = budget_s - (time.monotonic() - start)
        if remaining <= 0:
            break
        try:
            results.append(handle.result(timeout=remaining))
        except JobTimeout:
            break
        except GlyphqError as exc:
            failures.append(str(exc))
        if after_each is not None:
            after_each(results)
    return results, failures


def page(size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for line in range(12):
        draw.text((20, 20 + 24 * line), f"Invoice {seed} line {line}: total {seed * 7 + line} EUR", fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--per-child", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=480)
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    ensure_preset(model_dir)
    port = free_port()
    env = {**os.environ, "GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{port}/0", "GLYPHQ_MODEL": str(model_dir),
           "GLYPHQ_MAX_TASKS_PER_CHILD": str(args.per_child), "PYTHONUNBUFFERED": "1"}
    os.environ.update(env)  # the producer below reads the same settings
    with redis_and_worker(port, env, "soak") as (worker, log_path):
        return run(args, worker, log_path)


@contextmanager
def redis_and_worker(port: int, env: dict[str, str], name: str,
                     tree: Path = ROOT) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A redis-server on ``port`` and a real celery worker of ``tree`` (this checkout by default) with
    ``env``, stopped on exit.

    Yields the worker process and the path of its log.
    """
    with redis_server(port) as workdir, celery_worker(env, name, workdir, tree) as started:
        yield started


@contextmanager
def redis_server(port: int) -> Iterator[Path]:
    """A redis-server on ``port``, killed on exit; yields a fresh folder for logs."""
    workdir = Path(tempfile.mkdtemp(prefix=f"glyphq-redis{port}-"))
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield workdir
    finally:
        redis_proc.kill()
        redis_proc.wait(10)


@contextmanager
def celery_worker(env: dict[str, str], name: str, log_dir: Path, tree: Path = ROOT, queues: str | None = None,
                  concurrency: int | None = None, grace_s: float = 60) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A real celery worker of ``tree`` with ``env`` (``-Q queues``, ``-c concurrency`` if given), its log
    ``log_dir/<name>.log``; stopped on exit: SIGTERM (a GPU worker finishes the answers it runs), then
    SIGKILL to its whole process group after ``grace_s``. Yields it and its log path."""
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "celery", "-A", app_module(tree), "worker", "-l", "info", "-n", f"{name}@%h",
           "--without-mingle", "--without-gossip"]
    cmd += ["-Q", queues] if queues else []
    cmd += ["-c", str(concurrency)] if concurrency else []
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield worker, log_path
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)
            _wait_group_gone(worker.pid, 30)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no live process of the group is left (a GPU child frees its memory only when it is
    gone); zombies count as gone, as a container's first process may never reap them."""
    import psutil

    def live() -> bool:
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                    return True
        return False

    deadline = time.monotonic() + timeout_s
    while live():
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.1)


def app_module(tree: Path) -> str:
    """The Celery app of a tree: ``glyphq.tasks``, or ``tasks`` in a tree from before the package."""
    return "glyphq.tasks" if (tree / "__init__.py").exists() else "tasks"


def run(args: argparse.Namespace, worker: subprocess.Popen, log_path: Path) -> int:
    import psutil

    from glyphq.celeryconfig import settings
    from glyphq.producer import submit
    from glyphq.producer.store import Store

    start = time.monotonic()
    images = {(size, seed % 8): page(size, seed % 8) for seed in range(8) for size in SIZES}
    jobs = [submit(images[(SIZES[i % len(SIZES)], i % 8)], f"What is the total on invoice {i}?",
                   max_new_tokens=args.max_new_tokens) for i in range(args.jobs)]
    parent = psutil.Process(worker.pid)
    rss: list[float] = []

    def sample(results: list) -> None:
        if len(results) % 50 == 1:
            rss.append(parent.memory_info().rss / 2**20)
        if len(results) % 100 == 0:
            print(f"{len(results)} answered after {time.monotonic() - start:.0f} s", flush=True)

    results, failures = collect(jobs, args.budget_s, start, sample)
    wall = time.monotonic() - start
    store = Store(settings)
    runs = [store.runs(job.id) for job in jobs[: len(results) + len(failures)]]
    reserved = [r["gpu"]["reserved_mb"] for r in results if r["gpu"]]
    weights_mb = 20.59e9 / 2**20
    figures = {
        "jobs_submitted": len(jobs),
        "jobs_answered": len(results),
        "jobs_failed": len(failures),
        "jobs_unfinished_in_budget": len(jobs) - len(results) - len(failures),
        "run_twice": sum(1 for n in runs if n > 1),
        "recycles": len({r["worker"]["pid"] for r in results}) - 1,
        "max_task_index": max((r["worker"]["task_index"] for r in results), default=0),
        "reserved_mb_min": min(reserved, default=None),
        "reserved_mb_max": max(reserved, default=None),
        "reserved_band_pct": round((max(reserved) - min(reserved)) / weights_mb * 100, 3) if reserved else None,
        "cleanup_ms_median": round(sorted(r["timings"]["cleanup_s"] for r in results)[len(results) // 2] * 1000, 2)
        if results else None,
        "job_s_median": round(sorted(r["timings"]["generate_s"] + r["timings"]["preprocess_s"]
                                     for r in results)[len(results) // 2], 3) if results else None,
        "parent_rss_mb_first": round(rss[0], 1) if rss else None,
        "parent_rss_mb_last": round(rss[-1], 1) if rss else None,
        "wall_s": round(wall, 1),
        "failures_sample": failures[:3],
        "worker_log_errors": [line for line in log_path.read_text(errors="replace").splitlines()
                              if "ERROR" in line][:5],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_soak.json").write_text(json.dumps(figures, indent=2))
    width = max(len(k) for k in figures)
    print(f"\nGPU soak: glyph-9b, {args.per_child} jobs per child, max_new_tokens {args.max_new_tokens}")
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value}")
    return 0 if not failures and figures["run_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
