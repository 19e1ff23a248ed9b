"""The paged engine's figures (issue 22): this tree and the previous one on the same jobs, card sizes, recycles.

    python3 bench/gpu_paged.py --out DIR --phases queue,inprocess [--prev-tree DIR] [--git-sha SHA]
    python3 bench/gpu_paged.py --out DIR --phases recycle --recycle-prev-tree DIR   # recycles before and after
    python3 bench/gpu_paged.py --combine DIR [DIR ...]      # merge the parts into bench/results/paged_engine.json

Everything runs at default settings on the ``glyph-9b`` preset (``--preset``; built into ``--model-dir``
if missing), through a real redis-server and ``celery worker`` subprocess, on the workloads of
``bench/gpu_mix.py`` (the realistic mix with urgent probes, the variance set, the trickle).

Phases (``--phases``, each one alone fits one command of the GPU host; ``PHASE_S`` are their estimates):

- ``queue``: this tree's worker: ``mix_jobs_s``, ``mix_useful_tok_s``, ``urgent_latency_p99_s`` (six
  priority-9 probes during the full backlog), ``variance_useful_tok_s``, ``trickle_latency_p99_s``.
- ``inprocess``: the engine in this process: ``decode_ms_per_step_b1`` and the same mix, for
  ``queue_vs_inprocess_mix`` (run it after ``queue`` in the same command: this process keeps a CUDA
  context, which would shrink the worker's pool).
- ``prev``: the same workloads on the worker of ``--prev-tree`` (the previous tree, commit 60a6315,
  extracted with ``git archive 60a6315 | tar -x -C .gpu/prev``): ``mix_prev_jobs_s``. Its static cache
  needs a 141 GB card at the defaults; on an 80 GB card pass ``--prev-env GLYPHQ_MAX_BATCH=16``.
- ``cards``: for each of ``--cards`` (GB: 24, 48, 80, 141), a worker at default settings that believes
  it runs on that card (``bench/small_card`` first on its ``PYTHONPATH`` with ``GLYPHQ_BENCH_CARD_GB``:
  the caching allocator capped and ``torch.cuda.mem_get_info`` reporting that card's total, as
  ``worker.budget.CARDS_MIB`` lists it), answering ``--card-jobs`` jobs of the mix at once: whether it
  started and answered, its "KV cache pool" line, and the most rows decoding at once (``rows_24gb``...).
- ``recycle``: for each of ``--recycle-cards``, a worker at default settings but
  ``GLYPHQ_MAX_TASKS_PER_CHILD=--recycle-per-child`` answering ``--recycle-jobs`` jobs:
  ``recycle_downtime_s`` (the longest, over every card), and whether each recycle handed over. With
  ``--recycle-prev-tree`` the worker of that tree (the previous one) runs the same on each card right
  after this tree's: ``recycle`` and ``recycle_prev`` side by side, each its longest downtime and its
  children's start (the "loaded in" of each child's "model ready" line: median and longest).
- ``soak``: ``--soak`` jobs of the mix on a fresh worker at default settings (``bench/gpu_mix.soak``):
  ``jobs``, ``lost``, ``run_twice``, ``reserved_band_pct`` (of the weights), and its recycles' downtime.
- ``repeat`` (pages read once): questions about the same documents, through render workers and fresh
  GPU workers (``bench/gpu_repeat.py`` says how): ``repeat_doc_ratio`` (ten questions one after another
  against one alone), ``repeat_mix_speedup`` (200 shuffled questions over 20 documents, against the
  worker of ``--prev-tree``, here the tree before the caches) and ``no_repeat_cost`` (the mix without
  repeats, caches on against off). The ``--repeat-*`` arguments shrink it.

Each command writes ``paged_engine.json`` (the issue's keys it measured) and ``paged_engine_detail.json``
into ``--out``; ``--combine`` merges such folders, later ones winning (``recycle_downtime_s``: the
longest), into ``--result`` and its ``_detail`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu_mix, gpu_repeat  # noqa: E402
from bench.gpu import child_starts, recycle_downtimes  # noqa: E402
from bench.gpu_soak import ensure_preset, free_port, redis_and_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL_CARD = ROOT / "bench" / "small_card"
RESULT = ROOT / "bench" / "results" / "paged_engine.json"
KEYS = ("mix_jobs_s", "mix_useful_tok_s", "mix_prev_jobs_s", "variance_useful_tok_s", "urgent_latency_p99_s",
        "trickle_latency_p99_s", "queue_vs_inprocess_mix", "decode_ms_per_step_b1", "recycle_downtime_s",
        "recycle", "recycle_prev", "rows_24gb", "rows_80gb", "jobs", "lost", "run_twice", "reserved_band_pct",
        *gpu_repeat.KEYS, "device", "git_sha")
#: Estimated seconds of each phase on the GPU host at the defaults (a worker's start and model load
#: included); ``cards`` and ``recycle`` are per card.
#: ``repeat``: four GPU workers' starts and warm-ups (~4 x 45 s), a and b (~40 s), c here (~60 s) and on
#: the previous tree (its budget, 120 s), d twice (~60 s each), building the documents and pages (~20 s).
PHASE_S = {"queue": 300, "inprocess": 180, "prev": 300, "cards": 100, "recycle": 150, "soak": 480, "repeat": 540}
#: The line a child logs about its pool (``worker.engine._log_pool``).
POOL_LINE = re.compile(r"KV cache pool: .*")


def card_gb(gb: int) -> str:
    """``GLYPHQ_BENCH_CARD_GB`` for a card of the README's table: its total as torch reports it, in 1e9 bytes."""
    from glyphq.worker.budget import CARDS_MIB, MIB

    return f"{CARDS_MIB[gb] * MIB / 1e9:.3f}"


def device_name() -> str:
    """The GPU's name and memory (nvidia-smi, so this process does not touch CUDA), or ``cpu``."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "cpu"


def worker_env(args: argparse.Namespace, extra: dict[str, str] | None = None,
               card: int | None = None) -> dict[str, str]:
    """The environment of a worker of this tree at default settings, on a card of ``card`` GB if given."""
    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1", **(extra or {})}
    if card is not None:
        env["GLYPHQ_BENCH_CARD_GB"] = card_gb(card)
        env["PYTHONPATH"] = f"{SMALL_CARD}:{env.get('PYTHONPATH', '')}"
    return env


def pool_line(log_text: str) -> str | None:
    found = POOL_LINE.findall(log_text)
    return found[0][:400] if found else None


# -- phases -----------------------------------------------------------------------------------------


def phase_prev(args: argparse.Namespace, figures: dict, detail: dict, jobs: list[dict]) -> None:
    """The gpu_mix workloads on the previous tree's worker (gpu_mix's ``static`` label)."""
    if not args.prev_tree:
        raise ValueError("phase prev needs --prev-tree (git archive 60a6315 | tar -x -C .gpu/prev)")
    tree = Path(args.prev_tree).resolve()
    saved = {key: os.environ.get(key) for key in args.prev_env}
    os.environ.update(args.prev_env)
    try:
        gpu_mix.run_worker_phase(args, "static", tree, figures, detail, jobs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    figures["mix_prev_jobs_s"] = figures.pop("mix_static_jobs_s", None)
    detail["prev_variance_useful_tok_s"] = figures.pop("variance_static_useful_tok_s", None)
    detail["prev_env"] = args.prev_env


def phase_cards(args: argparse.Namespace, figures: dict, detail: dict) -> None:
    """Per card size: does a worker at the defaults start and answer, and how many rows decode at once."""
    from glyphq.producer import submit

    jobs = [dict(job, tokens=min(job["tokens"], args.card_tokens)) for job in gpu_mix.backlog(args.card_jobs, seed=5)]
    cards = detail.setdefault("cards", {})
    for gb in args.cards:
        found: dict[str, Any] = {"card_gb_env": card_gb(gb)}
        cards[str(gb)] = found
        started = time.monotonic()
        with redis_and_worker(gpu_mix.broker_port(), worker_env(args, card=gb), f"card{gb}") as (_worker, log_path):
            try:
                handles = [gpu_mix._submit(submit, job) for job in jobs]
                ended = gpu_mix.wait_for(handles, args.card_budget_s, time.monotonic())
                ok = [meta["result"] for meta in ended.values() if meta["status"] == "SUCCESS"]
                rows = max((int(r["worker"]["batch_size"]) for r in ok), default=0)
                found.update(answered=len(ok), of=len(jobs), rows=rows, started_and_answered=bool(ok),
                             failures_sample=[str(m.get("result"))[:200] for m in ended.values()
                                              if m["status"] != "SUCCESS"][:2])
                figures[f"rows_{gb}gb"] = rows
            finally:
                text = log_path.read_text(errors="replace")
                found.update(pool_line=pool_line(text), seconds=round(time.monotonic() - started, 1))
                _keep_log(args, log_path, f"worker_card{gb}.log")
        print(f"card {gb} GB:", json.dumps(found), flush=True)


def phase_recycle(args: argparse.Namespace, figures: dict, detail: dict) -> None:
    """Per card size: recycles at the defaults (but jobs a child), and how long the queue waited at each;
    with ``--recycle-prev-tree``, the same on that tree's worker right after (``recycle_prev``)."""
    jobs = [dict(job, tokens=min(job["tokens"], args.card_tokens))
            for job in gpu_mix.backlog(args.recycle_jobs, seed=9)]
    trees = [("recycle", ROOT, "recycles")]
    if args.recycle_prev_tree:
        trees.append(("recycle_prev", Path(args.recycle_prev_tree).resolve(), "recycles_prev"))
    downtimes: dict[str, list[float]] = {key: [] for key, _tree, _per_card in trees}
    starts: dict[str, list[float]] = {key: [] for key, _tree, _per_card in trees}
    for gb in args.recycle_cards:
        for key, tree, per_card in trees:
            found = recycle_on(args, tree, gb, jobs, f"{key}{gb}")
            detail.setdefault(per_card, {})[str(gb)] = found
            downtimes[key] += found["downtimes_s"]
            starts[key] += found["child_start_s"]
            print(f"{key} {gb} GB:", json.dumps(found), flush=True)
    if downtimes["recycle"]:
        figures["recycle_downtime_s"] = max([*downtimes["recycle"], figures.get("recycle_downtime_s") or 0.0])
    for key in downtimes:
        figures[key] = {"recycle_downtime_s": max(downtimes[key], default=None),
                        "child_start_s_median": round(statistics.median(starts[key]), 2) if starts[key] else None,
                        "child_start_s_max": max(starts[key], default=None), "children": len(starts[key])}


def recycle_on(args: argparse.Namespace, tree: Path, gb: int, jobs: list[dict], name: str) -> dict[str, Any]:
    """The recycle workload on the worker of ``tree`` (a card of ``gb`` GB): jobs answered, each recycle's
    downtime, each child's start ("model ready ... loaded in"), hand-overs, the pool line."""
    from glyphq.producer import submit

    env = worker_env(args, {"GLYPHQ_MAX_TASKS_PER_CHILD": str(args.recycle_per_child)}, card=gb)
    if tree != ROOT:
        env.update(args.prev_env)
        env["PYTHONPATH"] = f"{gpu_mix.import_path(tree)}:{env['PYTHONPATH']}"
    found: dict[str, Any] = {}
    with redis_and_worker(gpu_mix.broker_port(), env, name, tree=tree) as (_worker, log_path):
        try:
            handles = [gpu_mix._submit(submit, job) for job in jobs]
            ended = gpu_mix.wait_for(handles, args.recycle_budget_s, time.monotonic())
            found.update(answered=sum(1 for m in ended.values() if m["status"] == "SUCCESS"), of=len(jobs))
        finally:
            text = log_path.read_text(errors="replace")
            found.update(downtimes_s=recycle_downtimes(text), child_start_s=child_starts(text),
                         pool_line=pool_line(text),
                         handed_over=sum("taking over from child" in line for line in text.splitlines()),
                         no_room=sum("no room for a successor" in line for line in text.splitlines()))
            _keep_log(args, log_path, f"worker_{name}.log")
    return found


def phase_soak(args: argparse.Namespace, figures: dict, detail: dict) -> None:
    """gpu_mix's soak: lost, run twice, the reserved band; its recycles count towards recycle_downtime_s."""
    before = figures.pop("recycle_downtime_s", None)
    gpu_mix.soak(args, figures, detail)
    band = (detail.get("soak") or {}).get("reserved_band_pct_of_weights")
    figures["reserved_band_pct"] = band
    soak_downtime = figures.pop("recycle_downtime_s", None)
    if soak_downtime is not None or before is not None:
        figures["recycle_downtime_s"] = max(x for x in (before, soak_downtime) if x is not None)


def _keep_log(args: argparse.Namespace, log_path: Path, name: str) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, Path(args.out) / name)


# -- results ----------------------------------------------------------------------------------------


def finish(figures: dict, detail: dict) -> dict:
    """The issue's keys, with the ratio of the queue's mix to the in-process one where both were measured."""
    inprocess = (detail.get("inprocess_mix") or {}).get("jobs_s")
    if figures.get("mix_jobs_s") and inprocess:
        figures["queue_vs_inprocess_mix"] = round(figures["mix_jobs_s"] / inprocess, 3)
    return {key: figures.get(key) for key in KEYS}


def write(out: Path, figures: dict, detail: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "paged_engine.json").write_text(json.dumps(finish(figures, detail), indent=2))
    (out / "paged_engine_detail.json").write_text(json.dumps(detail, indent=2, default=str))


def combine(folders: list[str], result: Path) -> dict:
    """Merge the parts written by several commands: later ones win, except the longest recycle downtime."""
    figures: dict = {}
    detail: dict = {}
    downtimes: list[float] = []
    for folder in folders:
        part = json.loads((Path(folder) / "paged_engine.json").read_text())
        if part.get("recycle_downtime_s") is not None:
            downtimes.append(part["recycle_downtime_s"])
        figures.update({key: value for key, value in part.items() if value is not None})
        detail_path = Path(folder) / "paged_engine_detail.json"
        if detail_path.exists():
            for key, value in json.loads(detail_path.read_text()).items():
                if isinstance(value, dict) and isinstance(detail.get(key), dict):
                    detail[key].update(value)
                else:
                    detail[key] = value
    if downtimes:
        figures["recycle_downtime_s"] = max(downtimes)
    merged = finish(figures, detail)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(merged, indent=2) + "\n")
    result.with_name(result.stem + "_detail.json").write_text(json.dumps(detail, indent=2, default=str) + "\n")
    return merged


def estimate_s(args: argparse.Namespace) -> int:
    per_card = {"cards": len(args.cards), "recycle": len(args.recycle_cards) * (2 if args.recycle_prev_tree else 1)}
    return sum(PHASE_S[phase] * per_card.get(phase, 1) for phase in args.phases)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="", help="folder for this command's part (the GPU host's $OUT)")
    parser.add_argument("--combine", nargs="*", default=None, help="merge these parts into --result and stop")
    parser.add_argument("--result", default=str(RESULT))
    parser.add_argument("--phases", default="queue,inprocess")
    parser.add_argument("--preset", default="glyph-9b", help="glyph-9b on the GPU host; tiny for a CPU dry run")
    parser.add_argument("--model-dir", default="/tmp/glyph-9b")
    parser.add_argument("--prev-tree", default="", help="the previous tree's folder (phase prev)")
    parser.add_argument("--prev-env", action="append", default=[], help="KEY=VALUE for the previous tree's worker")
    parser.add_argument("--jobs", type=int, default=480, help="the mix's backlog (gpu_mix --jobs)")
    parser.add_argument("--trickle-s", type=float, default=40)
    parser.add_argument("--budget-s", type=float, default=240, help="this tree's backlog and variance windows")
    parser.add_argument("--static-budget-s", type=float, default=150, help="the previous tree's windows")
    parser.add_argument("--cards", default="24,80", help="phase cards: card sizes in GB (24, 48, 80, 141)")
    parser.add_argument("--card-jobs", type=int, default=160)
    parser.add_argument("--card-tokens", type=int, default=400, help="answer length cap of the cards' jobs")
    parser.add_argument("--card-budget-s", type=float, default=90)
    parser.add_argument("--recycle-cards", default="80", help="phase recycle: card sizes in GB")
    parser.add_argument("--recycle-jobs", type=int, default=400)
    parser.add_argument("--recycle-per-child", type=int, default=120)
    parser.add_argument("--recycle-budget-s", type=float, default=150)
    parser.add_argument("--recycle-prev-tree", default="",
                        help="phase recycle: the same on the worker of this tree (the previous one) "
                        "right after this tree's, on each card (with --prev-env)")
    parser.add_argument("--soak", type=int, default=3000, help="phase soak: this many jobs of the mix")
    parser.add_argument("--soak-lengths", default="lognormal", help="lognormal, or a list such as 16,64,256")
    parser.add_argument("--soak-budget-s", type=float, default=480)
    parser.add_argument("--soak-per-child", type=int, default=0, help="GLYPHQ_MAX_TASKS_PER_CHILD of the soak")
    parser.add_argument("--repeat-pages", type=int, default=40, help="phase repeat: pages of a's and b's documents")
    parser.add_argument("--repeat-asks", type=int, default=10, help="questions of a (after the first) and of b")
    parser.add_argument("--repeat-answer-tokens", type=int, default=64, help="answer length of a and b")
    parser.add_argument("--repeat-docs", type=int, default=20, help="c's documents")
    parser.add_argument("--repeat-min-pages", type=int, default=5, help="c's shortest document (longest: above)")
    parser.add_argument("--repeat-questions", type=int, default=200, help="c's questions")
    parser.add_argument("--repeat-lengths", default="lognormal", help="c's and d's answer lengths, or a list: 16,64")
    parser.add_argument("--repeat-budget-s", type=float, default=150, help="c's longest wait on this tree")
    parser.add_argument("--repeat-prev-budget-s", type=float, default=120, help="c's longest wait on --prev-tree")
    parser.add_argument("--repeat-mix-jobs", type=int, default=320, help="d's jobs (each with a page of its own)")
    parser.add_argument("--repeat-mix-budget-s", type=float, default=90, help="d's longest wait, caches on and off")
    parser.add_argument("--repeat-deadline-s", type=float, default=570,
                        help="phase repeat cuts its budgets to end this long after the script started")
    parser.add_argument("--render-concurrency", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="render worker children of phase repeat")
    parser.add_argument("--git-sha", default=os.environ.get("GIT_SHA", "unknown"))
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASE_S)
    if unknown:
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {sorted(PHASE_S)}")
    args.cards = [int(gb) for gb in args.cards.split(",") if gb]
    args.recycle_cards = [int(gb) for gb in args.recycle_cards.split(",") if gb]
    args.prev_env = dict(item.split("=", 1) for item in args.prev_env)
    if args.combine is None and not args.out:
        parser.error("--out is required (or --combine)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.started = time.monotonic()
    if args.combine is not None:
        merged = combine(args.combine, Path(args.result))
        print(json.dumps(merged, indent=2))
        return 0
    estimate = estimate_s(args)
    print(f"phases {','.join(args.phases)}: about {estimate // 60} min {estimate % 60} s on the GPU host", flush=True)
    os.environ.setdefault("GLYPHQ_METRICS_PORT", "0")
    # One broker port for every phase (each starts its own redis-server there), set before the
    # producer's settings are read.
    os.environ["GLYPHQ_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    os.environ.setdefault("GLYPHQ_COMPILE_CACHE_DIR", "/tmp/glyphq-inductor")  # later children start warm
    out = Path(args.out)
    figures: dict = {"git_sha": args.git_sha, "device": device_name()}
    detail: dict = {"phases": args.phases, "preset": args.preset}
    started = time.perf_counter()
    ensure_preset(args.model_dir, args.preset)
    detail["build_s"] = round(time.perf_counter() - started, 1)
    jobs = gpu_mix.backlog(args.jobs)
    for phase in args.phases:
        t = time.perf_counter()
        try:
            if phase == "queue":
                gpu_mix.run_worker_phase(args, "queue", ROOT, figures, detail, jobs)
            elif phase == "inprocess":
                gpu_mix.in_process(args, figures, detail, jobs)
            elif phase == "prev":
                phase_prev(args, figures, detail, jobs)
            elif phase == "cards":
                phase_cards(args, figures, detail)
            elif phase == "recycle":
                phase_recycle(args, figures, detail)
            elif phase == "soak":
                phase_soak(args, figures, detail)
            elif phase == "repeat":
                gpu_repeat.run(args, figures, detail, lambda: write(out, figures, detail))
        except Exception as exc:  # keep what the other phases measured
            detail[f"{phase}_error"] = f"{type(exc).__name__}: {exc}"
            print(phase, "failed:", detail[f"{phase}_error"], flush=True)
        detail[f"{phase}_phase_s"] = round(time.perf_counter() - t, 1)
        write(out, figures, detail)
    print(f"\nThe paged engine ({args.preset}, default settings, {figures['device']}), "
          f"{time.perf_counter() - started:.0f} s")
    for key, value in finish(figures, detail).items():
        print(f"  {key:<26} {value}")
    if "repeat" in args.phases:
        print("Pages read once (phase repeat):")
        print("\n".join(gpu_repeat.table(detail)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
