"""First look at the Glyph-size model on a GPU: build, load, and answer one page, in process.

    python bench/gpu_smoke.py --out DIR [--model-dir /tmp/glyph-9b] [--new-tokens 64]

Builds the ``glyph-9b`` preset (GLM-4.1V-9B config, random weights), loads it with ``worker.engine.load``
exactly as a worker child does, and times prefill, decode and cleanup for one 1280x720 page at batch 1
with plain ``generate``. Prints one table and writes ``gpu_smoke.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def document_pages() -> list:
    """samples/lease.txt rendered with Glyph's settings, or [] where the renderer is not installed."""
    try:
        from glyphq.worker.render import render_pages
    except ImportError:
        return []
    return render_pages((ROOT / "samples" / "lease.txt").read_text(encoding="utf-8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from glyphq.celeryconfig import Settings
    from glyphq.worker import memory
    from glyphq.worker.engine import EngineJob, load

    figures: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "glyphq.worker.tiny", str(model_dir), "--preset", "glyph-9b"], check=True,
                       cwd=ROOT)
        figures["build_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(model_dir)}))
    torch.cuda.synchronize()
    figures["load_s"] = round(time.perf_counter() - start, 2)
    figures["params_b"] = round(sum(p.numel() for p in engine.model.parameters()) / 1e9, 2)
    figures["weights_gb"] = round(sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9, 2)
    figures["dtype"] = str(engine.dtype)
    # Random weights may hit an end token at any step; time a fixed number of steps instead.
    engine.model.generation_config.eos_token_id = None
    engine.eos_ids = set()

    page = Image.new("RGB", (1280, 720), "white")
    job = EngineJob([page], "What is the total on this invoice?", 1)
    engine.answer([job], (1280, 720))  # warm-up
    # Cleanup cost side by side: a full gc.collect over everything loaded, then after gc.freeze()
    # as worker.runtime.Runtime.load does, so collections only walk objects made by later jobs.
    unfrozen = [engine.cleanup() for _ in range(5)]
    gc.collect()
    gc.freeze()
    figures["cleanup_ms_without_freeze"] = round(statistics.median(unfrozen) * 1000, 2)

    def timed(tokens: int) -> tuple[float, int]:
        job.max_new_tokens = tokens
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (result,) = engine.answer([job], (1280, 720))
        torch.cuda.synchronize()
        return time.perf_counter() - t0, result.tokens_in

    prefill = [timed(1)[0] for _ in range(args.repeats)]
    full = [timed(args.new_tokens) for _ in range(args.repeats)]
    memory.reset_peak(engine.device)
    timed(args.new_tokens)
    peak = memory.gpu_stats(engine.device)
    cleanups = [engine.cleanup() for _ in range(5)]
    after = memory.gpu_stats(engine.device)

    pages = document_pages()
    if pages:
        doc = EngineJob(pages, "When does the lease end?", 8)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (doc_result,) = engine.answer([doc], (1280, 720))
        torch.cuda.synchronize()
        figures.update(doc_pages=len(pages), doc_vision_tokens=doc_result.vision_tokens,
                       doc_vision_tokens_per_page=round(doc_result.vision_tokens / len(pages)),
                       doc_tokens_in=doc_result.tokens_in, doc_answer_8_tokens_s=round(time.perf_counter() - t0, 3))
        engine.cleanup()

    prefill_s = statistics.median(prefill)
    full_s = statistics.median(t for t, _ in full)
    figures.update(
        tokens_in=full[0][1],
        new_tokens=args.new_tokens,
        prefill_s=round(prefill_s, 3),
        decode_ms_per_step_b1=round((full_s - prefill_s) / (args.new_tokens - 1) * 1000, 1),
        tok_s_b1=round(args.new_tokens / full_s, 1),
        peak_mb=peak["peak_mb"] if peak else None,
        reserved_mb_after_cleanup=after["reserved_mb"] if after else None,
        cleanup_ms=round(statistics.median(cleanups) * 1000, 2),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(figures, indent=2))
    width = max(len(k) for k in figures)
    print("\nglyph-9b smoke (plain generate, batch 1, one 1280x720 page)")
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
