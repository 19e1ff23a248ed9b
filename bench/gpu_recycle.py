"""What recycling costs a GPU queue with compiled decode layers and without, side by side.

    python3 bench/gpu_recycle.py --out DIR [--jobs 512] [--per-child 100] [--max-batch 32]

For ``GLYPHQ_DECODE_COMPILE=on`` and then ``off``, the queue part of ``bench/gpu.py``: a real worker
on the ``glyph-9b`` preset, recycled every ``--per-child`` jobs (100 is the default setting), answers
one warm-up batch and then ``--jobs`` queued jobs. Reports the queue's jobs/s and tokens/s and each
recycle's downtime, so the two settings can be compared at a given child lifetime.

Prints one table and writes ``gpu_recycle.json`` (and each run's ``worker.log``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import job_list, set_queue_environment, through_queue  # noqa: E402
from bench.gpu_soak import ensure_preset  # noqa: E402

KEYS = ["backlog_tok_s", "queue_jobs_s", "recycles", "recycle_downtime_s", "recycle_downtimes_s",
        "first_child_warmup_s", "jobs", "jobs_failed", "run_twice", "handover_lines"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--per-child", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--git-sha", default=os.environ.get("GIT_SHA", "unknown"))
    args = parser.parse_args()
    set_queue_environment(args)
    ensure_preset(args.model_dir)
    jobs = job_list(args.jobs)
    out = Path(args.out)
    figures: dict = {"git_sha": args.git_sha, "per_child": args.per_child, "max_batch": args.max_batch, "runs": {}}
    for compile_setting in ("on", "off"):
        os.environ["GLYPHQ_DECODE_COMPILE"] = compile_setting  # read by the worker subprocess
        run_args = argparse.Namespace(**{**vars(args), "out": str(out / f"compile_{compile_setting}")})
        result = through_queue(run_args, jobs)
        figures["runs"][compile_setting] = {key: result.get(key) for key in KEYS}
        print(compile_setting, json.dumps(figures["runs"][compile_setting]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_recycle.json").write_text(json.dumps(figures, indent=2))
    print(f"\nrecycling every {args.per_child} jobs, {args.jobs} jobs, batch up to {args.max_batch}")
    print(f"  {'GLYPHQ_DECODE_COMPILE':<22} {'tok/s':>8} {'jobs/s':>7} {'recycles':>9} {'worst downtime s':>17}")
    for name, run in figures["runs"].items():
        print(f"  {name:<22} {run['backlog_tok_s']!s:>8} {run['queue_jobs_s']!s:>7} {run['recycles']!s:>9} "
              f"{run['recycle_downtime_s']!s:>17}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
