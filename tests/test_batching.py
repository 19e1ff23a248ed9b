"""Micro-batching of the gpu queue: a real redis-server, a real worker subprocess, the tiny model.

Jobs are queued before the worker starts, so they are waiting together and form batches.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import png_bytes, raw_job, wait_until
from PIL import Image

from glyphq.celeryconfig import settings
from glyphq.producer import Job, JobFailed, submit
from glyphq.producer.schema import ANSWER_TASK
from glyphq.producer.store import Store, blob_key, queue_depths
from glyphq.tasks.app import app
from glyphq.worker.decode import prefill_groups
from glyphq.worker.engine import EngineJob, load

QUESTIONS = ["What is this?", "Describe the picture in a few words please", "Colour?", "Is there text on it"]


def _jobs(count: int, tokens: int = 12, seed: int = 100) -> list:
    return [submit(png_bytes(size=(320 + 40 * i, 240 + 16 * i), seed=seed + i), QUESTIONS[i % len(QUESTIONS)],
                   max_new_tokens=tokens + i) for i in range(count)]


def test_engine_batch_equals_each_job_alone(tiny_model):
    """Left padding must not change a row: the same tokens batched as alone (float32 on CPU)."""
    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model)}))
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=i)))],
                      question=QUESTIONS[i], max_new_tokens=10 + 3 * i) for i in range(4)]
    together = engine.answer(jobs, (1280, 720))
    alone = [engine.answer([job], (1280, 720))[0] for job in jobs]
    assert [r.answer for r in together] == [r.answer for r in alone]
    assert [r.tokens_out for r in together] == [r.tokens_out for r in alone]
    assert [r.tokens_in for r in together] == [r.tokens_in for r in alone]
    assert {r.batch_size for r in together} == {4} and {r.batch_size for r in alone} == {1}
    assert len({r.tokens_in for r in together}) > 1, "prompts of different lengths, so some rows are padded"


def test_batched_answers_equal_unbatched(start_worker):
    unbatched_jobs = _jobs(6)
    worker = start_worker(max_batch=1, batch_delay_ms=0)
    unbatched = [job.result(timeout=120) for job in unbatched_jobs]
    worker.stop()

    batched_jobs = _jobs(6)  # the same images and questions
    start_worker(max_batch=4, batch_delay_ms=200)
    batched = [job.result(timeout=120) for job in batched_jobs]

    assert {r["worker"]["batch_size"] for r in unbatched} == {1}
    assert max(r["worker"]["batch_size"] for r in batched) == 4
    assert [r["answer"] for r in batched] == [r["answer"] for r in unbatched]
    assert [r["tokens_out"] for r in batched] == [r["tokens_out"] for r in unbatched]
    assert [r["tokens_out"] for r in batched] == [12 + i for i in range(6)], "each job keeps its own max_new_tokens"


def test_bad_job_in_a_batch_fails_alone(start_worker, redis_client):
    good = _jobs(3)
    missing = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(blob_key("ab" * 32))}, queue="gpu")
    broken_bytes = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # a PNG signature with nothing behind it
    broken_key = blob_key(hashlib.sha256(broken_bytes).hexdigest())
    redis_client.set(broken_key, broken_bytes)
    broken = app.send_task(ANSWER_TASK, kwargs={"job": raw_job(broken_key)}, queue="gpu")
    more = _jobs(2, seed=200)
    worker = start_worker(max_batch=8, batch_delay_ms=300)

    with pytest.raises(Exception, match="blob"):
        missing.get(timeout=60)
    with pytest.raises(Exception, match="image"):
        broken.get(timeout=60)
    results = [job.result(timeout=60) for job in good + more]
    assert all(r["answer"] for r in results)
    assert {r["worker"]["batch_size"] for r in results} == {5}, "the good jobs answered together"
    assert len({r["worker"]["pid"] for r in results}) == 1
    assert worker.proc.poll() is None
    with pytest.raises(JobFailed, match="blob"):
        Job(missing.id).result(timeout=5)


def test_sigkill_in_the_middle_of_a_batch_loses_nothing(start_worker, endless_model):
    jobs = [submit(png_bytes(seed=300 + i), "A long answer please", max_new_tokens=600) for i in range(4)]
    worker = start_worker(model=endless_model, max_batch=4, batch_delay_ms=500)
    store = Store(settings)
    assert wait_until(lambda: all(store.runs(j.id) == 1 and j.state == "STARTED" for j in jobs), 90), \
        "the batch never started"
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)

    results = [job.result(timeout=300) for job in jobs]
    assert all(r["tokens_out"] == 600 for r in results)
    assert {r["worker"]["pid"] for r in results}.isdisjoint({child})
    assert [store.runs(j.id) for j in jobs] == [2, 2, 2, 2], "each job ran again exactly once"


def test_the_next_batch_waits_in_the_worker(start_worker, endless_model):
    """While a batch runs, the worker already holds the next one, so it starts full and at once."""
    jobs = [submit(png_bytes(seed=500 + i), "A long answer please", max_new_tokens=2000) for i in range(12)]
    start_worker(model=endless_model, max_batch=4, batch_delay_ms=300)
    assert wait_until(lambda: sum(j.state == "STARTED" for j in jobs) == 4, 90), "the first batch never started"
    # 4 running, 4 reserved by the worker, 4 left in Redis.
    assert wait_until(lambda: queue_depths(settings, ("gpu",))["gpu"] == 4, 10), queue_depths(settings, ("gpu",))
    results = [job.result(timeout=300) for job in jobs]
    assert [r["worker"]["batch_size"] for r in results] == [4] * 12, "every batch full, none cut by the delay"


def test_batch_of_one_without_delay_behaves_unbatched(start_worker, endless_model, redis_client):
    """GLYPHQ_MAX_BATCH=1 and GLYPHQ_BATCH_DELAY_MS=0: one job per generate, the rest left in Redis."""
    long_job = submit(png_bytes(seed=400), "A long answer please", max_new_tokens=2000, priority=5)
    worker = start_worker(model=endless_model, max_batch=1, batch_delay_ms=0)
    assert wait_until(lambda: long_job.state == "STARTED", 90)
    low = [submit(png_bytes(seed=410 + i), "low", priority=0, max_new_tokens=3) for i in range(3)]
    urgent = submit(png_bytes(seed=420), "urgent", priority=9, max_new_tokens=3)
    time.sleep(1)
    # Only the running job is reserved by the worker; the others wait in Redis, as without batching.
    assert queue_depths(settings, ("gpu",))["gpu"] == 4
    results = [job.result(timeout=180) for job in [long_job, urgent, *low]]
    assert [r["worker"]["task_index"] for r in results] == [1, 2, 3, 4, 5], "urgent first, then in order"
    assert {r["worker"]["batch_size"] for r in results} == {1}
    assert len({r["worker"]["pid"] for r in results}) == 1
    assert worker.proc.poll() is None


def test_static_decoding_equals_generate(tiny_model):
    """GLYPHQ_DECODE=static (the GPU path, here without CUDA graphs) gives generate's tokens, batched and alone."""
    plain = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    static = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "static",
                                               "GLYPHQ_MAX_BATCH": "8"}))
    assert plain.decoder is None and static.decoder is not None
    # One to three pages each: prompts of quite different lengths, prefilled in separate passes.
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=i + page)))
                              for page in range(1 + i % 3)],
                      question=QUESTIONS[i], max_new_tokens=20 + 7 * i) for i in range(4)]
    expected = [r.token_ids for r in plain.answer(jobs, (1280, 720))]
    together = static.answer(jobs, (1280, 720))
    assert len(prefill_groups([r.tokens_in for r in together])) > 1
    assert [r.token_ids for r in together] == expected
    assert [static.answer([job], (1280, 720))[0].token_ids for job in jobs] == expected
    assert [len(ids) for ids in expected] == [20, 27, 34, 41]
    assert set(static.decoder.graphs) == {(1, 256), (4, 256)}, "batch and cache length are bucketed"


def test_repetition_penalty_same_in_static_and_generate(tiny_model):
    """GLYPHQ_REPETITION_PENALTY changes what the model writes, and the static decoder (its step as the
    CUDA graph runs it) writes the same tokens as generate, batched and alone."""
    env = {"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_MAX_BATCH": "4", "GLYPHQ_DECODE_MAX_TOKENS": "512",
           "GLYPHQ_REPETITION_PENALTY": "1.3"}
    plain = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "generate"}))
    static = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "static"}))
    unpenalized = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "generate",
                                                    "GLYPHQ_REPETITION_PENALTY": "1.0"}))
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=30 + i)))],
                      question=QUESTIONS[i], max_new_tokens=24) for i in range(3)]
    expected = [r.token_ids for r in plain.answer(jobs, (1280, 720))]
    assert [r.token_ids for r in static.answer(jobs, (1280, 720))] == expected
    assert [static.answer([job], (1280, 720))[0].token_ids for job in jobs] == expected
    assert [r.token_ids for r in unpenalized.answer(jobs, (1280, 720))] != expected


def test_static_decoding_grows_into_longer_buckets(endless_model, monkeypatch):
    """A batch starts in a short cache bucket and moves to longer ones as it grows, with generate's tokens."""
    from glyphq.worker import decode

    monkeypatch.setattr(decode, "START_NEW_TOKENS", 16)
    env = {"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "2", "GLYPHQ_DECODE_MAX_TOKENS": "1024"}
    plain = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "generate"}))
    static = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "static"}))
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(seed=40 + i)))], question=QUESTIONS[i],
                      max_new_tokens=300) for i in range(2)]
    prompt_len = max(r.tokens_in for r in plain.answer(jobs, (1280, 720)))
    assert static.decoder.lengths_for(prompt_len, 300) == [256, 512]
    expected = [r.token_ids for r in plain.answer(jobs, (1280, 720))]
    assert [r.token_ids for r in static.answer(jobs, (1280, 720))] == expected
    assert [len(ids) for ids in expected] == [300, 300]
    assert {(2, 256), (2, 512)} <= set(static.decoder.graphs)


def test_decode_steps_captured_ahead_answer_as_usual(tiny_model):
    """A successor captures its predecessor's decode steps before it takes jobs (``StaticDecoder.warm``)."""
    plain = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    static = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "static",
                                               "GLYPHQ_MAX_BATCH": "8", "GLYPHQ_DECODE_MAX_TOKENS": "1024"}))
    assert static.decoder.warm(4, 256) and static.decoder.warm(1, 512)
    assert not static.decoder.warm(3, 256), "not a bucket"
    assert not static.decoder.warm(16, 256) and not static.decoder.warm(4, 2048), "larger than the cache"
    assert set(static.decoder.graphs) == {(4, 256), (1, 512)}
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=i)))],
                      question=QUESTIONS[i], max_new_tokens=10 + 3 * i) for i in range(4)]
    expected = [r.token_ids for r in plain.answer(jobs, (1280, 720))]
    assert [r.token_ids for r in static.answer(jobs, (1280, 720))] == expected
    assert [r.token_ids for r in static.answer(jobs[:3], (1280, 720))] == expected[:3]
    assert static.decoder.buckets_in_use() == [(4, 256)], "a step used for one batch is not worth capturing ahead"
    for _ in range(3):
        static.answer(jobs[:1], (1280, 720))
    assert static.decoder.buckets_in_use() == [(1, 256), (4, 256)], "most used first"
    assert static.warm_up((320, 240)) > 0 and (2, 256) in static.decoder.graphs


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc"))
                    or not Path(sysconfig.get_paths()["include"], "Python.h").exists(),
                    reason="torch.compile on the CPU needs a C compiler and Python's headers")
def test_compiled_static_decoding_equals_generate(tiny_model):
    """GLYPHQ_DECODE_COMPILE (on by default on CUDA; forced here on the CPU): decode steps run through
    ``torch.compile``d layers, traced once for all layers, and give generate's tokens, batched and alone.
    """
    import torch
    from torch._dynamo.utils import counters

    from glyphq.worker.decode import StaticDecoder

    plain = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    compiled = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    compiled.decoder = StaticDecoder(compiled.model, max_batch=4, max_tokens=512, max_new_tokens=64,
                                     pad_id=compiled.pad_id, compile_layers=True,
                                     repetition_penalty=compiled.repetition_penalty)
    assert compiled.decoder.compiled
    torch._dynamo.reset()
    counters.clear()
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=i)))],
                      question=QUESTIONS[i], max_new_tokens=12 + 5 * i) for i in range(4)]
    expected = [r.token_ids for r in plain.answer(jobs, (1280, 720))]
    assert [r.token_ids for r in compiled.answer(jobs, (1280, 720))] == expected
    assert [compiled.answer([job], (1280, 720))[0].token_ids for job in jobs] == expected
    assert [compiled.answer(jobs[:2], (1280, 720))[i].token_ids for i in range(2)] == expected[:2]
    layers = len(compiled.model.get_decoder().layers)
    assert layers > 1
    # Per traced frame (layer, attention, and the two resumed after the cache update): one graph for
    # batch 1, one for every other batch, and here one more where batch 4 equals the tiny model's 4
    # heads (the compiler gives equal sizes one symbol). Never one per layer, nor per bucket.
    assert 0 < counters["stats"]["unique_graphs"] <= 12, dict(counters["stats"])
    assert [layer.self_attn.layer_idx for layer in compiled.model.get_decoder().layers] == list(range(layers))
