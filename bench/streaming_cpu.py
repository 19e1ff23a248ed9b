"""What publishing streamed text costs the decode loop, on the CPU with the tiny model (no GPU needed).

    python bench/streaming_cpu.py --out DIR [--jobs 8] [--rounds 10] [--max-new-tokens 512]

Starts redis-server and one real ``celery -A glyphq.tasks worker`` on a Glyph-like stand-in
(``glyph-tiny``, scripted to reason until its thinking budget, then answer until ``max_new_tokens``,
so every job writes the same number of tokens and both parts of the stream). Then, in rounds that
alternate, submits ``--jobs`` jobs at once without ``stream`` and with ``stream=True`` and waits for
every result. Each round reports jobs/s, from the first submit to the last result, and the CPU seconds
the worker's child spent per job (``psutil``): on a shared machine, where other processes take the
cores at times, wall time varies by tens of percent from round to round, and CPU time much less. The
child decodes with one thread (``OMP_NUM_THREADS=1``) so that its CPU time is not inflated by threads
that spin while they wait. Nobody reads the streams: this measures the worker's side (detokenizing,
splitting, appending to Redis). The entries appended are counted from Redis's ``INFO commandstats``.

The most exact figure is the child's own: it times what it spends on streamed text and logs it at the
end of each serving epoch ("streamed text took X s of this serving epoch's Y s"); the rounds are
apart by more than the idle time that ends an epoch, so each streamed round is one epoch, and X / Y
is the share of its time that publishing took, whatever else ran on the machine meanwhile.

Prints a table and writes ``streaming_cpu.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import page  # noqa: E402
from bench.gpu_soak import free_port, redis_and_worker  # noqa: E402

LOOPS = "<|assistant|> <think> read the page read"
COUNTS = "</think> <answer> <|begin_of_box|> one two three four five six seven eight nine ten one"
BUDGET = 24
#: Longer than the idle time that ends a serving epoch (``tasks.serve.IDLE_S``).
PAUSE_S = 0.6
EPOCH_LINE = re.compile(r"streamed text took ([0-9.]+) s of this serving epoch's ([0-9.]+) s")


def xadds(client) -> int:
    return int(client.info("commandstats").get("cmdstat_xadd", {}).get("calls", 0))


def child_cpu_s(worker) -> float:
    """CPU seconds (user + system) of the worker's pool children so far."""
    import psutil

    children = psutil.Process(worker.pid).children(recursive=True)
    return sum(sum(child.cpu_times()[:2]) for child in children)


def one_round(args: argparse.Namespace, stream: bool, number: int, client, worker) -> dict:
    from glyphq.producer import submit

    before, cpu_before = xadds(client), child_cpu_s(worker)
    start = time.monotonic()
    jobs = [submit(page((320, 240), number * 100 + i), f"Question {i}?", max_new_tokens=args.max_new_tokens,
                   thinking_budget=BUDGET, stream=stream) for i in range(args.jobs)]
    results = [job.result(timeout=600) for job in jobs]
    wall = time.monotonic() - start
    cpu = child_cpu_s(worker) - cpu_before
    time.sleep(PAUSE_S)
    assert all(r["tokens_out"] == args.max_new_tokens for r in results), "every job writes the same tokens"
    return {"stream": stream, "jobs": len(results), "wall_s": round(wall, 3),
            "jobs_per_s": round(len(results) / wall, 4), "child_cpu_s_per_job": round(cpu / len(results), 4),
            "entries": xadds(client) - before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "glyphq-glyph-tiny-counting"))
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="rounds of each kind, alternating")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args()
    port = free_port()
    os.environ.update({"GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{port}/0", "GLYPHQ_METRICS_PORT": "0",
                       "GLYPHQ_DEVICE": "cpu", "GLYPHQ_MAX_BATCH": str(args.jobs)})
    if not (Path(args.model_dir) / "config.json").exists():
        from glyphq.worker.tiny import build, script

        build(Path(args.model_dir), "glyph-tiny")
        script(args.model_dir, LOOPS, COUNTS)
    import redis

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with redis_and_worker(port, env, "streaming") as (worker, log_path):
        deadline = time.monotonic() + 180
        while "model ready" not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        client = redis.Redis(port=port)
        one_round(args, False, 0, client, worker)  # warm-up: the first steps of each batch size are slower
        rounds = [one_round(args, stream, number, client, worker)
                  for number in range(1, args.rounds + 1) for stream in (number % 2 == 0, number % 2 == 1)]
        epochs = [(float(a), float(b)) for a, b in EPOCH_LINE.findall(log_path.read_text(errors="replace"))]
    off = [r["jobs_per_s"] for r in rounds if not r["stream"]]
    on = [r["jobs_per_s"] for r in rounds if r["stream"]]
    cpu_off = [r["child_cpu_s_per_job"] for r in rounds if not r["stream"]]
    cpu_on = [r["child_cpu_s_per_job"] for r in rounds if r["stream"]]
    figures = {
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), tiny model "
                   "(glyph-tiny, scripted), no GPU",
        "jobs_per_round": args.jobs, "max_new_tokens": args.max_new_tokens, "thinking_budget": BUDGET,
        "rounds": rounds,
        "jobs_per_s_off_median": statistics.median(off), "jobs_per_s_on_median": statistics.median(on),
        "cost_percent": round(100 * (1 - statistics.median(on) / statistics.median(off)), 2),
        "child_cpu_s_per_job_off_median": statistics.median(cpu_off),
        "child_cpu_s_per_job_on_median": statistics.median(cpu_on),
        "cpu_cost_percent": round(100 * (statistics.median(cpu_on) / statistics.median(cpu_off) - 1), 2),
        "streaming_share_of_epoch_percent": [round(100 * a / b, 3) for a, b in epochs],
        "streaming_share_median_percent": round(100 * statistics.median(a / b for a, b in epochs), 3),
        "entries_per_streamed_job": statistics.mean(r["entries"] for r in rounds if r["stream"]) / args.jobs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming_cpu.json").write_text(json.dumps(figures, indent=2))
    print(f"\n{args.jobs} jobs a round, {args.max_new_tokens} new tokens each, {figures['machine']}")
    print(f"  {'stream':<8} {'jobs/s':>8} {'child CPU s/job':>16} {'entries':>8}")
    for r in rounds:
        print(f"  {'on' if r['stream'] else 'off':<8} {r['jobs_per_s']:>8} {r['child_cpu_s_per_job']:>16} "
              f"{r['entries']:>8}")
    print(f"  median jobs/s off {figures['jobs_per_s_off_median']}, on {figures['jobs_per_s_on_median']} "
          f"({figures['cost_percent']}% fewer with streaming)")
    print(f"  median child CPU s/job off {figures['child_cpu_s_per_job_off_median']}, on "
          f"{figures['child_cpu_s_per_job_on_median']} ({figures['cpu_cost_percent']}% more with streaming)")
    print(f"  the child's own timing: streamed text took {figures['streaming_share_median_percent']}% of its "
          f"streamed rounds (median of {len(epochs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
