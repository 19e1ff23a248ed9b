"""Where a recycled worker child's start-up time goes, on the Glyph-size model.

    python3 bench/gpu_child_start.py --out DIR [--model-dir /tmp/glyph-9b]

1. Fork safety: the parent imports what ``worker.runtime.preload_modules`` imports, plus one more
   module of torch's compiler (nothing, ``torch._dynamo``, ``torch._inductor.compile_fx``), then
   forks; the child initialises CUDA. Says which imports a worker's parent could do for its children,
   and what each costs.
2. A fresh process as a recycled child, profiled with cProfile: ``engine.load`` and its first
   answer at batch 8 (compile, if any, and graph capture), with a compile cache that a first,
   unprofiled run has filled. Writes the top functions by cumulative time.

Prints one table and writes ``child_start.json`` and ``child_profile.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXTRA_IMPORTS = ["", "torch._dynamo", "torch._inductor.compile_fx"]


def fork_probe(module: str) -> dict:
    """Import ``module`` after the worker's own preloads, fork, and initialise CUDA in the child."""
    import importlib

    from glyphq.worker.runtime import preload_modules

    preload_modules()
    started = time.perf_counter()
    if module:
        importlib.import_module(module)
    import_s = time.perf_counter() - started
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            import torch

            t = time.perf_counter()
            torch.zeros(1, device="cuda")
            message = f"ok {time.perf_counter() - t:.2f}"
        except Exception as exc:  # noqa: BLE001  (the figure is which error)
            message = f"{type(exc).__name__}: {exc}"[:200]
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        outcome = pipe.read()
    return {"module": module or "(none)", "import_s": round(import_s, 2), "child_cuda": outcome}


def child(model_dir: str, profile_path: str | None) -> dict:
    """A recycled child's start: load the engine and answer a first batch of 8."""
    from PIL import Image

    from bench.gpu import job_list
    from glyphq.celeryconfig import Settings
    from glyphq.worker.engine import EngineJob, load
    from glyphq.worker.runtime import preload_modules

    preload_modules()
    profiler = cProfile.Profile() if profile_path else None
    jobs = [EngineJob(images=[Image.open(io.BytesIO(data)).convert("RGB")], question=question, max_new_tokens=8)
            for data, question in job_list(8)]
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    engine = load(Settings.from_env({**os.environ, "GLYPHQ_MODEL": model_dir, "GLYPHQ_MAX_BATCH": "8",
                                     "GLYPHQ_DECODE": "static"}))
    loaded = time.perf_counter()
    engine.answer(jobs, (1280, 720))
    answered = time.perf_counter()
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
        text.write("\n\n==== by own time ====\n")
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        Path(profile_path).write_text(text.getvalue())
    return {"load_s": round(loaded - started, 2), "first_answer_b8_s": round(answered - loaded, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--fork-probe")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--profile")
    args = parser.parse_args()
    if args.fork_probe is not None:
        print(json.dumps(fork_probe(args.fork_probe)))
        return 0
    if args.child:
        print(json.dumps(child(args.model_dir, args.profile)))
        return 0

    from bench.gpu_soak import ensure_preset, fresh_process

    ensure_preset(args.model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"fork": [fresh_process(__file__, ["--fork-probe", module]) for module in EXTRA_IMPORTS]}
    with tempfile.TemporaryDirectory() as cache:
        env = {"GLYPHQ_COMPILE_CACHE_DIR": cache}
        figures["child_cold_cache"] = fresh_process(__file__, ["--child", "--model-dir", args.model_dir], env)
        figures["child_warm_cache"] = fresh_process(__file__, ["--child", "--model-dir", args.model_dir], env)
        figures["child_warm_cache_profiled"] = fresh_process(
            __file__, ["--child", "--model-dir", args.model_dir, "--profile", str(out / "child_profile.txt")], env)
        figures["child_graphs_only"] = fresh_process(__file__, ["--child", "--model-dir", args.model_dir],
                                           {**env, "GLYPHQ_DECODE_COMPILE": "off"})
    (out / "child_start.json").write_text(json.dumps(figures, indent=2))
    print("\nA recycled child's start on glyph-9b")
    for probe in figures["fork"]:
        print(f"  fork after importing {probe.get('module', '?'):<28} {probe}")
    for key in ("child_cold_cache", "child_warm_cache", "child_warm_cache_profiled", "child_graphs_only"):
        print(f"  {key:<30} {figures[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
