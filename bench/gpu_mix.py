"""A realistic mix on the H200: continuous batching through the queue, beside static micro-batching and in process.

    python3 bench/gpu_mix.py --out DIR [--phases inprocess,queue,static] [--static-tree DIR] [--jobs 480]

Everything runs at default settings on the ``glyph-9b`` preset (built into ``--model-dir`` if missing).

- **Backlog** (``--jobs``): pages from 50x50 to 4000x3000, landscape and portrait, PNG and JPEG,
  priorities 0-8, each with its own answer length drawn from a lognormal (median 200 new tokens,
  sigma 1.2, at most 6,400: past the default thinking budget of 6,144). Random weights never end a
  turn, so a job's ``max_new_tokens`` is its drawn length: it ends there in every path compared.
- **Probes**: six priority-9 jobs of 32 new tokens, one every 2 s while the backlog runs.
- **Variance**: 96 pages of 1280x720 whose lengths are lognormal (median 182, sigma 1, at most 1,024),
  submitted at once in arrival order.
- **Trickle**: Poisson arrivals at 2.5 jobs/s for 40 s on an idle worker, mixed pages, 64 new tokens each.
- **Soak** (``--soak N``): N backlog jobs in one run with recycling at its default, then GPU memory.

Phases: ``inprocess`` (the engine in this process: decode step at batch 1, the backlog with every
job added at once), ``queue`` (this tree's worker, a real redis-server), ``static`` (the same
workloads on the worker of ``--static-tree``, the previous tree: static micro-batches). Writes
``h200_mix.json`` (the issue's keys) and ``h200_mix_detail.json`` into ``--out`` after every phase.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import recycle_downtimes  # noqa: E402
from bench.gpu_soak import collect, ensure_preset, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(50, 50), (320, 240), (640, 480), (800, 1100), (1280, 720), (1654, 2339), (1920, 1080), (2480, 3508),
         (3000, 2000), (4000, 3000), (720, 1280), (1200, 1600)]
KEYS = ("mix_jobs_s", "mix_useful_tok_s", "mix_static_jobs_s", "variance_useful_tok_s", "variance_static_useful_tok_s",
        "urgent_latency_p99_s", "trickle_latency_p99_s", "queue_vs_inprocess_mix", "decode_ms_per_step_b1",
        "recycle_downtime_s", "jobs", "lost", "run_twice", "git_sha")


def image_bytes(size: tuple[int, int], seed: int, fmt: str) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for line in range(max(1, min(40, size[1] // 30))):
        draw.text((10, 10 + 28 * line), f"Invoice {seed} line {line}: total {seed * 7 + line} EUR", fill="black")
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return out.getvalue()


def lognormal(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, int(round(math.exp(math.log(median) + sigma * rng.gauss(0, 1))))))


def backlog(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    images = {}
    jobs = []
    for i in range(count):
        size = SIZES[rng.randrange(len(SIZES))]
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        key = (size, i % 6, fmt)
        if key not in images:
            images[key] = image_bytes(size, i % 6, fmt)
        jobs.append({"image": images[key], "size": size, "question": f"What is the total on invoice {i}?",
                     "tokens": lognormal(rng, 200, 1.2, 6400), "priority": rng.randrange(9)})
    return jobs


def variance_jobs(count: int = 96, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    pages = [image_bytes((1280, 720), s, "PNG") for s in range(8)]
    return [{"image": pages[i % 8], "size": (1280, 720), "question": f"Summarise invoice {i}.",
             "tokens": lognormal(rng, 182, 1.0, 1024), "priority": 5} for i in range(count)]


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)], 3)


# -- in process -------------------------------------------------------------------------------------

def in_process(args: argparse.Namespace, figures: dict, detail: dict, jobs: list[dict]) -> None:
    import torch
    from PIL import Image

    from glyphq.celeryconfig import Settings
    from glyphq.worker.continuous import Continuous
    from glyphq.worker.engine import EngineJob, load
    from glyphq.worker.slots import Admission

    settings = Settings.from_env({**os.environ, "GLYPHQ_MODEL": args.model_dir})
    started = time.perf_counter()
    engine = load(settings)
    detail["load_s"] = round(time.perf_counter() - started, 1)
    decoder = engine.slots
    detail["max_batch"] = settings.max_batch
    detail["slot_cache_gb"] = round(sum(t.numel() * t.element_size() for layer in decoder.cache.layers
                                        for t in (layer.keys, layer.values)) / 1e9, 2)

    def engine_job(job: dict) -> EngineJob:
        return EngineJob([Image.open(io.BytesIO(job["image"])).convert("RGB")], job["question"], job["tokens"])

    started = time.perf_counter()
    warm = Continuous(engine, settings.max_image_size)
    for i, job in enumerate(jobs[:settings.max_batch]):
        warm.add(i, EngineJob(engine_job(job).images, job["question"], 64))
    warm.run()
    detail["inprocess_warmup_s"] = round(time.perf_counter() - started, 1)

    # One decode step at batch 1 and at the full batch, in the bucket a 1280x720 page starts in.
    page = Image.open(io.BytesIO(image_bytes((1280, 720), 0, "PNG"))).convert("RGB")
    prompt = engine.process(EngineJob([page], "What is the total?", 8), [page])
    length = prompt["input_ids"].shape[1] + 512
    steps: dict[str, float] = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for rows in sorted({1, min(16, settings.max_batch), settings.max_batch}):
        decoder.admit([Admission(slot, prompt) for slot in range(rows)])
        decoder.decode(rows, length, 4)
        best = 1e9
        for _ in range(3):
            sync()
            t = time.perf_counter()
            decoder.decode(rows, length, 64)
            sync()
            best = min(best, (time.perf_counter() - t) / 64 * 1000)
        steps[f"b{rows}"] = round(best, 3)
        for slot in range(rows):
            decoder.release(slot)
    detail["decode_ms_per_step"] = steps
    figures["decode_ms_per_step_b1"] = steps["b1"]
    engine.cleanup()

    running = Continuous(engine, settings.max_image_size)
    for i, job in enumerate(jobs):
        running.add(i, engine_job(job), priority=8 - job["priority"])
    started = time.perf_counter()
    done = running.run()
    wall = time.perf_counter() - started
    ok = [f.outcome for f in done if not isinstance(f.outcome, BaseException)]
    detail["inprocess_mix"] = {"jobs": len(ok), "failed": len(done) - len(ok), "wall_s": round(wall, 1),
                               "jobs_s": round(len(ok) / wall, 3),
                               "useful_tok_s": round(sum(r.tokens_out for r in ok) / wall, 1)}
    print("in process:", json.dumps(detail["inprocess_mix"]), "steps:", steps, flush=True)
    del running, warm, engine, decoder
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- through a worker -------------------------------------------------------------------------------

@contextmanager
def redis_and_worker(tree: Path, env: dict[str, str], name: str) -> Iterator[Path]:
    """A redis-server on the broker's port and ``celery -A glyphq.tasks worker`` run from ``tree``; yields its log."""
    port = int(env["GLYPHQ_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
    workdir = Path(tempfile.mkdtemp(prefix=f"glyphq-{name}-"))
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    log_path = workdir / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker", "-l", "info", "-n",
                                   f"{name}@%h", "--without-mingle", "--without-gossip"], cwd=tree, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield log_path
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            redis_proc.kill()
            redis_proc.wait(10)


def run_worker_phase(args: argparse.Namespace, label: str, tree: Path, figures: dict, detail: dict,
                     jobs: list[dict]) -> None:
    """Backlog with probes, the variance set, the trickle, on the worker of ``tree``."""
    from glyphq.producer import submit

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}"}
    with redis_and_worker(tree, env, label) as log_path:
        try:
            _worker_workloads(args, label, figures, detail, jobs, submit)
        finally:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, Path(args.out) / f"worker_{label}.log")
            if label == "queue":
                downtimes = recycle_downtimes(log_path.read_text(errors="replace"))
                detail["recycle_downtimes_s"] = downtimes
                if downtimes:
                    figures["recycle_downtime_s"] = max(downtimes)


def latency_s(handle, sent: float) -> float:  # noqa: ANN001
    """Seconds from ``sent`` (time.time() at submit) to the moment the job's result was stored."""
    from datetime import timezone

    from glyphq.tasks.app import app

    handle.result(timeout=300)
    done = app.AsyncResult(handle.id).date_done
    if done.tzinfo is None:
        done = done.replace(tzinfo=timezone.utc)
    return float(done.timestamp() - sent)


def _submit(submit, job: dict, priority: int | None = None, tokens: int | None = None):  # noqa: ANN001
    return submit(job["image"], job["question"], max_new_tokens=tokens or job["tokens"],
                  priority=job["priority"] if priority is None else priority)


def _worker_workloads(args, label, figures, detail, jobs, submit) -> None:  # noqa: ANN001
    from glyphq.celeryconfig import settings
    from glyphq.producer.store import Store

    started = time.monotonic()
    warm = [_submit(submit, job, tokens=64) for job in jobs[:32]]
    collect(warm, 400, started)
    detail[f"{label}_warmup_s"] = round(time.monotonic() - started, 1)

    handles = [_submit(submit, job) for job in jobs]
    started = time.monotonic()
    probes: list[tuple[float, object]] = []

    def send_probes() -> None:
        for i in range(6):
            time.sleep(2.0)
            sent = time.time()
            probes.append((sent, _submit(submit, jobs[i], priority=9, tokens=32)))

    thread = threading.Thread(target=send_probes, daemon=True)
    thread.start()
    finished_at: list[float] = []
    results, failures = collect(handles, args.budget_s, started,
                                after_each=lambda done: finished_at.append(time.monotonic() - started))
    wall = time.monotonic() - started
    thread.join()
    latencies = [latency_s(handle, sent) for sent, handle in probes]
    store = Store(settings)
    runs = [store.runs(h.id) for h in handles[:len(results)]]
    detail[f"{label}_mix"] = {"jobs": len(results), "failed": len(failures), "wall_s": round(wall, 1),
                              "jobs_s": round(len(results) / wall, 3),
                              "useful_tok_s": round(sum(r["tokens_out"] for r in results) / wall, 1),
                              "urgent_latencies_s": [round(x, 3) for x in latencies],
                              "first_90pct_jobs_s": _first_90(finished_at, len(handles)),
                              "runs_max": max(runs) if runs else None, "failures_sample": failures[:2]}
    print(label, "mix:", json.dumps(detail[f"{label}_mix"]), flush=True)
    if label == "queue":
        figures.update(mix_jobs_s=detail["queue_mix"]["jobs_s"], mix_useful_tok_s=detail["queue_mix"]["useful_tok_s"],
                       urgent_latency_p99_s=p99(latencies), jobs=len(jobs),
                       lost=len(jobs) - len(results) - len(failures), run_twice=sum(1 for r in runs if r > 1))
    else:
        figures["mix_static_jobs_s"] = detail[f"{label}_mix"]["jobs_s"]
        detail["static_urgent_latency_p99_s"] = p99(latencies)

    if label == "static" and args.static_mix_only:
        return
    variance = variance_jobs()
    handles = [_submit(submit, job) for job in variance]
    started = time.monotonic()
    results, _ = collect(handles, args.budget_s, started)
    wall = time.monotonic() - started
    useful = round(sum(r["tokens_out"] for r in results) / wall, 1)
    figures["variance_useful_tok_s" if label == "queue" else "variance_static_useful_tok_s"] = useful
    print(label, "variance useful tok/s:", useful, flush=True)

    if args.trickle_s > 0:
        rng = random.Random(7)
        handles, sent_at = [], []
        end = time.monotonic() + args.trickle_s
        i = 0
        while time.monotonic() < end:
            time.sleep(rng.expovariate(2.5))
            sent_at.append(time.time())
            handles.append(_submit(submit, jobs[i % len(jobs)], priority=5, tokens=64))
            i += 1
        latencies = [latency_s(handle, sent) for handle, sent in zip(handles, sent_at, strict=True)]
        key = "trickle_latency_p99_s" if label == "queue" else "static_trickle_latency_p99_s"
        (figures if label == "queue" else detail)[key] = p99(latencies)
        detail[f"{label}_trickle_jobs"] = len(handles)
        print(label, "trickle p99:", p99(latencies), flush=True)

    if label == "queue" and args.soak > 0:
        soak = backlog(args.soak, seed=11)
        handles = [_submit(submit, job) for job in soak]
        started = time.monotonic()
        results, failures = collect(handles, args.budget_s, started)
        runs = [store.runs(h.id) for h in handles[:len(results)]]
        detail["soak"] = {"jobs": len(soak), "answered": len(results), "failed": len(failures),
                          "wall_s": round(time.monotonic() - started, 1), "run_twice": sum(1 for r in runs if r > 1),
                          "reserved_mb_last": results[-1]["gpu"] if results else None}
        print("soak:", json.dumps(detail["soak"]), flush=True)


def _first_90(finished_at: list[float], count: int) -> float | None:
    """Jobs per second until 90% of the backlog was answered (results are collected in submit order,
    so this is when the 90%-th job in that order had its result): the rate before the longest tail."""
    target = int(0.9 * count)
    if len(finished_at) < target or target == 0:
        return None
    return round(target / max(finished_at[:target]), 3)


def write(out: Path, figures: dict, detail: dict) -> None:
    if figures.get("mix_jobs_s") and detail.get("inprocess_mix"):
        figures["queue_vs_inprocess_mix"] = round(figures["mix_jobs_s"] / detail["inprocess_mix"]["jobs_s"], 3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "h200_mix.json").write_text(json.dumps({key: figures.get(key) for key in KEYS}, indent=2))
    (out / "h200_mix_detail.json").write_text(json.dumps(detail, indent=2, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--phases", default="inprocess,queue,static")
    parser.add_argument("--static-tree", default="")
    parser.add_argument("--jobs", type=int, default=480)
    parser.add_argument("--trickle-s", type=float, default=40)
    parser.add_argument("--soak", type=int, default=0)
    parser.add_argument("--static-mix-only", action="store_true", help="the static path runs the backlog only")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--git-sha", default=os.environ.get("GIT_SHA", "unknown"))
    parser.add_argument("--merge", default="", help="an earlier h200_mix_detail.json/h200_mix.json folder to add to")
    args = parser.parse_args()
    os.environ.setdefault("GLYPHQ_METRICS_PORT", "0")
    # One broker port for every phase (each starts its own redis-server there), set before the
    # producer's settings are read.
    os.environ["GLYPHQ_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    os.environ.setdefault("GLYPHQ_COMPILE_CACHE_DIR", "/tmp/glyphq-inductor")  # later children start warm
    out = Path(args.out)
    figures: dict = {"git_sha": args.git_sha}
    detail: dict = {}
    if args.merge:
        figures.update({k: v for k, v in json.loads((Path(args.merge) / "h200_mix.json").read_text()).items()
                        if v is not None})
        detail.update(json.loads((Path(args.merge) / "h200_mix_detail.json").read_text()))
        figures["git_sha"] = args.git_sha
    started = time.perf_counter()
    ensure_preset(args.model_dir)
    detail["build_s"] = round(time.perf_counter() - started, 1)
    jobs = backlog(args.jobs)
    detail["backlog_tokens"] = {"median": sorted(j["tokens"] for j in jobs)[len(jobs) // 2],
                                "mean": round(sum(j["tokens"] for j in jobs) / len(jobs), 1),
                                "max": max(j["tokens"] for j in jobs)}
    phases = args.phases.split(",")
    for phase in phases:
        t = time.perf_counter()
        try:
            if phase == "inprocess":
                in_process(args, figures, detail, jobs)
            elif phase == "queue":
                run_worker_phase(args, "queue", ROOT, figures, detail, jobs)
            elif phase == "static":
                run_worker_phase(args, "static", Path(args.static_tree), figures, detail, jobs)
        except Exception as exc:  # keep what the other phases measured
            detail[f"{phase}_error"] = f"{type(exc).__name__}: {exc}"
            print(phase, "failed:", detail[f"{phase}_error"], flush=True)
        detail[f"{phase}_phase_s"] = round(time.perf_counter() - t, 1)
        write(out, figures, detail)
    print("\nA realistic mix on the H200 (glyph-9b, default settings)")
    for key in KEYS:
        print(f"  {key:<30} {figures.get(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
