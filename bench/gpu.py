"""GPU speed of glyphq on the Glyph-size model, in one go: decode, backlog, queue overhead, recycling.

    python3 bench/gpu.py --out DIR [--jobs 1024] [--inprocess-jobs 256] [--max-batch 32] [--git-sha SHA]
                         [--model-dir /tmp/glyph-9b] [--preset glyph-9b] [--skip-queue]

1. Builds ``--preset`` (default ``glyph-9b``: GLM-4.1V-9B config, 10.3B params, random weights) into
   ``--model-dir`` if no model is there. ``--preset tiny`` on a CPU is a smoke check of the code path,
   not a measurement.
2. In this process, with ``worker.engine.load`` (bf16 on the GPU), decoding over the paged KV cache as the worker does
   (``worker.paged``, scheduled by ``worker.continuous``, which ``engine.answer`` also runs):
   - ``decode_ms_per_step_b1``: one 1280x720 page, (t(136 tokens) - t(8 tokens)) / 128;
     the same for plain ``generate`` (``naive_decode_ms_per_step_b1``).
   - ``naive_tok_s``: plain ``generate``, batch 1, over the first jobs of the backlog.
   - ``inprocess_jobs_s``: the first ``--inprocess-jobs`` jobs of the backlog queued at once in one
     running batch of ``--max-batch`` rows (decode, fit, processor, prefill and decode, as the worker
     does with a backlog), after one full batch that captures the steps.
   - batched against alone: the tokens of 8 jobs answered together and one by one.
   - a batch of ``--max-batch`` pages: preprocessing, the vision tower, one padded prompt pass, and
     each prompt admitted alone, in chunks (``prefill_s_batch``, as the running batch starts it).
3. Starts redis-server and a real ``celery -A glyphq.tasks worker`` with ``GLYPHQ_MAX_BATCH=--max-batch`` and
   recycling every ``--per-child`` jobs, lets it answer one full batch (``first_child_warmup_s``: the
   first child's compile and captures; the in-process figure also leaves them out), then enqueues
   ``--jobs`` page images of mixed sizes at once and waits for every result: ``backlog_tok_s``,
   ``queue_jobs_s``, the reserved GPU memory after cleanup over the run, cleanup per job, and each
   recycle's downtime (the parent's log of the old child's last result to the new child's first
   generate). ``queue_vs_inprocess_between_recycles`` leaves out each child's start (downtime, compile
   and first graph capture): the queue's own overhead.

The GPU host's Python has no cached bytecode for torch, so every fresh process would compile about
600 of torch's source files (2 s) before it could compile a graph; a deployed image has them
compiled. ``PYTHONPYCACHEPREFIX`` (default: a folder in the temp dir) gives the worker's children a
bytecode cache, as an installed image has.

Prints one table and writes ``h200.json`` (and the worker's log, ``worker.log``) into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_soak import collect, ensure_preset, free_port, redis_and_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(1280, 720), (896, 504), (640, 480), (448, 448)]  # every job list cycles through these
NEW_TOKENS = 128
WEIGHTS_BYTES = 20.59e9


def page(size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for line in range(size[1] // 28):
        draw.text((20, 16 + 24 * line), f"Invoice {seed} line {line}: item {line * 13 % 7} total {seed * 7 + line} EUR",
                  fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def job_list(count: int) -> list[tuple[bytes, str]]:
    images = {(size, seed): page(size, seed) for size in SIZES for seed in range(8)}
    return [(images[(SIZES[i % len(SIZES)], i % 8)], f"What is the total on invoice {i}?") for i in range(count)]


def device_label(device: Any) -> str:
    """The device the figures were measured on, as the run saw it: the GPU's name, or the CPU."""
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return "the CPU"


def in_process(args: argparse.Namespace, jobs: list[tuple[bytes, str]]) -> dict:
    """Figures from calling the engine directly in this process, on the worker's path: slots driven by
    ``worker.continuous.Continuous`` (``engine.answer`` runs the same scheduler)."""
    import torch
    from PIL import Image

    from glyphq.celeryconfig import Settings
    from glyphq.worker.continuous import Continuous
    from glyphq.worker.engine import EngineJob, load
    from glyphq.worker.images import fit_image
    from glyphq.worker.prompts import collate

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "GLYPHQ_MAX_BATCH": str(args.max_batch),
           "GLYPHQ_DECODE": "static"}
    start = time.perf_counter()
    engine = load(Settings.from_env(env))
    load_s = time.perf_counter() - start
    box = (1280, 720)

    def engine_job(i: int, tokens: int = NEW_TOKENS) -> EngineJob:
        data, question = jobs[i]
        return EngineJob(images=[Image.open(io.BytesIO(data)).convert("RGB")], question=question,
                         max_new_tokens=tokens)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(fn) -> float:  # noqa: ANN001
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    figures: dict = {"load_s": round(load_s, 2), "device": device_label(engine.device),
                     "dtype": str(engine.dtype).removeprefix("torch.")}
    decoder = engine.slots
    # Paged decoding at batch 1 on a 1280x720 page (job 0); the first call captures the graph.
    capture = timed(lambda: engine.answer([engine_job(0, 8)], box))
    figures["graph_capture_s_first_bucket"] = round(capture, 2)
    short = min(timed(lambda: engine.answer([engine_job(0, 8)], box)) for _ in range(3))
    long = min(timed(lambda: engine.answer([engine_job(0, 8 + NEW_TOKENS)], box)) for _ in range(3))
    figures["decode_ms_per_step_b1"] = round((long - short) / NEW_TOKENS * 1000, 2)
    out = engine.answer([engine_job(0, 8 + NEW_TOKENS)], box)[0]
    figures["b1_tokens_out_check"] = out.tokens_out

    # Plain generate, batch 1: per step, and tokens/s over the first jobs.
    short = timed(lambda: engine.answer_with_generate([engine_job(0, 8)], box))
    long = timed(lambda: engine.answer_with_generate([engine_job(0, 8 + NEW_TOKENS)], box))
    figures["naive_decode_ms_per_step_b1"] = round((long - short) / NEW_TOKENS * 1000, 2)
    tokens, seconds = 0, 0.0
    for i in range(args.naive_jobs):
        t = time.perf_counter()
        result = engine.answer_with_generate([engine_job(i)], box)[0]
        seconds += time.perf_counter() - t
        tokens += result.tokens_out
    figures["naive_tok_s"] = round(tokens / seconds, 1)
    figures["naive_jobs"] = args.naive_jobs

    # Batched against alone, in slots, 8 jobs of mixed sizes.
    sample = [engine_job(i, 32) for i in range(8)]
    together = engine.answer(sample, box)
    alone = [engine.answer([job], box)[0] for job in sample]
    first_difference = []
    for a, b in zip(together, alone, strict=True):
        pairs = list(zip(a.token_ids, b.token_ids, strict=False))
        first_difference.append(next((k for k, (x, y) in enumerate(pairs) if x != y), None))
    figures["batched_equals_alone"] = sum(a.token_ids == b.token_ids for a, b in zip(together, alone, strict=True))
    figures["batched_equals_alone_of"] = len(sample)
    figures["batched_vs_alone_first_different_token"] = first_difference
    figures["tokens_per_sample_job"] = [len(a.token_ids) for a in together]

    # In-process throughput over the same kind of jobs as the queue, after one full batch (its captures):
    # every job queued at once in one running batch of max_batch slots, as the worker holds a backlog.
    engine.answer([engine_job(i) for i in range(args.max_batch)], box)
    engine.cleanup()
    count = args.inprocess_jobs
    sync()
    t = time.perf_counter()
    running = Continuous(engine, box)
    for i in range(count):
        running.add(i, engine_job(i))
    answered = [f.outcome for f in running.run()]
    sync()
    elapsed = time.perf_counter() - t
    failed = [outcome for outcome in answered if isinstance(outcome, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} in-process jobs failed, the first: {failed[0]!r}")
    figures["inprocess_jobs_s"] = round(count / elapsed, 3)
    figures["inprocess_tok_s"] = round(sum(r.tokens_out for r in answered) / elapsed, 1)
    figures["inprocess_preprocess_share"] = round(sum(r.preprocess_s for r in answered) / elapsed, 3)
    figures["inprocess_generate_share"] = round(sum(r.generate_s for r in answered) / elapsed, 3)
    engine.cleanup()
    # Where a batch's time goes: preprocessing, the vision tower, and the prompt pass, in one pass over
    # the left-padded batch (as before grouping) and each prompt alone, in chunks (as the running batch starts it).
    batch = [engine_job(i) for i in range(args.max_batch)]
    fitted = [[fit_image(image, box) for image in job.images] for job in batch]
    figures["preprocess_s_batch"] = round(timed(
        lambda: [engine.process(j, f) for j, f in zip(batch, fitted, strict=True)]), 3)
    prompts = [engine.process(j, f) for j, f in zip(batch, fitted, strict=True)]
    padded = collate(prompts, engine.pad_id)
    lengths = [p["input_ids"].shape[1] for p in prompts]
    figures["prompt_tokens_batch"] = sum(lengths)
    figures["prompt_tokens_batch_padded"] = max(lengths) * len(lengths)

    def admit_in_groups() -> None:  # each prompt alone, in chunks, as the running batch starts it
        for i, prompt in enumerate(prompts):
            decoder.admit(i, prompt, 0, chunk=engine.prefill_chunk)

    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):  # as the paged decoder's prefill
        pixels = [padded[key] for key in ("pixel_values", "image_grid_thw") if key in padded]
        figures["vision_s_batch"] = round(timed(lambda: engine.model.model.get_image_features(*pixels)), 3)
        figures["prefill_s_batch_padded"] = round(timed(lambda: engine.model(**padded, logits_to_keep=1)), 3)
        figures["prefill_s_batch"] = round(timed(admit_in_groups), 3)
    for slot in range(len(prompts)):
        decoder.release(slot)
    figures["graph_capture_s_total"] = round(decoder.capture_s, 2)
    figures["graph_buckets"] = sorted(decoder.graphs)
    return figures  # the engine goes with this frame; main() collects it


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


def _stamp(line: str) -> float | None:
    match = STAMP.match(line)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def recycle_downtimes(log_text: str) -> list[float]:
    """Seconds from the last job result logged before each child's first generate to that generate."""
    downtimes, last_success, first_seen = [], None, False
    for line in log_text.splitlines():
        stamp = _stamp(line)
        if stamp is None:
            continue
        if "succeeded in" in line:
            last_success = stamp
        elif "first generate of this child starts" in line:
            if first_seen and last_success is not None:
                downtimes.append(round(stamp - last_success, 3))
            first_seen = True
    return downtimes


#: A GPU child's tag in the worker's log: billiard's ``ForkPoolWorker-<n>``, or ``GpuChild-<n>`` of a
#: worker that starts its GPU child itself.
CHILD = re.compile(r"/((?:ForkPoolWorker|GpuChild)-\d+)\]")
#: The line each child logs once its model is loaded (``worker.runtime.Runtime.load``), with ``engine.load``'s seconds.
MODEL_READY = re.compile(r"model ready: .*, loaded in ([\d.]+) s")


def child_starts(log_text: str) -> list[float]:
    """Each child's load time in seconds, in the order of its "model ready" line (the first child's too)."""
    return [float(match.group(1)) for match in MODEL_READY.finditer(log_text)]


def steady_jobs_s(log_text: str, since: float = 0.0) -> float | None:
    """Jobs per second of each child after its first batch (its compile and first graph capture), up to
    its last job, counting results logged after ``since`` (a time.time()): the queue's speed between
    recycles."""
    stamps: dict[str, list[float]] = {}
    for line in log_text.splitlines():
        stamp, child = _stamp(line), CHILD.search(line)
        if stamp is not None and stamp >= since and child and "succeeded in" in line:
            stamps.setdefault(child.group(1), []).append(stamp)
    jobs, seconds = 0, 0.0
    for times in stamps.values():
        first_batch_done = times[0] + 0.5  # a batch's results are logged within milliseconds of each other
        jobs += sum(1 for t in times if t > first_batch_done)
        seconds += times[-1] - times[0]
    return round(jobs / seconds, 3) if seconds > 0 else None


def through_queue(args: argparse.Namespace, jobs: list[tuple[bytes, str]]) -> dict:
    """Figures from a real worker answering the whole backlog through Redis (``GLYPHQ_BROKER_URL``)."""
    port = int(os.environ["GLYPHQ_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "GLYPHQ_DECODE": "static", "PYTHONUNBUFFERED": "1"}
    with redis_and_worker(port, env, "bench") as (_worker, log_path):
        figures = _backlog(args, jobs, log_path)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, Path(args.out) / "worker.log")  # for reading each recycle's timeline
        return figures


def _backlog(args: argparse.Namespace, jobs: list[tuple[bytes, str]], log_path: Path) -> dict:
    from glyphq.celeryconfig import settings
    from glyphq.producer import submit
    from glyphq.producer.store import Store

    # Wait for the first child to load, so the backlog measures answering, not the first load.
    deadline = time.monotonic() + 300
    while "model ready" not in log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker's model never loaded:\n" + log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    # Then one full batch, as the in-process figure answers one before its clock: the backlog finds the
    # worker warm, and pays every recycle in full.
    warmup_start = time.monotonic()
    for handle in [submit(data, question, max_new_tokens=NEW_TOKENS) for data, question in jobs[: args.max_batch]]:
        handle.result(timeout=args.budget_s)
    first_child_warmup_s = time.monotonic() - warmup_start
    handles = [submit(data, question, max_new_tokens=NEW_TOKENS) for data, question in jobs]
    start, started_at = time.monotonic(), time.time()
    results, failures = collect(handles, args.budget_s, start)
    wall = time.monotonic() - start
    store = Store(settings)
    runs = [store.runs(h.id) for h in handles[: len(results) + len(failures)]]
    log_text = log_path.read_text(errors="replace")
    reserved = [r["gpu"]["reserved_mb"] for r in results if r["gpu"]]
    cleanup_ms = [r["timings"]["cleanup_s"] * 1000 for r in results]
    downtimes = recycle_downtimes(log_text)
    return {
        "jobs": len(results),
        "jobs_failed": len(failures),
        "jobs_unfinished_in_budget": len(handles) - len(results) - len(failures),
        "run_twice": sum(1 for n in runs if n > 1),
        "queue_wall_s": round(wall, 1),
        "queue_jobs_s": round(len(results) / wall, 3),
        "backlog_tok_s": round(sum(r["tokens_out"] for r in results) / wall, 1),
        "batch_size_mean": round(sum(r["worker"]["batch_size"] for r in results) / max(1, len(results)), 2),
        "recycles": len({r["worker"]["pid"] for r in results}) - 1,
        "queue_jobs_s_between_recycles": steady_jobs_s(log_text, since=started_at),
        "first_child_warmup_s": round(first_child_warmup_s, 1),
        "recycle_downtime_s": max(downtimes, default=None),
        "recycle_downtimes_s": downtimes,
        "reserved_mb_min": min(reserved, default=None),
        "reserved_mb_max": max(reserved, default=None),
        "reserved_band_pct": (round((max(reserved) - min(reserved)) * 2**20 / WEIGHTS_BYTES * 100, 3)
                              if reserved else None),
        "cleanup_ms_per_task": round(sum(cleanup_ms) / len(cleanup_ms), 3) if cleanup_ms else None,
        "job_ms_mean": round(wall / max(1, len(results)) * 1000, 2),
        "failures_sample": failures[:3],
        "worker_log_errors": [line for line in log_text.splitlines() if "ERROR" in line][:5],
        "child_load_lines": [line[:160] for line in log_text.splitlines() if "model ready" in line][:6],
        "capture_lines": [line[:160] for line in log_text.splitlines() if "decode graph" in line][:12],
        "handover_lines": [line[:200] for line in log_text.splitlines() if "taking over" in line][:6],
    }


def set_queue_environment(args: argparse.Namespace) -> None:
    """The settings the producer (this process) and the worker share, from ``--max-batch``,
    ``--per-child`` and ``--jobs``; call before anything imports celeryconfig."""
    os.environ.update({"GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "GLYPHQ_METRICS_PORT": "0",
                       "GLYPHQ_MAX_BATCH": str(args.max_batch), "GLYPHQ_MAX_TASKS_PER_CHILD": str(args.per_child),
                       "GLYPHQ_MAX_QUEUE": str(10 * args.jobs)})
    os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "glyphq-pycache"))


def main() -> int:
    from glyphq.worker.tiny import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--preset", choices=PRESETS, default="glyph-9b",
                        help="the worker.tiny preset built into --model-dir when no model is there")
    parser.add_argument("--jobs", type=int, default=1024)
    parser.add_argument("--inprocess-jobs", type=int, default=256)
    parser.add_argument("--naive-jobs", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--per-child", type=int, default=256)
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--git-sha", default=os.environ.get("GIT_SHA", "unknown"))
    parser.add_argument("--skip-queue", action="store_true")
    args = parser.parse_args()
    set_queue_environment(args)
    ensure_preset(args.model_dir, args.preset)
    jobs = job_list(max(args.jobs, args.inprocess_jobs))
    figures: dict = {"git_sha": args.git_sha, "max_batch": args.max_batch, "new_tokens": NEW_TOKENS,
                     "decode_compile": os.environ.get("GLYPHQ_DECODE_COMPILE", "on"),
                     "recycle_overlap_s": int(os.environ.get("GLYPHQ_RECYCLE_OVERLAP_S", "30")),
                     "sizes": [f"{w}x{h}" for w, h in SIZES]}
    figures.update(in_process(args, jobs))
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    print("in-process:", json.dumps(figures), flush=True)
    if not args.skip_queue:
        figures.update(through_queue(args, jobs[: args.jobs]))
        figures["queue_vs_inprocess"] = round(figures["queue_jobs_s"] / figures["inprocess_jobs_s"], 3)
        if figures["queue_jobs_s_between_recycles"]:
            figures["queue_vs_inprocess_between_recycles"] = round(
                figures["queue_jobs_s_between_recycles"] / figures["inprocess_jobs_s"], 3)
        figures["backlog_vs_naive"] = round(figures["backlog_tok_s"] / figures["naive_tok_s"], 1)
        if figures["cleanup_ms_per_task"] is not None:
            figures["cleanup_pct_of_job"] = round(figures["cleanup_ms_per_task"] / figures["job_ms_mean"] * 100, 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "h200.json").write_text(json.dumps(figures, indent=2))
    keys = ["decode_ms_per_step_b1", "naive_decode_ms_per_step_b1", "backlog_tok_s", "naive_tok_s", "backlog_vs_naive",
            "queue_vs_inprocess", "queue_vs_inprocess_between_recycles",
            "recycle_downtime_s", "reserved_band_pct", "cleanup_ms_per_task",
            "cleanup_pct_of_job", "jobs", "git_sha"]
    print(f"\nglyphq on {figures['device']}: {args.preset}, {figures['dtype']}, batch up to {args.max_batch}, "
          f"{NEW_TOKENS} new tokens per job")
    for key in keys:
        print(f"  {key:<30} {figures.get(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
