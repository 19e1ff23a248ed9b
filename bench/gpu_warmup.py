"""What a new worker child pays before it answers at full speed, with and without compiled decode layers.

    python3 bench/gpu_warmup.py --out DIR [--model-dir /tmp/glyph-9b]

Each variant runs in a fresh process, as a recycled child does (torch and transformers imported first,
then CUDA, the weights, and the first answers):

- ``compiled_cold``: ``GLYPHQ_DECODE_COMPILE=on`` with an empty inductor cache (``GLYPHQ_COMPILE_CACHE_DIR``);
- ``compiled_warm``: the same again, with the cache the cold run left;
- ``graphs_only``: ``GLYPHQ_DECODE_COMPILE=off`` (CUDA graphs of the eager layers);
- ``graphs_only_parallel_load``: the same, loading with ``HF_ENABLE_PARALLEL_LOADING=true``.

For each: CUDA init, weight load, the first answer at batch 1 and at batch 16 (each the first use of
its bucket: compile, if any, and graph capture), decode ms per step at batch 1 and 16, and the
tokens of a batch-1 answer (compared across variants). Prints one table; writes ``warmup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_soak import ensure_preset, fresh_process  # noqa: E402

NEW_TOKENS = 128


def child(model_dir: str) -> dict:
    """One fresh process's figures (run with ``--child``)."""
    started = time.perf_counter()
    import torch

    from bench.gpu import job_list
    from glyphq.celeryconfig import Settings
    from glyphq.worker.engine import EngineJob, load
    from glyphq.worker.runtime import preload_modules

    preload_modules()  # the worker's parent does this before it forks a child
    imported = time.perf_counter()
    cuda = torch.cuda.is_available()  # False only for a CPU smoke run of this script
    if cuda:
        torch.zeros(1, device="cuda")
    cuda_ready = time.perf_counter()
    engine = load(Settings.from_env({**os.environ, "GLYPHQ_MODEL": model_dir, "GLYPHQ_MAX_BATCH": "16",
                                     "GLYPHQ_DECODE": "static"}))
    loaded = time.perf_counter()
    import io

    from PIL import Image

    jobs = job_list(16)
    box = (1280, 720)

    def engine_jobs(count: int, tokens: int) -> list[EngineJob]:
        return [EngineJob(images=[Image.open(io.BytesIO(jobs[i][0])).convert("RGB")], question=jobs[i][1],
                          max_new_tokens=tokens) for i in range(count)]

    def timed(count: int, tokens: int) -> float:
        batch = engine_jobs(count, tokens)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.answer(batch, box)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    figures: dict = {"import_s": round(imported - started, 2), "cuda_init_s": round(cuda_ready - imported, 2),
                     "load_s": round(loaded - cuda_ready, 2), "compiled": engine.decoder.compiled}
    figures["first_answer_b1_s"] = round(timed(1, 8), 2)
    figures["first_answer_b16_s"] = round(timed(16, 8), 2)
    for count in (1, 16):
        short = min(timed(count, 8) for _ in range(3))
        long = min(timed(count, 8 + NEW_TOKENS) for _ in range(3))
        figures[f"decode_ms_per_step_b{count}"] = round((long - short) / NEW_TOKENS * 1000, 2)
    figures["tokens_b1"] = engine.answer(engine_jobs(1, 64), box)[0].token_ids
    figures["buckets"] = sorted(engine.decoder.graphs)
    if engine.decoder.compiled:
        from torch._dynamo.utils import counters

        figures["compiled_graphs"] = counters["stats"]["unique_graphs"]
    figures["child_total_s"] = round(time.perf_counter() - started, 2)
    return figures


def run_variant(model_dir: str, env: dict[str, str]) -> dict:
    return fresh_process(__file__, ["--child", "--model-dir", model_dir], env, timeout=1500)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model_dir)))
        return 0

    ensure_preset(args.model_dir)
    cache = tempfile.mkdtemp(prefix="glyphq-inductor-")
    variants = {
        "compiled_cold": {"GLYPHQ_DECODE_COMPILE": "on", "GLYPHQ_COMPILE_CACHE_DIR": cache},
        "compiled_warm": {"GLYPHQ_DECODE_COMPILE": "on", "GLYPHQ_COMPILE_CACHE_DIR": cache},
        "graphs_only": {"GLYPHQ_DECODE_COMPILE": "off"},
        "graphs_only_parallel_load": {"GLYPHQ_DECODE_COMPILE": "off", "HF_ENABLE_PARALLEL_LOADING": "true",
                                      "HF_PARALLEL_LOADING_WORKERS": "8"},
    }
    results = {name: run_variant(args.model_dir, env) for name, env in variants.items()}
    reference = results["graphs_only"].get("tokens_b1")
    for figures in results.values():
        if "tokens_b1" in figures and reference:
            pairs = list(zip(figures["tokens_b1"], reference, strict=False))
            figures["first_token_differing_from_graphs_only"] = next(
                (k for k, (a, b) in enumerate(pairs) if a != b), None)
    keys = ["import_s", "cuda_init_s", "load_s", "first_answer_b1_s", "first_answer_b16_s", "decode_ms_per_step_b1",
            "decode_ms_per_step_b16", "first_token_differing_from_graphs_only", "child_total_s"]
    print(f"{'':28}" + "".join(f"{k[:22]:>24}" for k in results))
    for key in keys:
        print(f"{key:28}" + "".join(f"{results[v].get(key, 'error')!s:>24}" for v in results))
    for name, figures in results.items():
        if "error" in figures:
            print(f"\n{name} failed:\n{figures['error']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warmup.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
