"""Glyph's decoding on the H200: repetition penalty, thinking budget and the new budgets, in one go.

    python3 bench/gpu_glyph.py --out DIR [--model-dir /tmp/glyph-9b] [--preset glyph-9b] [--jobs 32]
                               [--git-sha SHA] [--skip-queue]

1. Builds ``--preset`` (default ``glyph-9b``: GLM-4.1V-9B config, random weights, the GLM tokenizer with
   its reasoning tags) into ``--model-dir`` if no model is there. ``--preset glyph-tiny`` on a CPU is a
   smoke check of the code path (the GPU memory figures are then null), not a measurement.
2. In this process, ``worker.engine.load`` at default settings, then three ways of choosing tokens
   side by side on the engine's own paged decoder (``worker.paged``: same weights, cache and compiled
   layers; each with decode steps captured for it): ``old`` (greedy argmax, as at 8db4e12), ``budget``
   (the thinking budget's ops, penalty 1.0) and ``new`` (the engine's own: penalty 1.1 and budget, the
   defaults). For each, at batch 1 and the default batch, over the cache bucket a default job starts
   in (its prompt and first steps after a 1280x720 page: 2,048 slots, also the old default's bucket)
   and the one it ends in after 8,192 new tokens (16,384 slots), and the full cache for ``new``: one
   decode step's milliseconds, timed over 128 replays of its CUDA graph after the rows were admitted
   into slots, best of 3 interleaved rounds.
3. First, in that engine alone: GPU memory: weights, the KV cache pool at the defaults, the peak of a
   batch of one-page jobs (``GLYPHQ_MAX_BATCH``) and of one 40-page document, and whether two children
   (a hand-over) fit.
4. A real redis-server and ``celery -A glyphq.tasks worker`` at default settings: a warm-up batch, then
   ``--jobs`` page jobs of 1,024 new tokens with no thinking budget and the same again with the
   default one (768 for 1,024 new tokens). Random weights never close their reasoning, so every
   budgeted job is fed ``</think><answer>`` at token 768.

Prints one table and writes ``h200_glyph.json`` (and ``worker.log``) into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import page  # noqa: E402
from bench.gpu_soak import collect, ensure_preset, free_port, redis_and_worker  # noqa: E402

STEPS = 128
STEP_BUDGET = 6144  # the timed rows' thinking budget: its ops run, it never cuts within the steps
QUEUE_NEW_TOKENS = 1024
OLD_DEFAULT_NEW_TOKENS = 256


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TokenChoice:
    """A way of choosing each next token (its ``DecodeRules``), run on the engine's own paged decoder:
    the same weights, cache and compiled layers, with decode steps captured for it alone."""

    def __init__(self, rules: Any, graphs: dict | None = None) -> None:
        self.rules = rules
        self.graphs: dict = {} if graphs is None else graphs


@contextmanager
def choosing(decoder: Any, choice: TokenChoice) -> Iterator[Any]:
    """``decoder`` (a ``worker.paged.PagedDecoder``) choosing its tokens as ``choice`` does, inside the block."""
    kept = decoder.rules, decoder.graphs
    decoder.rules, decoder.graphs = choice.rules, choice.graphs
    try:
        yield decoder
    finally:
        decoder.rules, decoder.graphs = kept


def step_ms(decoder: Any, prompts: list, rows: int, new_tokens: int | None) -> float:
    """One decode step's ms for ``rows`` copies of the prompt in the bucket of ``new_tokens`` new tokens
    after it, or (None) in the whole cache, as a document of ``GLYPHQ_MAX_PAGES`` pages has it. The rows
    are admitted into slots as the worker admits them, then ``STEPS`` steps of that bucket are timed."""

    batch = (prompts * rows)[:rows]
    prompt_len = batch[0]["input_ids"].shape[1]
    length = decoder.max_tokens if new_tokens is None else prompt_len + new_tokens
    columns = decoder.shape_for(rows, length)[1]
    if prompt_len + 2 + STEPS > columns:
        raise ValueError(f"{STEPS} steps after a prompt of {prompt_len} tokens do not fit a bucket of {columns} "
                         f"columns (GLYPHQ_DECODE_MAX_TOKENS={decoder.max_tokens})")
    for slot, prompt in enumerate(batch):
        decoder.admit(slot, prompt, STEPS + 16, STEP_BUDGET)
    try:
        decoder.decode(rows, length, 1)  # the first time: captures (and compiles) the bucket's step
        sync()
        start = time.perf_counter()
        decoder.decode(rows, length, STEPS)
        sync()
    finally:
        for slot in range(rows):
            decoder.release(slot)
    return (time.perf_counter() - start) / STEPS * 1000


def column_buckets(decoder: Any, prompt_len: int, max_new_tokens: int) -> list[int]:
    """The cache lengths one row decodes in, shortest first: each chunk of ``CHECK_EVERY`` steps runs in
    the bucket of the row's length at the chunk's end (``worker.continuous``)."""
    from glyphq.worker.decode import CHECK_EVERY

    final = prompt_len + max_new_tokens
    ends = range(prompt_len + 1 + CHECK_EVERY, final + CHECK_EVERY, CHECK_EVERY)
    return sorted({decoder.shape_for(1, min(end, final))[1] for end in ends})


def in_process(args: argparse.Namespace, figures: dict) -> None:
    import torch
    from PIL import Image

    from glyphq.celeryconfig import Settings
    from glyphq.worker import memory
    from glyphq.worker.engine import EngineJob, load
    from glyphq.worker.logits import DecodeRules

    settings = Settings.from_env({**os.environ, "GLYPHQ_MODEL": args.model_dir})
    engine = load(settings)
    sync()
    cuda = engine.device.type == "cuda"

    def gb(read: Any) -> float | None:  # a CUDA memory figure in GB; None on the CPU
        return round(read() / 1e9, 2) if cuda else None

    decoder = engine.slots
    figures.update(
        max_batch=settings.max_batch, decode_max_tokens=settings.decode_max_tokens,
        default_max_new_tokens=settings.default_max_new_tokens, thinking_budget=settings.thinking_budget,
        repetition_penalty=settings.repetition_penalty,
        weights_gb=round(sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9, 2),
        kv_pool_gb=round(decoder.pool_bytes() / 1e9, 2),
        kv_bytes_per_token=decoder.token_bytes,
        allocated_gb_after_load=gb(torch.cuda.memory_allocated),
        gpu_total_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if cuda else None,
        eos_ids=sorted(engine.eos_ids), reasoning_ids=str(engine.reasoning))
    image = Image.open(__import__("io").BytesIO(page((1280, 720), 0))).convert("RGB")
    job = EngineJob([image], "What is the total on this invoice?", 8)
    prompts = [engine.process(job, [image])]
    figures["prompt_tokens"] = prompts[0]["input_ids"].shape[1]

    # Memory first, in this engine alone: weights, the default cache, a batch's peak.
    b = settings.max_batch
    memory.reset_peak(engine.device)
    start = time.perf_counter()
    engine.answer([EngineJob([image], "What is the total?", 16) for _ in range(b)], settings.max_image_size)
    figures["first_batch_s"] = round(time.perf_counter() - start, 1)  # compiles the layers, captures
    figures["peak_gb_batch_of_pages"] = gb(torch.cuda.max_memory_reserved)
    engine.cleanup()
    a4 = Image.new("RGB", (595, 842), "white")
    memory.reset_peak(engine.device)
    start = time.perf_counter()
    (doc,) = engine.answer([EngineJob([a4] * settings.max_pages, "Who signed?", 16, document=True)],
                           settings.max_image_size)
    figures["document_pages"] = settings.max_pages
    figures["document_tokens_in"] = doc.tokens_in
    figures["document_vision_tokens_per_page"] = round(doc.vision_tokens / settings.max_pages, 1)
    figures["document_answer_s"] = round(time.perf_counter() - start, 2)
    figures["peak_gb_document"] = gb(torch.cuda.max_memory_reserved)
    engine.cleanup()
    figures["reserved_gb_after_cleanup"] = gb(torch.cuda.memory_reserved)
    if cuda:
        child = max(figures["peak_gb_batch_of_pages"], figures["peak_gb_document"])
        figures["two_children_gb"] = round(2 * child, 1)
        figures["two_children_fit"] = 2 * child < figures["gpu_total_gb"]
    figures["room_for_a_successor"] = memory.room_for_a_successor(engine.device)

    # Three ways of choosing tokens on the engine's own slots (one cache: side decoders of their own
    # would not fit beside it at the default GLYPHQ_MAX_BATCH).
    vocab = decoder.vocab
    choices = {"old": TokenChoice(DecodeRules(b, vocab, engine.device, 1.0, None)),
               "budget": TokenChoice(DecodeRules(b, vocab, engine.device, 1.0, engine.reasoning)),
               "new": TokenChoice(decoder.rules, decoder.graphs)}
    step_ms(decoder, prompts, 1, OLD_DEFAULT_NEW_TOKENS)  # compiles the layers for batch 1
    cases = [(name, rows, tokens) for name in choices for rows in (1, b)
             for tokens in (OLD_DEFAULT_NEW_TOKENS, settings.default_max_new_tokens)]
    cases.append(("new", b, None))  # the whole cache: the longest document
    best: dict[str, float] = {}
    for _round in range(3):
        for name, rows, tokens in cases:
            key = f"{name}_b{rows}_" + (f"new{tokens}" if tokens else "full_cache")
            with choosing(decoder, choices[name]):
                best[key] = min(best.get(key, 1e9), step_ms(decoder, prompts, rows, tokens))
    figures["step_ms"] = {key: round(value, 3) for key, value in best.items()}
    figures["cache_slots"] = {f"new{tokens}": decoder.shape_for(1, figures["prompt_tokens"] + tokens)[1]
                              for tokens in (OLD_DEFAULT_NEW_TOKENS, settings.default_max_new_tokens)}
    figures["start_cache_slots"] = column_buckets(decoder, figures["prompt_tokens"], settings.default_max_new_tokens)
    # A row starts in the bucket of its prompt and first chunk and moves to longer ones as it grows:
    # its first tokens cost the short step, tokens past ~8k the long one.
    short, long = f"new{OLD_DEFAULT_NEW_TOKENS}", f"new{settings.default_max_new_tokens}"
    figures["decode_ms_per_step_b1"] = figures["step_ms"][f"new_b1_{short}"]
    figures[f"decode_ms_per_step_b{b}"] = figures["step_ms"][f"new_b{b}_{short}"]
    figures["decode_ms_per_step_b1_long_bucket"] = figures["step_ms"][f"new_b1_{long}"]
    figures[f"decode_ms_per_step_b{b}_long_bucket"] = figures["step_ms"][f"new_b{b}_{long}"]
    for rows in (1, b):
        for label in (short, long):
            on, off, old = (best[f"{name}_b{rows}_{label}"] for name in ("new", "budget", "old"))
            figures[f"penalty_cost_pct_b{rows}_{label}"] = round((on - off) / off * 100, 2)
            figures[f"budget_cost_pct_b{rows}_{label}"] = round((off - old) / old * 100, 2)
    print("steps:", json.dumps(figures["step_ms"]), flush=True)


def through_queue(args: argparse.Namespace, figures: dict) -> None:
    from glyphq.producer import submit

    port = int(os.environ["GLYPHQ_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1"}
    data = [page((1280, 720), seed) for seed in range(8)]
    with redis_and_worker(port, env, "glyph") as (_worker, log_path):
        try:
            start = time.monotonic()
            warm = [submit(data[i % 8], f"Warm-up {i}?", max_new_tokens=QUEUE_NEW_TOKENS) for i in range(16)]
            collect(warm, args.budget_s, start)
            figures["queue_warmup_s"] = round(time.monotonic() - start, 1)
            for label, budget in (("no_budget", 0), ("default_budget", None)):
                handles = [submit(data[i % 8], f"What is the total on invoice {i}?", max_new_tokens=QUEUE_NEW_TOKENS,
                                  thinking_budget=budget) for i in range(args.jobs)]
                start = time.monotonic()
                results, failures = collect(handles, args.budget_s, start)
                wall = time.monotonic() - start
                figures[f"queue_{label}"] = {
                    "jobs": len(results), "failed": len(failures), "wall_s": round(wall, 1),
                    "jobs_s": round(len(results) / wall, 3),
                    "tok_s": round(sum(r["tokens_out"] for r in results) / wall, 1),
                    "batch_size_mean": round(sum(r["worker"]["batch_size"] for r in results) / max(1, len(results)), 2),
                    "thinking_budget_hit": sum(r["thinking_budget_hit"] for r in results),
                    "thinking_tokens": sorted({r["thinking_tokens"] for r in results}),
                    "finish_reasons": sorted({r["finish_reason"] for r in results}),
                    "failures_sample": failures[:2],
                }
                if results:
                    sample = dict(results[0])
                    sample["reasoning"] = (sample["reasoning"] or "")[:80] + "..."
                    figures[f"queue_{label}_sample"] = sample
                print(label, json.dumps(figures[f"queue_{label}"]), flush=True)
        finally:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, Path(args.out) / "worker.log")


def main() -> int:
    from glyphq.worker.tiny import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--preset", choices=PRESETS, default="glyph-9b",
                        help="the worker.tiny preset built into --model-dir when no model is there")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=200)
    parser.add_argument("--git-sha", default=os.environ.get("GIT_SHA", "unknown"))
    parser.add_argument("--skip-queue", action="store_true")
    args = parser.parse_args()
    os.environ.update({"GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "GLYPHQ_METRICS_PORT": "0"})
    os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "glyphq-pycache"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ensure_preset(args.model_dir, args.preset)
    figures: dict = {"git_sha": args.git_sha, "build_s": round(time.perf_counter() - start, 1)}
    try:
        in_process(args, figures)
        gc.collect()
        __import__("torch").cuda.empty_cache()
        print("in-process:", json.dumps(figures), flush=True)
        if not args.skip_queue:
            through_queue(args, figures)
    finally:
        (out / "h200_glyph.json").write_text(json.dumps(figures, indent=2))
    b = figures.get("max_batch")
    keys = ["decode_ms_per_step_b1", f"decode_ms_per_step_b{b}", "decode_ms_per_step_b1_long_bucket",
            f"decode_ms_per_step_b{b}_long_bucket", "penalty_cost_pct_b1_new256", f"penalty_cost_pct_b{b}_new256",
            "penalty_cost_pct_b1_new8192", f"penalty_cost_pct_b{b}_new8192", "kv_pool_gb", "weights_gb",
            "peak_gb_batch_of_pages", "peak_gb_document", "two_children_gb", "gpu_total_gb", "two_children_fit"]
    print(f"\nGlyph's decoding on the H200 ({args.preset}, bf16, default settings)")
    for key in keys:
        print(f"  {key:<28} {figures.get(key)}")
    for label in ("no_budget", "default_budget"):
        print(f"  queue_{label:<22} {figures.get(f'queue_{label}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
