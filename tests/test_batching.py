"""Decoding over the paged KV cache (``worker.paged``, ``worker.continuous``) against ``generate``, on the tiny model.

The route through the queue is tested in ``test_continuous.py``; these run the engine in process.
"""

from __future__ import annotations

import io
import shutil
import sysconfig
import threading
from pathlib import Path

import pytest
from conftest import png_bytes
from PIL import Image

from glyphq.celeryconfig import settings
from glyphq.worker.continuous import Continuous, reserved_slots
from glyphq.worker.engine import EngineJob, load

QUESTIONS = ["What is this?", "Describe the picture in a few words please", "Colour?", "Is there text on it"]


def test_engine_batch_equals_each_job_alone(tiny_model):
    """Rows that share steps write each job's own tokens (float32 on CPU)."""
    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model)}))
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=i)))],
                      question=QUESTIONS[i], max_new_tokens=10 + 3 * i) for i in range(4)]
    together = engine.answer(jobs, (1280, 720))
    alone = [engine.answer([job], (1280, 720))[0] for job in jobs]
    assert [r.answer for r in together] == [r.answer for r in alone]
    assert [r.tokens_out for r in together] == [r.tokens_out for r in alone]
    assert [r.tokens_in for r in together] == [r.tokens_in for r in alone]
    assert max(r.batch_size for r in together) == 4 and {r.batch_size for r in alone} == {1}
    assert len({r.tokens_in for r in together}) > 1, "prompts of different lengths"


def test_rows_join_and_leave_between_steps(endless_model):
    """Two slots, five jobs: each job starts as a slot frees, the most urgent first, and ends at its own length."""
    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "2"}))
    running = Continuous(engine, (1280, 720))
    lengths = {"a": 40, "b": 8, "c": 24, "d": 8, "urgent": 8}
    for key in ("a", "b", "c", "d"):
        running.add(key, EngineJob([Image.open(io.BytesIO(png_bytes(seed=len(key))))], key, lengths[key]), priority=5)
    running.add("urgent", EngineJob([Image.open(io.BytesIO(png_bytes(seed=9)))], "now", 8), priority=0)
    order = [f.key for f in running.run()]
    assert order[0] == "urgent", order  # admitted first, and short
    assert order.index("b") < order.index("a"), "a short row leaves before a long one that started before it"
    assert order.index("a") < order.index("d"), "d waited for a free slot: the third one, after urgent and b"
    assert sorted(order) == sorted(lengths)


def test_a_cancelled_job_frees_its_slot_and_the_others_decode_on(endless_model):
    """A row dropped between steps frees its slot for a waiting job; a waiting job is dropped unstarted;
    every other job writes exactly the tokens it writes alone."""
    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "2"}))
    jobs = {key: EngineJob([Image.open(io.BytesIO(png_bytes(size=(200 + 40 * i, 150), seed=20 + i)))],
                           QUESTIONS[i], 40) for i, key in enumerate(("a", "b", "c", "d"))}
    running = Continuous(engine, (1280, 720))
    for key, job in jobs.items():
        running.add(key, job)
    while len(running.rows) < 2:
        assert running.step() == []
    assert sorted(running.in_hand()) == ["a", "b", "c", "d"]
    assert running.cancel("b") and running.cancel("d"), "a decoding row and a waiting job"
    assert not running.cancel("b"), "dropped already"
    assert running.free_slots == 1 and running.in_hand() == ["c", "a"]
    finished = {f.key: f.outcome for f in running.run()}
    assert sorted(finished) == ["a", "c"]
    for key, outcome in finished.items():
        alone = engine.answer([jobs[key]], (1280, 720))[0]
        assert (outcome.answer, outcome.tokens_out) == (alone.answer, alone.tokens_out), key


def test_a_kept_slot_takes_an_urgent_job_while_others_wait(endless_model):
    """Sixteen slots keep one for urgent jobs: fifteen long rows and a waiting job of normal priority
    leave it free, and an urgent job added later starts at the next iteration."""
    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "16"}))
    running = Continuous(engine, (320, 240), urgent_priority=0)
    assert running.reserved == reserved_slots(16) == 1
    page = Image.open(io.BytesIO(png_bytes(seed=3)))
    for i in range(16):
        running.add(f"long{i}", EngineJob([page], "long", 600), priority=5)
    while len(running.rows) < 15:
        running.step()
    running.step()
    assert len(running.rows) == 15 and [w.key for w in running.waiting] == ["long15"], "the kept slot stays free"
    assert running.room_for(5) <= 0 < running.room_for(0)
    running.add("urgent", EngineJob([page], "now", 40), priority=0)
    while any(w.key == "urgent" for w in running.waiting):
        running.step()
    assert len(running.rows) == 16 and any(row.waiting.key == "urgent" for row in running.rows.values())
    order = [f.key for f in running.run()]
    assert order[0] == "urgent" and sorted(order) == sorted(["urgent", *(f"long{i}" for i in range(16))])


def test_a_slow_page_does_not_hold_up_the_rows_decoding(endless_model):
    """A job's pages are decoded in a thread: rows keep decoding meanwhile, and a page that fails to
    decode fails its own job only."""
    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "4"}))
    running = Continuous(engine, (320, 240))
    page = Image.open(io.BytesIO(png_bytes(seed=4)))
    decoding = threading.Event()

    def slow_pages() -> list[Image.Image]:
        decoding.wait(30)
        return [page]

    def broken_pages() -> list[Image.Image]:
        raise ValueError("image_keys[0]: not an image")

    running.add("busy", EngineJob([page], "long", 400))
    running.step()
    running.add("slow", EngineJob(slow_pages, "late", 8))
    running.add("broken", EngineJob(broken_pages, "bad", 8))
    steps_before = running.stats.steps
    outcomes = {}
    for _ in range(5):
        outcomes.update({f.key: f.outcome for f in running.step()})
    assert "slow" not in outcomes and any(w.key == "slow" for w in running.waiting)
    assert running.stats.steps >= steps_before + 4 * 16, "the busy row kept decoding"
    decoding.set()
    outcomes.update({f.key: f.outcome for f in running.run()})
    assert isinstance(outcomes["broken"], Exception) and "image_keys[0]" in str(outcomes["broken"])
    assert outcomes["slow"].tokens_out == 8 and outcomes["busy"].tokens_out == 400


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
    assert len({r.tokens_in for r in together}) > 1, "prompts of different lengths"
    assert [r.token_ids for r in together] == expected
    assert [static.answer([job], (1280, 720))[0].token_ids for job in jobs] == expected
    assert [len(ids) for ids in expected] == [20, 27, 34, 41]
    assert all(rows in (1, 2, 4, 8) and length == 256 for rows, length in static.decoder.graphs), \
        "rows and cache length are bucketed"


def test_repetition_penalty_same_in_static_and_generate(tiny_model):
    """GLYPHQ_REPETITION_PENALTY changes what the model writes, and the paged decoder (its step as the
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


def test_static_decoding_grows_into_longer_buckets(endless_model):
    """Rows start in a short cache bucket and move to longer ones as they grow, with generate's tokens."""
    env = {"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "2", "GLYPHQ_DECODE_MAX_TOKENS": "1024"}
    plain = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "generate"}))
    static = load(settings.__class__.from_env({**env, "GLYPHQ_DECODE": "static"}))
    jobs = [EngineJob(images=[Image.open(io.BytesIO(png_bytes(seed=40 + i)))], question=QUESTIONS[i],
                      max_new_tokens=300) for i in range(2)]
    expected = [r.token_ids for r in plain.answer(jobs, (1280, 720))]
    assert [r.token_ids for r in static.answer(jobs, (1280, 720))] == expected
    assert [len(ids) for ids in expected] == [300, 300]
    assert {(2, 256), (2, 320), (2, 384)} <= set(static.decoder.graphs), "a quarter octave at a time"


def test_decode_steps_captured_ahead_answer_as_usual(tiny_model):
    """A successor captures its predecessor's decode steps before it takes jobs (``PagedDecoder.warm``)."""
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
    used = static.decoder.buckets_in_use()
    assert used and all(static.decoder.graphs[shape].uses > 1 for shape in used)
    assert [static.decoder.graphs[shape].uses for shape in used] == sorted(
        (static.decoder.graphs[shape].uses for shape in used), reverse=True), "most used first"
    assert static.warm_up((320, 240)) > 0 and (2, 256) in static.decoder.graphs


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc"))
                    or not Path(sysconfig.get_paths()["include"], "Python.h").exists(),
                    reason="torch.compile on the CPU needs a C compiler and Python's headers")
def test_compiled_slot_decoding_equals_generate(tiny_model):
    """GLYPHQ_DECODE_COMPILE (on by default on CUDA; forced here on the CPU): decode steps run through
    ``torch.compile``d layers, traced once for all layers, and give generate's tokens, batched and alone.
    """
    import torch
    from torch._dynamo.utils import counters

    from glyphq.worker.paged import PagedDecoder

    plain = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    compiled = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    compiled.slots = compiled.decoder = PagedDecoder(compiled.model, max_batch=4, max_tokens=512, max_new_tokens=64,
                                                     pad_id=compiled.pad_id, pool_tokens=4096, compile_layers=True,
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
    # batch 1 and one for every other batch, even batch 4, which equals the tiny model's 4 heads (no
    # duck shaping, see worker.decode._compile_decoder_layers). Never one per layer, nor per bucket.
    assert 0 < counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])
    assert [layer.self_attn.layer_idx for layer in compiled.model.get_decoder().layers] == list(range(layers))


@pytest.mark.parametrize("error", ["job", "device"])
def test_a_failed_prefill_fails_its_job_unless_the_device_failed(endless_model, monkeypatch, error):
    """A prefill that raises fails that job alone, and the rows decoding go on; a CUDA error
    (``torch.AcceleratorError``) in a prefill is the device's, so it leaves the step as
    ``DeviceFailed`` and fails no job."""
    import torch

    from glyphq.worker.errors import DeviceFailed, ModelError
    from glyphq.worker.paged import PagedDecoder

    engine = load(settings.__class__.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "4"}))
    running = Continuous(engine, (320, 240))
    page = Image.open(io.BytesIO(png_bytes(seed=5)))
    running.add("busy", EngineJob([page], "long", 60))
    running.step()
    real_start = PagedDecoder.start
    failure = RuntimeError("bad shapes") if error == "job" else torch.AcceleratorError("CUDA error: illegal address")

    def failing_start(self, row, prompt, *args, **kwargs):
        raise failure

    monkeypatch.setattr(PagedDecoder, "start", failing_start)
    running.add("joining", EngineJob([page], "short", 8))
    outcomes: dict = {}

    def step_until_joining_is_admitted() -> None:
        while any(w.key == "joining" for w in running.waiting):  # its page is decoded in a thread first
            outcomes.update({f.key: f.outcome for f in running.step()})

    try:
        if error == "device":
            with pytest.raises(DeviceFailed, match="illegal address"):
                step_until_joining_is_admitted()
            assert not outcomes and [row.waiting.key for row in running.rows.values()] == ["busy"], "no job failed"
            return
        step_until_joining_is_admitted()
        assert isinstance(outcomes["joining"], ModelError) and "bad shapes" in str(outcomes["joining"])
        monkeypatch.setattr(PagedDecoder, "start", real_start)
        rest = {f.key: f.outcome for f in running.run()}
        assert rest["busy"].tokens_out == 60
    finally:
        running.close()
