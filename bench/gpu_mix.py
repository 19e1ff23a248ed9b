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
- **Soak** (phase ``soak``, ``--soak N``): N jobs of the mix on a fresh worker at default settings
  (recycling and its hand-over included): lost, run twice, recycle downtime, reserved GPU memory.

Phases: ``inprocess`` (the engine in this process: decode step at batch 1, the backlog with every
job added at once), ``queue`` (this tree's worker, a real redis-server), ``static`` (the same
workloads on the worker of ``--static-tree``, the previous tree: static micro-batches), ``soak``.
A backlog's rate is counted while it is deep: until 90% of it was answered (``deep_rate``), from the
times the results were stored, in any order. Writes ``h200_mix.json`` (the issue's keys) and
``h200_mix_detail.json`` into ``--out`` after every phase.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import recycle_downtimes  # noqa: E402
from bench.gpu_soak import ensure_preset, free_port, redis_and_worker  # noqa: E402

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


def backlog(count: int, seed: int = 0, lengths: str = "lognormal", unique: bool = False) -> list[dict]:
    """``count`` jobs of the mix; answer lengths drawn from the lognormal, or ``lengths="16,64,256"``
    (the mix first measured in issue 14's report) picked at random. The mix draws each page from 144
    (12 sizes, 6 texts, 2 formats), so pages repeat; ``unique`` gives every job a page of its own (the
    same sizes, formats and lengths), which no cache of earlier pages can serve."""
    rng = random.Random(seed)
    choices = [int(n) for n in lengths.split(",")] if lengths != "lognormal" else None
    images = {}
    jobs = []
    for i in range(count):
        size = SIZES[rng.randrange(len(SIZES))]
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        variant = 6 + i if unique else i % 6  # never one of the shared pages (0-5)
        key = (size, variant, fmt)
        if key not in images:
            images[key] = image_bytes(size, variant, fmt)
        jobs.append({"image": images[key], "size": size, "question": f"What is the total on invoice {i}?",
                     "tokens": rng.choice(choices) if choices else lognormal(rng, 200, 1.2, 6400),
                     "priority": rng.randrange(9)})
    return jobs


def variance_jobs(count: int = 96, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    pages = [image_bytes((1280, 720), s, "PNG") for s in range(8)]
    return [{"image": pages[i % 8], "size": (1280, 720), "question": f"Summarise invoice {i}.",
             "tokens": lognormal(rng, 182, 1.0, 1024), "priority": 5} for i in range(count)]


def deep_rate(done_at: list[float], tokens: list[int], count: int, limit_s: float) -> tuple[float, float, float]:
    """(jobs/s, useful tok/s, window) while the backlog of ``count`` jobs was deep: over the time until
    90% of it was answered, or until ``limit_s`` if that came first. ``done_at`` are seconds from the
    start, in any order. A finite backlog ends in a tail of its longest answers, which no batching
    shortens; the rate before it is what a queue that stays full sees."""
    order = sorted(range(len(done_at)), key=lambda i: done_at[i])
    target = max(1, int(0.9 * count))
    cutoff = done_at[order[target - 1]] if len(order) >= target else limit_s
    inside = [i for i in order if done_at[i] <= cutoff]
    if cutoff <= 0:
        return 0.0, 0.0, 0.0
    return round(len(inside) / cutoff, 3), round(sum(tokens[i] for i in inside) / cutoff, 1), round(cutoff, 1)


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

    settings = Settings.from_env({**os.environ, "GLYPHQ_MODEL": args.model_dir})
    started = time.perf_counter()
    engine = load(settings)
    detail["load_s"] = round(time.perf_counter() - started, 1)
    decoder = engine.slots
    detail["max_batch"] = settings.max_batch
    detail["pool_gb"] = round(decoder.pool_bytes() / 1e9, 2)
    detail["pool_tokens"] = decoder.pool_tokens

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
        for slot in range(rows):
            decoder.admit(slot, prompt, 600)
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
    ended: list[tuple[float, object]] = []
    while running.busy:
        for finished in running.step():
            ended.append((time.perf_counter() - started, finished.outcome))
    wall = time.perf_counter() - started
    getattr(running, "close", lambda: None)()
    ok = [(t, r) for t, r in ended if not isinstance(r, BaseException)]
    rate, tok_s, cutoff = deep_rate([t for t, _ in ok], [r.tokens_out for _, r in ok], len(jobs), wall)
    stats = running.stats.as_dict() if hasattr(running, "stats") else None
    detail["inprocess_mix"] = {"jobs": len(ok), "failed": len(ended) - len(ok), "wall_s": round(wall, 1),
                               "jobs_s": rate, "useful_tok_s": tok_s, "deep_until_s": cutoff,
                               "jobs_s_whole_run": round(len(ok) / wall, 3),
                               "useful_tok_s_whole_run": round(sum(r.tokens_out for _, r in ok) / wall, 1),
                               "time_split": stats}
    print("in process:", json.dumps(detail["inprocess_mix"]), "steps:", steps, flush=True)
    del running, warm, engine, decoder
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- through a worker -------------------------------------------------------------------------------

def broker_port() -> int:
    """The port of the broker every phase starts its own redis-server on (``main`` sets it)."""
    return int(os.environ["GLYPHQ_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])


def import_path(tree: Path) -> str:
    """What to put first on PYTHONPATH to import that tree: a folder with a ``glyphq`` link to it, or
    the tree itself for one from before the package."""
    if not (tree / "__init__.py").exists():
        return str(tree)
    folder = Path(tempfile.mkdtemp(prefix="glyphq-tree-"))
    (folder / "glyphq").symlink_to(tree.resolve())
    return str(folder)


def run_worker_phase(args: argparse.Namespace, label: str, tree: Path, figures: dict, detail: dict,
                     jobs: list[dict]) -> None:
    """Backlog with probes, the variance set, the trickle, on the worker of ``tree``."""
    from glyphq.producer import submit

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{import_path(tree)}:{os.environ.get('PYTHONPATH', '')}"}
    with redis_and_worker(broker_port(), env, label, tree=tree) as (_worker, log_path):
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


def wait_for(handles: list, budget_s: float, started: float, enough: int | None = None) -> dict[str, dict]:
    """Poll the result backend for every job (in any order) until all have ended, ``enough`` of them
    succeeded, or ``budget_s`` after ``started`` (time.monotonic()): job id -> its stored meta (status,
    date_done, result)."""
    from glyphq.tasks.app import app

    backend = app.backend
    keys = {h.id: backend.get_key_for_task(h.id) for h in handles}
    ended: dict[str, dict] = {}
    target = len(keys) if enough is None else min(enough, len(keys))
    while (len(ended) < len(keys) and sum(m["status"] == "SUCCESS" for m in ended.values()) < target
           and time.monotonic() - started < budget_s):
        pending = [task_id for task_id in keys if task_id not in ended]
        for i in range(0, len(pending), 500):
            ids = pending[i:i + 500]
            for task_id, raw in zip(ids, backend.client.mget([keys[t] for t in ids]), strict=True):
                meta = backend.decode_result(raw) if raw else None
                if meta and meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                    ended[task_id] = meta
        time.sleep(0.5)
    return ended


def done_at(meta: dict, since: float) -> float:
    """Seconds from ``since`` (time.time()) to the moment a job's outcome was stored."""
    from datetime import datetime, timezone

    done = meta["date_done"]
    stamp = datetime.fromisoformat(done) if isinstance(done, str) else done
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp() - since


def run_backlog(handles: list, budget_s: float, sent: float, started: float,
                deep_only: bool = False) -> tuple[dict, list[dict]]:
    """Wait for a submitted backlog; its figures while it was deep, and the answered results.

    ``deep_only`` stops waiting once ``deep_rate`` has what it counts (90% of the jobs answered): the
    tail of long answers after that adds nothing to the figures, only minutes."""
    ended = wait_for(handles, budget_s, started, enough=max(1, int(0.9 * len(handles))) if deep_only else None)
    ok = [meta for meta in ended.values() if meta["status"] == "SUCCESS"]
    times = [done_at(meta, sent) for meta in ok]
    tokens = [int(meta["result"]["tokens_out"]) for meta in ok]
    wall = time.monotonic() - started
    rate, tok_s, cutoff = deep_rate(times, tokens, len(handles), wall)
    return {"jobs": len(handles), "answered": len(ok), "failed": len(ended) - len(ok),
            "unfinished": len(handles) - len(ended), "wall_s": round(wall, 1), "jobs_s": rate,
            "useful_tok_s": tok_s, "deep_until_s": cutoff, "stopped_when_deep_rate_known": deep_only,
            "failures_sample": [str(m.get("result"))[:200] for m in ended.values() if m["status"] != "SUCCESS"][:2],
            }, [meta["result"] for meta in ok]


def _worker_workloads(args, label, figures, detail, jobs, submit) -> None:  # noqa: ANN001
    from glyphq.celeryconfig import settings
    from glyphq.producer.store import Store

    store = Store(settings)
    started = time.monotonic()
    warm = [_submit(submit, job, tokens=64) for job in jobs[:32]]
    wait_for(warm, 400, started)
    detail[f"{label}_warmup_s"] = round(time.monotonic() - started, 1)

    sent, started = time.time(), time.monotonic()
    handles = [_submit(submit, job) for job in jobs]
    probes: list[tuple[float, object]] = []

    def send_probes() -> None:
        for i in range(6):
            time.sleep(2.0)
            probe_sent = time.time()
            probes.append((probe_sent, _submit(submit, jobs[i], priority=9, tokens=32)))

    thread = threading.Thread(target=send_probes, daemon=True)
    thread.start()
    budget = args.budget_s if label == "queue" else args.static_budget_s
    mix, _ = run_backlog(handles, budget, sent, started)
    thread.join()
    latencies = [latency_s(handle, probe_sent) for probe_sent, handle in probes]
    runs = [store.runs(h.id) for h in handles]
    mix.update(urgent_latencies_s=[round(x, 3) for x in latencies], runs_max=max(runs),
               run_twice=sum(1 for r in runs if r > 1))
    detail[f"{label}_mix"] = mix
    print(label, "mix:", json.dumps(mix), flush=True)
    if label == "queue":
        figures.update(mix_jobs_s=mix["jobs_s"], mix_useful_tok_s=mix["useful_tok_s"],
                       urgent_latency_p99_s=p99(latencies), jobs=len(jobs))
    else:
        figures["mix_static_jobs_s"] = mix["jobs_s"]
        detail["static_urgent_latency_p99_s"] = p99(latencies)
    if mix["unfinished"]:  # the worker still holds part of the backlog: later figures would wait behind it
        detail[f"{label}_stopped_after_backlog"] = True
        return

    variance = variance_jobs()
    sent, started = time.time(), time.monotonic()
    handles = [_submit(submit, job) for job in variance]
    ended = wait_for(handles, budget, started)
    wall = max([done_at(m, sent) for m in ended.values()], default=0.0) or 1.0
    useful = round(sum(int(m["result"]["tokens_out"]) for m in ended.values() if m["status"] == "SUCCESS") / wall, 1)
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
        latencies = [latency_s(handle, at) for handle, at in zip(handles, sent_at, strict=True)]
        key = "trickle_latency_p99_s" if label == "queue" else "static_trickle_latency_p99_s"
        (figures if label == "queue" else detail)[key] = p99(latencies)
        detail[f"{label}_trickle"] = {"jobs": len(handles), "p50_s": round(sorted(latencies)[len(latencies) // 2], 3),
                                      "p99_s": p99(latencies)}
        print(label, "trickle p99:", p99(latencies), flush=True)


def soak(args: argparse.Namespace, figures: dict, detail: dict) -> None:
    """``--soak`` jobs of the mix through this tree's worker at default settings (recycling included):
    answered, lost, run twice, the recycles' downtime and the band of reserved GPU memory after cleanup."""
    from glyphq.celeryconfig import settings
    from glyphq.producer import submit
    from glyphq.producer.store import Store

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1"}
    if args.soak_per_child:  # more recycles than the default of 1,000 jobs a child in a short run
        env["GLYPHQ_MAX_TASKS_PER_CHILD"] = str(args.soak_per_child)
    jobs = backlog(args.soak, seed=11, lengths=args.soak_lengths)
    with redis_and_worker(broker_port(), env, "soak") as (_worker, log_path):
        try:
            sent, started = time.time(), time.monotonic()
            handles = [_submit(submit, job) for job in jobs]
            figures_soak, results = run_backlog(handles, args.soak_budget_s, sent, started)
            store = Store(settings)
            runs = [store.runs(h.id) for h in handles]
            reserved = [r["gpu"]["reserved_mb"] for r in results if r.get("gpu")]
            pids = sorted({r["worker"]["pid"] for r in results})
            figures_soak.update(
                lost=figures_soak["unfinished"], run_twice=sum(1 for r in runs if r > 1), children=len(pids),
                lengths=args.soak_lengths, reserved_mb_min=min(reserved, default=None),
                reserved_mb_max=max(reserved, default=None),
                reserved_band_pct_of_weights=(round((max(reserved) - min(reserved)) / WEIGHTS_MB * 100, 2)
                                              if reserved else None))
            detail["soak"] = figures_soak
            figures.update(jobs=len(jobs), lost=figures_soak["lost"], run_twice=figures_soak["run_twice"])
            print("soak:", json.dumps(figures_soak), flush=True)
        finally:
            text = log_path.read_text(errors="replace")
            Path(args.out).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, Path(args.out) / "worker_soak.log")
            downtimes = recycle_downtimes(text)
            detail["soak_recycle_downtimes_s"] = downtimes
            detail["soak_takeovers"] = [line[:300] for line in text.splitlines() if "taking over" in line
                                        or "full cache" in line][:10]
            if downtimes:
                figures["recycle_downtime_s"] = max(downtimes)


#: The glyph-9b preset's weights in bf16, the yardstick of the reserved band (BENCHMARKS.md).
WEIGHTS_MB = 20.6e9 / 2**20


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
    parser.add_argument("--soak", type=int, default=0, help="phase soak: this many jobs of the mix")
    parser.add_argument("--soak-lengths", default="lognormal", help="lognormal, or a list such as 16,64,256")
    parser.add_argument("--soak-budget-s", type=float, default=480)
    parser.add_argument("--soak-per-child", type=int, default=0, help="GLYPHQ_MAX_TASKS_PER_CHILD of the soak")
    parser.add_argument("--static-budget-s", type=float, default=90,
                        help="the static path's backlog window (it does not drain a large backlog in time)")
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
            elif phase == "soak":
                soak(args, figures, detail)
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
