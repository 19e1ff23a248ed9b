"""A worker whose KV cache pool is small: it starts, answers every job once, and its child stays small.

A real redis-server, a real worker subprocess and the tiny model that never ends a turn. On the CPU
the pool is a fixed token count (``GLYPHQ_KV_CACHE_TOKENS``); here 8 blocks, so four jobs of about
200 tokens each cannot all decode at once and rows are preempted.
"""

from __future__ import annotations

import psutil
from conftest import png_bytes

from glyphq.producer import submit
from glyphq.worker.blocks import BLOCK_TOKENS

#: Resident memory a tiny-model child may hold (torch, transformers, the model and its pool).
CHILD_RSS_LIMIT = 800 * 1024 * 1024


def test_a_worker_with_a_small_pool_answers_every_job(start_worker, endless_model):
    worker = start_worker(model=str(endless_model), kv_cache_tokens=8 * BLOCK_TOKENS, max_batch=4)
    jobs = [submit(png_bytes(seed=1200 + i), "A long answer please", max_new_tokens=150) for i in range(4)]
    results = [job.result(timeout=180) for job in jobs]
    assert [r["tokens_out"] for r in results] == [150] * 4
    assert "preempted a job" in worker.log(), "the pool ran dry and rows ran again later"
    (child,) = worker.children()
    assert psutil.Process(child).memory_info().rss < CHILD_RSS_LIMIT
