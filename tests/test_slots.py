"""A successor's decoder (``worker.slots``): a provisional cache first, the full one later, on the tiny model.

The hand-over itself, through real worker children, is tested in ``test_handover.py``; this runs the
decoder in process, against one whose cache was allocated when it loaded (float32 on the CPU: exact).
"""

from __future__ import annotations

import gc
import io
import shutil
import sysconfig
import weakref
from pathlib import Path

import pytest
import torch
from conftest import png_bytes
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.worker import memory
from glyphq.worker.engine import EngineJob, load
from glyphq.worker.slots import PROVISIONAL_ROWS, Admission, SlotDecoder

QUESTIONS = ["What is this?", "Describe the picture in a few words please", "Colour?", "Is there text on it"]
GB = 1e9


def _jobs(count: int, seed: int) -> list[EngineJob]:
    return [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=seed + i)))],
                      question=QUESTIONS[i % len(QUESTIONS)], max_new_tokens=30 + 11 * i) for i in range(count)]


def test_provisional_then_full_cache_decodes_as_a_cache_allocated_up_front(endless_model):
    env = {"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "8", "GLYPHQ_DECODE_MAX_TOKENS": "1024"}
    up_front = load(Settings.from_env(env))
    deferred = load(Settings.from_env(env), defer_cache=True)
    decoder = deferred.decoder
    assert not up_front.decoder.provisional and up_front.decoder.cache_rows == 8
    assert decoder.provisional and decoder.cache_rows == PROVISIONAL_ROWS
    assert decoder.cache_bytes() * 8 == up_front.decoder.cache_bytes() * PROVISIONAL_ROWS
    assert decoder.cache_bytes(8) == up_front.decoder.cache_bytes()
    first, later = _jobs(2, seed=60), _jobs(6, seed=70)
    expected_first = [r.token_ids for r in up_front.answer(first, (1280, 720))]
    expected_later = [r.token_ids for r in up_front.answer(later, (1280, 720))]

    # Before the predecessor leaves: two rows decode in the provisional cache, a third does not fit.
    assert [r.token_ids for r in deferred.answer(first, (1280, 720))] == expected_first
    assert decoder.warm(1, 512) and decoder.warm(2, 512) and not decoder.warm(4, 256)
    with pytest.raises(ValueError, match="provisional cache"):
        decoder.decode(3, 256, 1)
    captured = set(decoder.graphs)
    assert {(1, 512), (2, 512), (2, 256)} <= captured

    # The predecessor has left: the full cache replaces the provisional one, which is freed, even out of
    # the collector's reach (a successor freezes what it holds before it takes over).
    provisional = weakref.ref(decoder.cache.keys[0])
    gc.collect()
    gc.freeze()
    try:
        assert decoder.allocate()
        assert provisional() is None, "the provisional cache is still held"
    finally:
        gc.unfreeze()
    assert not decoder.provisional and decoder.cache_rows == 8 and decoder.graphs == {}
    assert decoder.allocate(), "a full cache stays as it is"
    assert decoder.warm(4, 256) and decoder.warm(8, 1024)

    results = deferred.answer(later, (1280, 720))
    assert [r.token_ids for r in results] == expected_later
    assert max(r.batch_size for r in results) > PROVISIONAL_ROWS, "rows beyond the provisional cache decoded"
    assert [r.token_ids for r in deferred.answer(first, (1280, 720))] == expected_first


def test_the_cache_grows_only_between_batches(endless_model):
    env = {"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "4", "GLYPHQ_DECODE_MAX_TOKENS": "512"}
    deferred = load(Settings.from_env(env), defer_cache=True)
    decoder = deferred.decoder
    job = _jobs(1, seed=80)[0]
    decoder.admit([Admission(0, deferred.process(job, job.images))])
    with pytest.raises(RuntimeError, match="rows are decoding"):
        decoder.allocate()
    decoder.release(0)
    assert decoder.allocate() and decoder.cache_rows == 4


def test_a_successor_needs_its_predecessors_memory_but_the_cache():
    """The figures of Glyph at the defaults on an H200 (README): a 91 GB cache, 20.6 GB of weights."""
    cache, provisional = 91.3 * GB, 91.3 * GB * PROVISIONAL_ROWS / 64
    peak = 20.6 * GB + cache + 4 * GB  # weights, cache, a batch's working memory
    free = 150 * GB - peak
    assert memory.successor_bytes(peak, cache, provisional) == pytest.approx(1.1 * (24.6 + 2.85) * GB, rel=0.01)
    assert memory.successor_fits(free, peak, peak, cache, provisional)
    assert not free > memory.SUCCESSOR_HEADROOM * peak, "what a whole second child needs does not fit"
    # This child may grow back to its peak while the successor loads: that is not free for it.
    assert not memory.successor_fits(free, peak - 10 * GB, peak, cache, provisional)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc"))
                    or not Path(sysconfig.get_paths()["include"], "Python.h").exists(),
                    reason="torch.compile on the CPU needs a C compiler and Python's headers")
def test_what_is_compiled_on_the_provisional_cache_serves_the_full_one(tiny_model):
    """Compiled layers (as on CUDA; forced here on the CPU) traced on batches 1 and 2 of the provisional
    cache, at a short length and at the full one (where a view is contiguous), trace nothing more for
    any batch of the full cache: a successor compiles before its predecessor leaves, not after."""
    from torch._dynamo.utils import counters

    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    decoder = SlotDecoder(engine.model, max_batch=8, max_tokens=1024, max_new_tokens=64, pad_id=engine.pad_id,
                          compile_layers=True, allocate=False)
    assert decoder.compiled and decoder.provisional
    torch._dynamo.reset()
    counters.clear()
    for rows, length in [(1, 256), (2, 256), (1, 1024), (2, 1024)]:
        decoder.decode(rows, length, 1)  # no row is active: each step reads column 0 and writes nothing
    traced = counters["stats"]["unique_graphs"]
    assert traced > 0
    assert decoder.allocate()
    for rows, length in [(8, 256), (4, 512), (2, 1024), (8, 1024), (1, 512), (4, 256)]:
        decoder.decode(rows, length, 1)
    assert counters["stats"]["unique_graphs"] == traced, "traced again on the full cache"
