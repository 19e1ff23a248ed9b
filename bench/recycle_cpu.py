"""How long recycling stops a worker, on the CPU with the tiny model (no GPU needed).

    python bench/recycle_cpu.py --out DIR [--jobs 60] [--per-child 5] [--model-dir DIR]

Starts redis-server and a real ``celery -A glyphq.tasks worker`` recycling every ``--per-child`` jobs,
enqueues ``--jobs`` small page images at once, and waits for every result; once with
``GLYPHQ_RECYCLE_OVERLAP_S=0`` (the next child starts after the old one has left) and once with the
hand-over (``GLYPHQ_RECYCLE_OVERLAP_S=30``). Reports the wall time and each recycle's downtime (the
old child's last result to the new child's first generate, from the worker's log). The tiny model
loads in a fraction of a second, so what remains is the pool's own cost of replacing a child.

Prints one table and writes ``recycle_cpu.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import page, recycle_downtimes  # noqa: E402
from bench.gpu_soak import collect, free_port, redis_and_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_run(args: argparse.Namespace, overlap_s: int) -> dict:
    from glyphq.producer import submit

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "GLYPHQ_RECYCLE_OVERLAP_S": str(overlap_s),
           "PYTHONUNBUFFERED": "1"}
    with redis_and_worker(int(os.environ["GLYPHQ_BROKER_URL"].rsplit(":", 1)[1].split("/")[0]), env,
                          f"recycle{overlap_s}") as (_worker, log_path):
        deadline = time.monotonic() + 120
        while "model ready" not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        handles = [submit(page((320, 240), i), f"Question {i}?", max_new_tokens=4) for i in range(args.jobs)]
        start = time.monotonic()
        results, failures = collect(handles, 300, start)
        wall = time.monotonic() - start
        downtimes = recycle_downtimes(log_path.read_text(errors="replace"))
    return {
        "recycle_overlap_s": overlap_s,
        "jobs": len(results),
        "jobs_failed": len(failures),
        "children": len({r["worker"]["pid"] for r in results}),
        "wall_s": round(wall, 2),
        "recycle_downtimes_s": downtimes,
        "downtime_median_s": round(statistics.median(downtimes), 3) if downtimes else None,
        "downtime_max_s": max(downtimes, default=None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "glyphq-tiny"))
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--per-child", type=int, default=5)
    args = parser.parse_args()
    os.environ.update({"GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "GLYPHQ_METRICS_PORT": "0",
                       "GLYPHQ_MAX_TASKS_PER_CHILD": str(args.per_child), "GLYPHQ_DEVICE": "cpu"})
    if not (Path(args.model_dir) / "config.json").exists():
        from glyphq.worker.tiny import build

        build(Path(args.model_dir))
    figures = {"per_child": args.per_child, "runs": [one_run(args, 0), one_run(args, 30)]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recycle_cpu.json").write_text(json.dumps(figures, indent=2))
    print(f"\nrecycling every {args.per_child} jobs, {args.jobs} jobs, tiny model on the CPU")
    print(f"  {'GLYPHQ_RECYCLE_OVERLAP_S':<26} {'wall s':>7} {'children':>9} {'downtime median':>16} {'max':>6}")
    for run in figures["runs"]:
        print(f"  {run['recycle_overlap_s']:<26} {run['wall_s']:>7} {run['children']:>9} "
              f"{run['downtime_median_s']!s:>16} {run['downtime_max_s']!s:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
