"""How fast a child loads the Glyph-size weights: one shard or several, with and without parallel loading.

    python3 bench/gpu_load.py --out DIR [--model-dir /tmp/glyph-9b]

The ``glyph-9b`` preset is saved as one 20.6 GB file; a copy is saved in 5 GB shards, as checkpoints on
the hub are. Each variant is a fresh process (as a recycled child) that imports what the worker's parent
preloads and then times ``worker.engine.load`` with graphs only (no compiler), twice in a row; the
weights are in the page cache. Prints one table and writes ``load.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def child(model_dir: str) -> dict:
    """One fresh process: CUDA init, then ``engine.load``."""
    import torch

    from glyphq.celeryconfig import Settings
    from glyphq.worker.engine import load
    from glyphq.worker.runtime import preload_modules

    preload_modules()
    torch.zeros(1, device="cuda")
    started = time.perf_counter()
    load(Settings.from_env({"GLYPHQ_MODEL": model_dir, "GLYPHQ_DECODE": "static", "GLYPHQ_DECODE_COMPILE": "off"}))
    torch.cuda.synchronize()
    return {"load_s": round(time.perf_counter() - started, 2)}


def sharded_copy(model_dir: str, out: str) -> None:
    """The preset saved again in 5 GB shards (loaded on the CPU, saved with ``max_shard_size``)."""
    if (Path(out) / "model.safetensors.index.json").exists():
        return
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    for path in Path(model_dir).iterdir():
        if not path.name.startswith("model") and not (Path(out) / path.name).exists():
            shutil.copy(path, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model_dir)))
        return 0

    from bench.gpu_soak import ensure_preset, fresh_process

    ensure_preset(args.model_dir)
    sharded = args.model_dir.rstrip("/") + "-sharded"
    started = time.perf_counter()
    sharded_copy(args.model_dir, sharded)
    figures: dict = {"sharding_s": round(time.perf_counter() - started, 1),
                     "shards": len(list(Path(sharded).glob("model-*.safetensors")))}
    for name, directory in (("one_file", args.model_dir), ("shards", sharded)):
        for parallel in ("false", "true"):
            runs = [fresh_process(__file__, ["--child", "--model-dir", directory],
                                  {"HF_ENABLE_PARALLEL_LOADING": parallel}) for _ in range(2)]
            figures[f"{name}_parallel_{parallel}"] = [run.get("load_s", run.get("error")) for run in runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(figures, indent=2))
    print("\nengine.load of glyph-9b, graphs only (seconds, two fresh processes each)")
    for key, value in figures.items():
        print(f"  {key:<28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
