"""A worker whose KV cache pool is small: it starts, answers every job once, and its child stays small.

A real redis-server, a real worker subprocess and the tiny model that never ends a turn. On the CPU
the pool is a fixed token count (``GLYPHQ_KV_CACHE_TOKENS``); here 8 blocks, so four jobs of about
200 tokens each cannot all decode at once and rows are preempted.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from collections.abc import Callable

import psutil
import pytest
from conftest import free_port, png_bytes

from glyphq.producer import JobFailed, submit
from glyphq.producer.store import blob_key
from glyphq.tasks.app import app
from glyphq.worker.blocks import BLOCK_TOKENS

#: Resident memory a tiny-model child may hold (torch, transformers, the model and its pool).
CHILD_RSS_LIMIT = 800 * 1024 * 1024


def test_a_worker_with_a_small_pool_answers_every_job(start_worker, endless_model):
    port = free_port()
    worker = start_worker(model=str(endless_model), kv_cache_tokens=8 * BLOCK_TOKENS, max_batch=4, metrics_port=port)
    jobs = [submit(png_bytes(seed=1200 + i), "A long answer please", max_new_tokens=150) for i in range(4)]
    results = [job.result(timeout=180) for job in jobs]
    assert [r["tokens_out"] for r in results] == [150] * 4
    assert "preempted a job" in worker.log(), "the pool ran dry and rows ran again later"
    assert "KV cache pool: cpu, " in worker.log() and " 512 tokens in 8 blocks (" in worker.log(), \
        "the child's one line on its pool"
    (child,) = worker.children()
    assert psutil.Process(child).memory_info().rss < CHILD_RSS_LIMIT

    # Flower's stats section and /metrics count the preemptions once the child has tidied up.
    pool, scraped = _pool_when_idle(worker.name, port)
    assert pool["tokens"] == 8 * BLOCK_TOKENS and pool["blocks"] == 8 and pool["blocks_free"] == 8, pool
    assert pool["preemptions"] == worker.log().count("preempted a job") > 0, pool
    assert f"glyphq_kv_preemptions_total {float(pool['preemptions'])}" in scraped
    assert f"glyphq_kv_pool_tokens {float(8 * BLOCK_TOKENS)}" in scraped and "glyphq_kv_pool_blocks_free 8.0" in scraped


def _pool_when_idle(node: str, port: int, timeout: float = 30,
                    settled: Callable[[dict], bool] = lambda pool: pool["preemptions"] > 0) -> tuple[dict, str]:
    """The pool section of the worker's stats and its /metrics text, once the child has tidied up
    (``settled``: by default, after preemptions; the first reading, at start, has none) and every block
    is free again."""
    deadline = time.monotonic() + timeout
    while True:
        replies = app.control.inspect(destination=[node], timeout=5).stats() or {}
        pool = next(iter(replies.values()))["glyphq"]["pool"]
        if (settled(pool) and pool["blocks_used"] == 0) or time.monotonic() > deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return pool, response.read().decode()
        time.sleep(0.2)


#: A question long enough that the prompt fills a 64-token block (the tiny model's page is 16 tokens).
LONG_QUESTION = " ".join(["Read every line of this scanned page with care and say what it holds."] * 5)


def test_a_page_asked_about_again_is_read_from_the_caches_and_a_corrupt_blob_never_is(start_worker, endless_model,
                                                                                       redis_client):
    """The same page and question twice: the second job shares the first one's prompt block. A blob whose
    bytes changed under the page's key fails its job (the blob check comes first) and leaves the caches
    as they were: the next job with the right bytes still shares the block and answers the same."""
    port = free_port()
    worker = start_worker(model=str(endless_model), metrics_port=port)
    page = png_bytes(seed=77)
    first = submit(page, LONG_QUESTION, max_new_tokens=12).result(timeout=120)
    again = submit(page, LONG_QUESTION, max_new_tokens=12).result(timeout=120)
    assert first["timings"]["prefix_cached_tokens"] == 0
    assert again["timings"]["prefix_cached_tokens"] == BLOCK_TOKENS and again["answer"] == first["answer"]

    app.control.cancel_consumer("gpu", destination=[worker.name], reply=True)
    job = submit(page, LONG_QUESTION, max_new_tokens=12)
    key = blob_key(hashlib.sha256(page).hexdigest())
    assert redis_client.get(key) == page
    redis_client.set(key, png_bytes(seed=78), keepttl=True)  # other bytes under the page's key
    app.control.add_consumer("gpu", destination=[worker.name], reply=True)
    with pytest.raises(JobFailed, match="BlobCorrupt"):
        job.result(timeout=120)
    third = submit(page, LONG_QUESTION, max_new_tokens=12).result(timeout=120)
    assert third["timings"]["prefix_cached_tokens"] == BLOCK_TOKENS and third["answer"] == first["answer"]

    pool, scraped = _pool_when_idle(worker.name, port, settled=lambda p: p["prefix"]["hits"] >= 2)
    assert pool["prefix"]["enabled"] and pool["prefix"]["blocks"] >= 1 and pool["prefix"]["hits"] == 2, pool
    assert pool["encoder"]["max_bytes"] > 0 and pool["encoder"]["pages"] >= 1, pool
    assert 'glyphq_page_cache_events_total{cache="prefix",event="hit"} 2.0' in scraped
    assert 'glyphq_page_cache_size{cache="prefix"}' in scraped
