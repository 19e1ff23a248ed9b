"""What publishing streamed text costs the decode loop, on the CPU with the tiny model (no GPU needed).

    python bench/streaming_cpu.py --out DIR [--jobs 8] [--rounds 4] [--max-new-tokens 96]

Starts redis-server and one real ``celery -A glyphq.tasks worker`` on a Glyph-like stand-in
(``glyph-tiny``, scripted to reason until its thinking budget, then answer until ``max_new_tokens``,
so every job writes the same number of tokens and both parts of the stream). Then, in rounds that
alternate, submits ``--jobs`` jobs at once without ``stream`` and with ``stream=True`` and waits for
every result: jobs/s of each round, from the first submit to the last result. Nobody reads the
streams: this measures the worker's side (detokenizing, splitting, appending to Redis). The entries
appended are counted from Redis's ``INFO commandstats``.

Prints a table and writes ``streaming_cpu.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def xadds(client) -> int:
    return int(client.info("commandstats").get("cmdstat_xadd", {}).get("calls", 0))


def one_round(args: argparse.Namespace, stream: bool, number: int, client) -> dict:
    from glyphq.producer import submit

    before = xadds(client)
    start = time.monotonic()
    jobs = [submit(page((320, 240), number * 100 + i), f"Question {i}?", max_new_tokens=args.max_new_tokens,
                   thinking_budget=BUDGET, stream=stream) for i in range(args.jobs)]
    results = [job.result(timeout=600) for job in jobs]
    wall = time.monotonic() - start
    assert all(r["tokens_out"] == args.max_new_tokens for r in results), "every job writes the same tokens"
    return {"stream": stream, "jobs": len(results), "wall_s": round(wall, 3), "jobs_per_s": round(len(results) / wall, 4),
            "entries": xadds(client) - before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "glyphq-glyph-tiny-counting"))
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each kind, alternating")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    port = free_port()
    os.environ.update({"GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{port}/0", "GLYPHQ_METRICS_PORT": "0",
                       "GLYPHQ_DEVICE": "cpu", "GLYPHQ_MAX_BATCH": str(args.jobs)})
    if not (Path(args.model_dir) / "config.json").exists():
        from glyphq.worker.tiny import build, script

        build(Path(args.model_dir), "glyph-tiny")
        script(args.model_dir, LOOPS, COUNTS)
    import redis

    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1"}
    with redis_and_worker(port, env, "streaming") as (_worker, log_path):
        deadline = time.monotonic() + 180
        while "model ready" not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        client = redis.Redis(port=port)
        one_round(args, False, 0, client)  # warm-up: the first steps of each batch size are slower
        rounds = [one_round(args, stream, number, client)
                  for number in range(1, args.rounds + 1) for stream in (number % 2 == 0, number % 2 == 1)]
    off = [r["jobs_per_s"] for r in rounds if not r["stream"]]
    on = [r["jobs_per_s"] for r in rounds if r["stream"]]
    figures = {
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), tiny model "
                   "(glyph-tiny, scripted), no GPU",
        "jobs_per_round": args.jobs, "max_new_tokens": args.max_new_tokens, "thinking_budget": BUDGET,
        "rounds": rounds,
        "jobs_per_s_off_median": statistics.median(off), "jobs_per_s_on_median": statistics.median(on),
        "cost_percent": round(100 * (1 - statistics.median(on) / statistics.median(off)), 2),
        "entries_per_streamed_job": statistics.mean(r["entries"] for r in rounds if r["stream"]) / args.jobs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming_cpu.json").write_text(json.dumps(figures, indent=2))
    print(f"\n{args.jobs} jobs a round, {args.max_new_tokens} new tokens each, {figures['machine']}")
    print(f"  {'stream':<8} {'jobs/s':>8} {'entries':>8}")
    for r in rounds:
        print(f"  {'on' if r['stream'] else 'off':<8} {r['jobs_per_s']:>8} {r['entries']:>8}")
    print(f"  median jobs/s off {figures['jobs_per_s_off_median']}, on {figures['jobs_per_s_on_median']}: "
          f"publishing costs {figures['cost_percent']}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
