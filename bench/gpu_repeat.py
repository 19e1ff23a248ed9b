"""Pages read once: questions about the same documents through the queue (phase ``repeat`` of bench/gpu_paged.py).

Through a real redis-server, render workers (``-Q render``) and a fresh GPU ``celery worker`` at default
settings, with documents submitted as users do (``submit_document``, rendered on queue ``render``):

a. ``sequential``: a fresh document of ``--repeat-pages`` pages: one question alone, then
   ``--repeat-asks`` other questions, each sent once the previous result is back. ``repeat_doc_ratio``
   is the GPU worker's time on the ten (each result's ``preprocess_s + generate_s``: from the job's
   start in the worker to its answer; not the render on the CPU queue, which every question pays
   again) over its time on the one alone. The same ratio of submit-to-result times is ``wall_ratio``.
b. ``at_once``: a second fresh document of as many pages, ``--repeat-asks`` questions submitted at once:
   the prompt tokens computed (the sum of ``tokens_in - prefix_cached_tokens``), one job's ``tokens_in``,
   the most rows seen decoding together (``worker.batch_size``) and the wall time.
c. ``shuffled``: ``--repeat-questions`` questions over ``--repeat-docs`` documents of ``--repeat-min-pages``
   to ``--repeat-pages`` pages (spread evenly), shuffled and submitted at once, answer lengths as the
   mix's (lognormal, median 200): jobs/s on this tree, then on the worker of ``--prev-tree`` (the tree
   before the caches, with ``--prev-env``), on the same jobs: ``repeat_mix_speedup`` = this / previous.
d. ``no_repeat``: gpu_mix's realistic mix with a page of its own for every job (the stock mix reuses
   144 pages, which an encoder cache would serve), ``--repeat-mix-jobs`` jobs, on a worker at default
   settings and on one with ``GLYPHQ_PREFIX_CACHE=off GLYPHQ_ENCODER_CACHE_MB=0``:
   ``no_repeat_cost`` = on / off jobs/s.

Each of the four GPU workers starts fresh and is warmed first: 16 jobs of the mix and, where documents
follow, one question about a document of ``--repeat-pages`` pages that no later job asks about. Rates
are gpu_mix's ``deep_rate`` (until 90% of the jobs were answered); the script stops waiting there and
stops the worker without letting it finish its tail. The cache figures come from each result's
``timings``: ``prefix_cached_tokens`` and ``encoder_cached_pages``, 0 where a tree does not report them.
Documents come from ``bench/documents.py``; each result's ``pages`` is checked against the pages asked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import documents, gpu_mix
from bench.gpu_soak import celery_worker, redis_server

ROOT = Path(__file__).resolve().parents[1]
#: The issue's keys this phase measures.
KEYS = ("repeat_doc_ratio", "repeat_mix_speedup", "no_repeat_cost")
CACHES_OFF = {"GLYPHQ_PREFIX_CACHE": "off", "GLYPHQ_ENCODER_CACHE_MB": "0"}
#: Seconds a GPU worker gets to stop once its figures are taken, before it is killed with its tail.
STOP_GRACE_S = 5.0
#: Longest wait for one result of ``sequential`` and for the whole of ``at_once``.
JOB_TIMEOUT_S = 300.0
#: Seconds to keep for each GPU worker still to start (its start, warm-up, a short window and its stop)
#: when a part's budget is cut to end the phase within ``--repeat-deadline-s``. On an H100 (2026-12-07)
#: a worker's warm-up alone took 28-58 s; with 75 s kept, the previous tree's window got 19 s.
STACK_S = 100.0
#: Document numbers: the warm-up's, a's, b's, and c's from ``SHUFFLED_SEED`` on.
WARM_SEED, SEQUENTIAL_SEED, AT_ONCE_SEED, SHUFFLED_SEED = 900, 901, 902, 1000


def tree_env(args: argparse.Namespace, tree: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker of ``tree`` at default settings (plus ``extra``)."""
    return {**os.environ, "GLYPHQ_MODEL": args.model_dir, "PYTHONUNBUFFERED": "1", **(extra or {}),
            "PYTHONPATH": f"{gpu_mix.import_path(tree)}:{os.environ.get('PYTHONPATH', '')}"}


@contextmanager
def stack(args: argparse.Namespace, label: str, tree: Path = ROOT, extra: dict[str, str] | None = None,
          render: bool = True) -> Iterator[None]:
    """A redis-server, render workers (``render``) and a GPU worker of ``tree``; their logs go to ``--out``."""
    env = tree_env(args, tree, extra)
    with redis_server(gpu_mix.broker_port()) as workdir, ExitStack() as workers:
        logs = []
        try:
            if render:
                logs.append(workers.enter_context(celery_worker(env, f"{label}-render", workdir, tree, queues="render",
                                                                concurrency=args.render_concurrency))[1])
            logs.append(workers.enter_context(celery_worker(env, label, workdir, tree, grace_s=STOP_GRACE_S))[1])
            yield
        finally:
            workers.close()
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for log_path in logs:
                shutil.copyfile(log_path, Path(args.out) / f"worker_{log_path.stem}.log")


def warm_up(args: argparse.Namespace, with_document: bool = True) -> dict[str, Any]:
    """16 jobs of the mix at once, and a question about a document of ``--repeat-pages`` pages; waits for
    them. Then, with the document, one more question about it alone: a decode step at batch 1 over so
    long a cache is captured as a CUDA graph once, at its first use (6 s on an H100), which would
    otherwise fall on ``sequential``'s question alone."""
    from glyphq.producer import submit, submit_document

    started = time.monotonic()
    handles = [gpu_mix._submit(submit, job, tokens=64) for job in gpu_mix.backlog(16, seed=3)]
    doc = documents.document(WARM_SEED, args.repeat_pages)
    if with_document:
        handles.append(submit_document(doc.text, "What is this lease about?", max_new_tokens=64))
    ended = gpu_mix.wait_for(handles, 400, started)
    answered = sum(meta["status"] == "SUCCESS" for meta in ended.values())
    if with_document:
        alone = submit_document(doc.text, "Who are the parties?", max_new_tokens=args.repeat_answer_tokens)
        answered += gpu_mix.wait_for([alone], 400, time.monotonic()).get(alone.id, {}).get("status") == "SUCCESS"
    return {"s": round(time.monotonic() - started, 1), "answered": answered,
            "of": len(handles) + (1 if with_document else 0)}


def record(result: dict[str, Any], asked_pages: int | None = None, wall_s: float | None = None) -> dict[str, Any]:
    """What the figures need of one result; the cache keys read 0 where the worker does not report them."""
    timings = result.get("timings") or {}
    found = {"tokens_in": int(result["tokens_in"]), "tokens_out": int(result["tokens_out"]),
             "prefix_cached_tokens": int(timings.get("prefix_cached_tokens", 0)),
             "encoder_cached_pages": int(timings.get("encoder_cached_pages", 0)),
             "batch_size": int((result.get("worker") or {}).get("batch_size") or 0), "pages": result.get("pages"),
             "render_s": timings.get("render_s"), "queue_s": timings.get("queue_s"),
             "generate_s": timings.get("generate_s"),
             "gpu_s": round(float(timings.get("preprocess_s", 0)) + float(timings.get("generate_s", 0)), 4)}
    if asked_pages is not None:
        found["pages_asked"] = asked_pages
    if wall_s is not None:
        found["wall_s"] = round(wall_s, 3)
    return found


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over results: prompt tokens, those from shared blocks, pages, those from the encoder cache."""
    tokens = sum(r["tokens_in"] for r in records)
    cached = sum(r["prefix_cached_tokens"] for r in records)
    pages = sum(r["pages"] or 0 for r in records)
    encoded = sum(r["encoder_cached_pages"] for r in records)
    return {"tokens_in": tokens, "prefix_cached_tokens": cached, "computed_prompt_tokens": tokens - cached,
            "prefix_cached_share": round(cached / tokens, 4) if tokens else None, "pages_read": pages,
            "encoder_cached_pages": encoded, "encoder_cached_share": round(encoded / pages, 4) if pages else None,
            "max_batch_size": max((r["batch_size"] for r in records), default=0),
            "pages_mismatch": sum(1 for r in records if "pages_asked" in r and r["pages"] != r["pages_asked"])}


def sequential(args: argparse.Namespace, doc: documents.Document) -> dict[str, Any]:
    """a: one question alone (T1), then ``--repeat-asks`` more, each sent after the last result (T10)."""
    from glyphq.producer import submit_document

    asks = documents.questions(doc, args.repeat_asks + 1)
    records = []
    for question in asks:
        started = time.monotonic()
        job = submit_document(doc.text, question, max_new_tokens=args.repeat_answer_tokens)
        records.append(record(job.result(timeout=JOB_TIMEOUT_S), doc.pages, time.monotonic() - started))
    t1 = records[0]["wall_s"]
    t10 = sum(r["wall_s"] for r in records[1:])
    gpu_1, gpu_10 = records[0]["gpu_s"], sum(r["gpu_s"] for r in records[1:])
    render_1 = records[0]["render_s"] or 0.0
    renders = sum(r["render_s"] or 0.0 for r in records[1:])
    return {"pages": doc.pages, "gpu_1_s": gpu_1, "gpu_10_s": round(gpu_10, 3),
            "ratio": round(gpu_10 / gpu_1, 3) if gpu_1 else None, "t1_s": t1, "t10_s": round(t10, 3),
            "wall_ratio": round(t10 / t1, 3),
            "wall_ratio_less_render": round((t10 - renders) / (t1 - render_1), 3) if t1 > render_1 else None,
            "render_s_mean": round((render_1 + renders) / len(records), 3), **totals(records), "jobs": records}


def at_once(args: argparse.Namespace, doc: documents.Document) -> dict[str, Any]:
    """b: ``--repeat-asks`` questions about one fresh document, submitted at once."""
    from glyphq.producer import submit_document

    sent, started = time.time(), time.monotonic()
    handles = [submit_document(doc.text, question, max_new_tokens=args.repeat_answer_tokens)
               for question in documents.questions(doc, args.repeat_asks)]
    ended = gpu_mix.wait_for(handles, JOB_TIMEOUT_S, started)
    ok = [meta for meta in ended.values() if meta["status"] == "SUCCESS"]
    records = [record(meta["result"], doc.pages) for meta in ok]
    wall = max((gpu_mix.done_at(meta, sent) for meta in ok), default=None)
    return {"pages": doc.pages, "answered": len(ok), "of": len(handles),
            "tokens_in_one": records[0]["tokens_in"] if records else None,
            "wall_s": round(wall, 3) if wall is not None else None, **totals(records), "jobs": records}


def shuffled_jobs(args: argparse.Namespace) -> list[tuple[documents.Document, str, int]]:
    """c's jobs: (document, question, answer length), the questions spread over the documents, shuffled."""
    pages = documents.spread(args.repeat_docs, args.repeat_min_pages, args.repeat_pages)
    docs = [documents.document(SHUFFLED_SEED + i, count) for i, count in enumerate(pages)]
    rng = random.Random(23)
    choices = [int(n) for n in args.repeat_lengths.split(",")] if args.repeat_lengths != "lognormal" else None
    jobs = []
    for i, doc in enumerate(docs):
        share = args.repeat_questions // len(docs) + (1 if i < args.repeat_questions % len(docs) else 0)
        for question in documents.questions(doc, share, offset=i % 3):
            length = rng.choice(choices) if choices else gpu_mix.lognormal(rng, 200, 1.2, 6400)
            jobs.append((doc, question, length))
    rng.shuffle(jobs)
    return jobs


def shuffled(jobs: list[tuple[documents.Document, str, int]], budget_s: float) -> dict[str, Any]:
    """c on the worker up now: every job submitted at once; its rate while the backlog is deep."""
    from glyphq.producer import submit_document

    sent, started = time.time(), time.monotonic()
    handles = [submit_document(doc.text, question, max_new_tokens=length) for doc, question, length in jobs]
    asked = {handle.id: doc.pages for handle, (doc, _, _) in zip(handles, jobs, strict=True)}
    submit_s = time.monotonic() - started
    ended = gpu_mix.wait_for(handles, budget_s, started, enough=max(1, int(0.9 * len(handles))))
    ok = {task_id: meta for task_id, meta in ended.items() if meta["status"] == "SUCCESS"}
    records = [record(meta["result"], asked[task_id]) for task_id, meta in ok.items()]
    wall = time.monotonic() - started
    rate, tok_s, cutoff = gpu_mix.deep_rate([gpu_mix.done_at(m, sent) for m in ok.values()],
                                            [r["tokens_out"] for r in records], len(handles), wall)
    return {"jobs": len(handles), "answered": len(ok), "failed": len(ended) - len(ok), "budget_s": budget_s,
            "jobs_s": rate, "useful_tok_s": tok_s, "deep_until_s": cutoff, "wall_s": round(wall, 1),
            "submit_s": round(submit_s, 1), "render_s_sum": round(sum(r["render_s"] or 0.0 for r in records), 1),
            **totals(records),
            "failures_sample": [str(m.get("result"))[:200] for m in ended.values() if m["status"] != "SUCCESS"][:2]}


def no_repeat_mix(jobs: list[dict], budget_s: float) -> dict[str, Any]:
    """d on the worker up now: the mix with a page of its own for every job, its rate while deep."""
    from glyphq.producer import submit

    sent, started = time.time(), time.monotonic()
    handles = [gpu_mix._submit(submit, job) for job in jobs]
    mix, results = gpu_mix.run_backlog(handles, budget_s, sent, started, deep_only=True)
    mix["budget_s"] = budget_s
    records = [record(result) for result in results]
    cached = totals(records)
    mix.update(prefix_cached_tokens=cached["prefix_cached_tokens"], encoder_cached_pages=cached["encoder_cached_pages"])
    return mix


def budget(args: argparse.Namespace, configured: float, stacks_after: int, shares: int = 1) -> float:
    """``configured``, cut so that the workers still to start fit before ``--repeat-deadline-s`` (counted
    from the script's start, so the model's build counts too), with 15 s kept to write the figures; and
    to a ``shares``-th of what is left, where a later window must get as long a one (the previous tree's)."""
    left = args.started + args.repeat_deadline_s - time.monotonic() - 15.0
    return round(max(10.0, min(configured, (left - STACK_S * stacks_after) / shares)), 1)


def _part(found: dict[str, Any], name: str, measure: Callable[[], Any], save: Callable[[], None]) -> Any:
    """Run one part; its outcome (or its error) goes into ``found[name]``, and the figures are saved."""
    started = time.perf_counter()
    try:
        found[name] = measure()
    except Exception as exc:  # keep what the other parts measured
        found[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"repeat {name} failed:", found[name]["error"], flush=True)
    else:
        brief = {k: v for k, v in found[name].items() if k != "jobs"} if isinstance(found[name], dict) else found[name]
        print(f"repeat {name}:", json.dumps(brief, default=str), flush=True)
    found[f"{name}_s"] = round(time.perf_counter() - started, 1)
    save()
    return found[name]


def run(args: argparse.Namespace, figures: dict[str, Any], detail: dict[str, Any], save: Callable[[], None]) -> None:
    """The whole phase: a, b and c on this tree, c on ``--prev-tree``, d with the caches on and off."""
    found: dict[str, Any] = detail.setdefault("repeat", {})
    found["settings"] = {key: value for key, value in vars(args).items() if key.startswith("repeat_")}
    started = time.perf_counter()
    found["lines_per_page"] = documents.lines_per_page()
    long_a = documents.document(SEQUENTIAL_SEED, args.repeat_pages)
    long_b = documents.document(AT_ONCE_SEED, args.repeat_pages)
    jobs = shuffled_jobs(args)
    mix = gpu_mix.backlog(args.repeat_mix_jobs, seed=13, lengths=args.repeat_lengths, unique=True)
    found["documents"] = {"chars_a": len(long_a.text), "shuffled_pages": sorted({doc.pages for doc, _, _ in jobs}),
                          "shuffled_jobs": len(jobs), "mix_jobs": len(mix)}
    found["prepare_s"] = round(time.perf_counter() - started, 1)

    with stack(args, "repeat"):
        _part(found, "warmup", lambda: warm_up(args), save)
        a = _part(found, "sequential", lambda: sequential(args, long_a), save)
        figures["repeat_doc_ratio"] = a.get("ratio")
        _part(found, "at_once", lambda: at_once(args, long_b), save)
        # The previous tree's window comes later and must be as long: this one takes half of what is left.
        shares = 2 if args.prev_tree else 1
        this = _part(found, "shuffled", lambda: shuffled(jobs, budget(args, args.repeat_budget_s, 3, shares)), save)
    if args.prev_tree:
        with stack(args, "repeat-prev", tree=Path(args.prev_tree).resolve(), extra=args.prev_env):
            _part(found, "prev_warmup", lambda: warm_up(args), save)
            prev = _part(found, "shuffled_prev", lambda: shuffled(jobs, budget(args, args.repeat_prev_budget_s, 2)),
                         save)
        if this.get("jobs_s") and prev.get("jobs_s"):
            figures["repeat_mix_speedup"] = round(this["jobs_s"] / prev["jobs_s"], 3)
    else:
        found["shuffled_prev"] = {"error": "not run: needs --prev-tree (the tree before the caches)"}
    with stack(args, "repeat-on", render=False):
        _part(found, "on_warmup", lambda: warm_up(args, with_document=False), save)
        on = _part(found, "no_repeat_on", lambda: no_repeat_mix(mix, budget(args, args.repeat_mix_budget_s, 1)), save)
    with stack(args, "repeat-off", extra=CACHES_OFF, render=False):
        _part(found, "off_warmup", lambda: warm_up(args, with_document=False), save)
        off = _part(found, "no_repeat_off", lambda: no_repeat_mix(mix, budget(args, args.repeat_mix_budget_s, 0)),
                    save)
    if on.get("jobs_s") and off.get("jobs_s"):
        figures["no_repeat_cost"] = round(on["jobs_s"] / off["jobs_s"], 3)
    save()


def table(detail: dict[str, Any]) -> list[str]:
    """The phase's short table: one line per figure, with what it was measured from."""
    found = detail.get("repeat") or {}
    a, b = found.get("sequential") or {}, found.get("at_once") or {}
    c, prev = found.get("shuffled") or {}, found.get("shuffled_prev") or {}
    on, off = found.get("no_repeat_on") or {}, found.get("no_repeat_off") or {}

    def ratio(x: Any, y: Any) -> Any:
        return round(x / y, 3) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None

    return [
        f"  a  {a.get('pages')} pages, GPU time one {a.get('gpu_1_s')} s, ten {a.get('gpu_10_s')} s:"
        f" repeat_doc_ratio {a.get('ratio')} (submit to result: {a.get('wall_ratio')}, less render"
        f" {a.get('wall_ratio_less_render')}); prefix_cached_tokens {a.get('prefix_cached_tokens')},"
        f" encoder_cached_pages {a.get('encoder_cached_pages')}",
        f"  b  {b.get('answered')}/{b.get('of')} at once: computed prompt tokens {b.get('computed_prompt_tokens')}"
        f" (one job's tokens_in {b.get('tokens_in_one')}), most rows {b.get('max_batch_size')},"
        f" wall {b.get('wall_s')} s",
        f"  c  {c.get('jobs')} questions / {len(found.get('documents', {}).get('shuffled_pages', []))} page counts:"
        f" {c.get('jobs_s')} jobs/s, previous tree {prev.get('jobs_s')}: repeat_mix_speedup"
        f" {ratio(c.get('jobs_s'), prev.get('jobs_s'))}; from shared blocks {c.get('prefix_cached_share')},"
        f" pages mismatched {c.get('pages_mismatch')}",
        f"  d  no repeats: caches on {on.get('jobs_s')} jobs/s, off {off.get('jobs_s')}: no_repeat_cost"
        f" {ratio(on.get('jobs_s'), off.get('jobs_s'))}",
    ]
