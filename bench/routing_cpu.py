"""Routing a document's questions to one worker: the share of prompt tokens served from shared blocks, on the CPU.

    python bench/routing_cpu.py [--out bench/results/routing_cpu.json] [--docs 6] [--questions 4]

Starts a redis-server, a render worker and two GPU workers of this tree on the tiny model
(``-Q gpu,gpu.a`` and ``-Q gpu,gpu.b``), then asks ``--questions`` questions about each of ``--docs``
documents of ``--min-pages`` to ``--max-pages`` pages (``bench/documents.py``), in rounds: one question
about every document at once (in shuffled order), the next round once they are answered. Twice, on
fresh documents each time:

- ``gpu``: every question to queue ``gpu``; either worker takes it.
- ``own``: every question about a document to the queue of one worker, ``gpu.a`` or ``gpu.b``, picked by
  a highest-hash choice over the document's digest (as docs/scaling.md shows).

For each it reports the prompt tokens, those served from shared KV blocks (each result's
``timings.prefix_cached_tokens``; their share of ``tokens_in``), the pages whose vision features came
from the encoder cache (``timings.encoder_cached_pages``) and how many documents were answered by both
workers. The cache figures read 0 on a tree without the caches. The workers run with
``GLYPHQ_MAX_BATCH=2`` (``--max-batch``), so each reserves few jobs and a round's questions spread over
both workers as a deep queue's do, instead of the first worker to ask taking them all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import documents  # noqa: E402
from bench.gpu_repeat import record  # noqa: E402
from bench.gpu_soak import celery_worker, ensure_preset, free_port, page, redis_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "routing_cpu.json"
WORKERS = ("a", "b")


def own_queue(text: str) -> str:
    """The worker queue of a document: the worker whose hash with the document's digest is highest."""
    doc = hashlib.sha256(text.encode()).hexdigest()
    return "gpu." + max(WORKERS, key=lambda name: hashlib.sha256(f"{name}:{doc}".encode()).digest())


def ask(docs: list[documents.Document], questions: int, tokens: int, routed: bool, seed: int) -> dict[str, Any]:
    """Every document's questions in rounds, to ``gpu`` or (``routed``) to the document's worker queue."""
    from glyphq.producer import submit_document

    rng = random.Random(seed)
    asks = {doc.seed: documents.questions(doc, questions) for doc in docs}
    records, pids = [], {doc.seed: set() for doc in docs}
    started = time.monotonic()
    for round_ in range(questions):
        order = rng.sample(docs, len(docs))
        jobs = [(doc, submit_document(doc.text, asks[doc.seed][round_], max_new_tokens=tokens,
                                      queue=own_queue(doc.text) if routed else None)) for doc in order]
        for doc, job in jobs:
            result = job.result(timeout=300)
            records.append(record(result, doc.pages))
            pids[doc.seed].add(result["worker"]["pid"])
    tokens_in = sum(r["tokens_in"] for r in records)
    cached = sum(r["prefix_cached_tokens"] for r in records)
    pages = sum(r["pages"] or 0 for r in records)
    encoded = sum(r["encoder_cached_pages"] for r in records)
    return {"jobs": len(records), "tokens_in": tokens_in, "prefix_cached_tokens": cached,
            "prefix_cached_share": round(cached / tokens_in, 4) if tokens_in else None, "pages": pages,
            "encoder_cached_pages": encoded, "encoder_cached_share": round(encoded / pages, 4) if pages else None,
            "docs_on_both_workers": sum(1 for seen in pids.values() if len(seen) > 1),
            "pages_mismatch": sum(1 for r in records if r["pages"] != r["pages_asked"]),
            "queues": sorted({own_queue(doc.text) for doc in docs}) if routed else ["gpu"],
            "wall_s": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=str(RESULT), help="the JSON file to write")
    parser.add_argument("--model-dir", default="/tmp/glyphq-routing-tiny")
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--questions", type=int, default=4, help="questions about each document")
    parser.add_argument("--min-pages", type=int, default=2)
    parser.add_argument("--max-pages", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=2, help="GLYPHQ_MAX_BATCH of both GPU workers")
    args = parser.parse_args(argv)

    started = time.monotonic()
    ensure_preset(args.model_dir, "tiny")
    port = free_port()
    os.environ["GLYPHQ_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"  # before the producer reads its settings
    env = {**os.environ, "GLYPHQ_MODEL": args.model_dir, "GLYPHQ_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1",
           "GLYPHQ_MAX_BATCH": str(args.max_batch), "GLYPHQ_DECODE_MAX_TOKENS": "4096", "OMP_NUM_THREADS": "1"}
    pages = documents.spread(args.docs, args.min_pages, args.max_pages)
    figures: dict[str, Any] = {"docs": args.docs, "questions": args.questions, "pages": pages,
                               "max_batch": args.max_batch, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with redis_server(port) as workdir, ExitStack() as workers:
        workers.enter_context(celery_worker(env, "render", workdir, queues="render", concurrency=1))
        for name in WORKERS:
            workers.enter_context(celery_worker(env, f"gpu-{name}", workdir, queues=f"gpu,gpu.{name}"))
        from glyphq.producer import submit

        # Both workers are up once each has answered a job sent to its own queue.
        warm = [submit(page((320, 240), i), "What is here?", max_new_tokens=4, queue=f"gpu.{name}")
                for i, name in enumerate(WORKERS)]
        for job in warm:
            job.result(timeout=180)
        for case, routed, base in (("gpu", False, 100), ("own", True, 200)):
            docs = [documents.document(base + i, count) for i, count in enumerate(pages)]
            figures[case] = ask(docs, args.questions, args.max_new_tokens, routed, seed=base)
            print(case, json.dumps(figures[case]), flush=True)
    figures["seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")

    print(f"\nA document's questions over two GPU workers (tiny model, CPU; {args.docs} documents of "
          f"{min(pages)}-{max(pages)} pages, {args.questions} questions each)")
    print(f"  {'sent to':<22}{'prompt tokens':>14}{'from shared blocks':>20}{'share':>8}{'pages cached':>14}"
          f"{'docs on both':>14}")
    for case, label in (("gpu", "gpu (either worker)"), ("own", "gpu.a / gpu.b by hash")):
        row = figures[case]
        print(f"  {label:<22}{row['tokens_in']:>14}{row['prefix_cached_tokens']:>20}{row['prefix_cached_share']:>8}"
              f"{row['encoder_cached_pages']:>8} / {row['pages']:<4}{row['docs_on_both_workers']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
