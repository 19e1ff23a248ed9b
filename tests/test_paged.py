"""The paged decoder (``worker.paged``) on the tiny models, against ``generate`` (float32 on the CPU: exact).

Rows joining mid-decode, a prompt split into chunks through its image, rows preempted when the pool
runs dry, GLM-4.1V's 3-D positions across chunks, and a successor's provisional pool that grows. The
hand-over through real worker children is tested in ``test_handover.py``.
"""

from __future__ import annotations

import io
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import glm4v_in_memory, png_bytes
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.worker import memory
from glyphq.worker.blocks import BLOCK_TOKENS
from glyphq.worker.continuous import Continuous
from glyphq.worker.engine import EngineJob, load
from glyphq.worker.paged import PROVISIONAL_TOKENS, PagedDecoder

QUESTIONS = ["What is this?", "Describe the picture in a few words please", "Colour?", "Is there text on it"]
GB = 1e9
BOX = (1280, 720)


def _jobs(count: int, seed: int, new: int = 30) -> list[EngineJob]:
    return [EngineJob(images=[Image.open(io.BytesIO(png_bytes(size=(200 + 60 * i, 150 + 30 * i), seed=seed + i)))],
                      question=QUESTIONS[i % len(QUESTIONS)], max_new_tokens=new + 11 * i) for i in range(count)]


def _generate(model: Path, jobs: list[EngineJob]) -> list[list[int]]:
    plain = load(Settings.from_env({"GLYPHQ_MODEL": str(model), "GLYPHQ_DECODE": "generate"}))
    return [plain.answer([job], BOX)[0].token_ids for job in jobs]


def test_rows_joining_mid_decode_write_generates_tokens(tiny_model):
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_MAX_BATCH": "4"}))
    jobs = _jobs(4, seed=90, new=40)
    expected = _generate(tiny_model, jobs)
    running = Continuous(engine, BOX)
    outcomes = {}
    for index, job in enumerate(jobs):
        running.add(index, job)
        for _ in range(2):  # the rows before it are decoding when it joins
            outcomes.update({f.key: f.outcome for f in running.step()})
    joined_while_decoding = any(row.decoding for row in running.rows.values())
    outcomes.update({f.key: f.outcome for f in running.run()})
    assert joined_while_decoding
    assert [outcomes[i].token_ids for i in range(4)] == expected
    assert max(outcomes[i].batch_size for i in range(4)) > 1


def test_a_prompt_split_into_three_chunks_through_its_image_writes_generates_tokens(tiny_model):
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_MAX_BATCH": "4"}))
    job, busy = _jobs(2, seed=100, new=24)
    expected = _generate(tiny_model, [job, busy])
    prompt = engine.process(job, job.pages())["input_ids"][0]
    image = (prompt == engine.image_token_id).nonzero()[:, 0].tolist()
    chunk = image[0] + (image[-1] - image[0]) // 2 + 1  # the first cut is inside the image
    assert len(prompt) > 2 * chunk and image[0] < chunk - 1 and chunk < image[-1] and len(prompt) <= 3 * chunk
    running = Continuous(engine, BOX, prefill_chunk=chunk)
    running.add("busy", busy)
    while not any(row.decoding for row in running.rows.values()):
        running.step()
    running.add("job", job)
    prefilled = []
    while "job" not in [row.waiting.key for row in running.rows.values() if row.decoding]:
        running.step()
        prefilled += [row.prefilled for row in running.rows.values() if row.waiting.key == "job"]
    assert prefilled[:3] == [chunk, 2 * chunk, len(prompt)], "three chunks, beside the decoding row"
    outcomes = {f.key: f.outcome for f in running.run()}
    assert [outcomes["job"].token_ids, outcomes["busy"].token_ids] == expected


def test_a_pool_too_small_for_every_job_preempts_and_answers_each_once(endless_model):
    """Five jobs of about 70 prompt tokens and 120 new ones in a pool of 8 blocks: rows are preempted
    when it runs dry, run again from their prompts and write generate's tokens."""
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "8",
                                     "GLYPHQ_KV_CACHE_TOKENS": str(8 * BLOCK_TOKENS)}))
    jobs = _jobs(5, seed=110, new=120)
    for job in jobs:
        job.max_new_tokens = 120
    expected = _generate(endless_model, jobs)
    running = Continuous(engine, BOX)
    for index, job in enumerate(jobs):
        running.add(index, job, priority=5)
    finished = running.run()
    assert sorted(f.key for f in finished) == list(range(5)), "each job answered once"
    assert running.stats.preemptions > 0
    outcomes = {f.key: f.outcome for f in finished}
    assert [outcomes[i].token_ids for i in range(5)] == expected
    assert engine.decoder.free_blocks == engine.decoder.pool.capacity, "every block given back"


def test_an_urgent_job_takes_blocks_from_the_youngest_less_urgent_row_and_every_answer_stays_generates(
        endless_model):
    """Two rows of priority 5 fill a pool of 8 blocks; an urgent job (priority 0, two blocks) that
    arrives then is admitted at once, by preempting the younger row, rather than waiting for a row to end."""
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "8",
                                     "GLYPHQ_KV_CACHE_TOKENS": str(8 * BLOCK_TOKENS)}))
    first, second, urgent = _jobs(3, seed=130, new=20)
    for job in (first, second):  # prompt and answer fill 4 blocks (256 tokens) but 6: the two fit the pool
        job.max_new_tokens = 4 * BLOCK_TOKENS - 6 - engine.process(job, job.pages())["input_ids"].shape[1]
    expected = _generate(endless_model, [first, second, urgent])
    running = Continuous(engine, BOX)
    for key, job in (("first", first), ("second", second)):
        running.add(key, job, priority=5)
        pages = running.waiting[-1].pages
        assert pages is not None
        pages.result()  # both start in the same iteration, and so grow in step
    outcomes = {}
    for _ in range(500):
        if engine.decoder.free_blocks < 2 and len(running.rows) == 2:
            break
        outcomes.update({f.key: f.outcome for f in running.step()})
    assert not outcomes and engine.decoder.free_blocks < 2 and running.stats.preemptions == 0
    running.add("urgent", urgent, priority=0)
    pages = running.waiting[-1].pages
    assert pages is not None
    pages.result()  # its pages are ready before the next iteration: it may start there
    outcomes.update({f.key: f.outcome for f in running.step()})
    assert sorted(row.waiting.key for row in running.rows.values()) == ["first", "urgent"]
    assert running.stats.preemptions == 1 and [w.key for w in running.waiting] == ["second"]
    rest = running.run()
    outcomes.update({f.key: f.outcome for f in rest})
    assert rest[0].key == "urgent", "the urgent job ends first"
    assert [outcomes[key].token_ids for key in ("first", "second", "urgent")] == expected


def test_glm4v_positions_stay_right_across_chunks_through_an_image():
    """GLM-4.1V's 3-D rotary positions (``get_rope_index``), sliced per chunk and continued for the
    decode steps, give ``generate``'s tokens; its image processor needs torchvision, so the prompt's
    pixels and grid are made here."""
    model = glm4v_in_memory()
    config = model.config
    grid = torch.tensor([[1, 4, 6]])  # 24 patches, 6 image tokens after the 2x2 merge
    patch = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
    ids = torch.tensor([[5, 6, 7, 122] + [120] * 6 + [123, 8, 9, 10, 11]])
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(24, patch),
              "image_grid_thw": grid, "mm_token_type_ids": (ids == 120).long()}
    with torch.inference_mode():
        expected = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, ids.shape[1]:].tolist()
    decoder = PagedDecoder(model, max_batch=2, max_tokens=256, max_new_tokens=16, pad_id=0, pool_tokens=512)
    length = ids.shape[1]
    assert decoder.reserve(1, length + 12)
    decoder.start(1, prompt)
    for start in range(0, length, 6):  # cuts at 6 and 12: inside the image, and after it
        decoder.prefill([(1, start, min(start + 6, length))])
    decoder.decode(2, length + 12, 11)
    assert decoder.tokens_of(1, 12) == expected
    assert decoder.prompts[1].delta < 0, "the image's positions are fewer than its tokens"


def test_provisional_then_full_pool_decodes_as_a_pool_allocated_up_front(endless_model):
    env = {"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_MAX_BATCH": "8", "GLYPHQ_KV_CACHE_TOKENS": "32768"}
    up_front = load(Settings.from_env(env))
    deferred = load(Settings.from_env(env), defer_cache=True)
    decoder = deferred.decoder
    assert not up_front.decoder.provisional and decoder.provisional
    assert decoder.pool_tokens == PROVISIONAL_TOKENS and up_front.decoder.pool_tokens == 32768
    assert decoder.pool_bytes() == up_front.decoder.pool_bytes() == up_front.decoder.token_bytes * (32768 + 64)
    first, later = _jobs(2, seed=60), _jobs(6, seed=70)
    expected_first = [r.token_ids for r in up_front.answer(first, BOX)]
    expected_later = [r.token_ids for r in up_front.answer(later, BOX)]

    # Before the predecessor leaves: jobs decode in the provisional pool, and steps are captured.
    assert [r.token_ids for r in deferred.answer(first, BOX)] == expected_first
    assert decoder.warm(1, 512) and decoder.warm(2, 512)
    assert {(1, 512), (2, 512)} <= set(decoder.graphs)

    # A row decoding while the pool grows keeps its blocks and what they hold.
    running = Continuous(deferred, BOX)
    running.add("row", later[0])
    while not any(row.decoding for row in running.rows.values()):
        running.step()
    running.step()
    provisional = decoder.kv
    assert decoder.allocate()
    assert decoder.kv is not provisional and not decoder.provisional and decoder.graphs == {}
    assert decoder.pool_tokens == 32768 and decoder.allocate(), "a full pool stays as it is"
    assert running.run()[0].outcome.token_ids == expected_later[0]
    del provisional

    results = deferred.answer(later, BOX)
    assert [r.token_ids for r in results] == expected_later
    assert max(r.batch_size for r in results) == 6


def test_a_successor_needs_its_predecessors_memory_but_the_pool():
    """Glyph on an H200: 20.6 GB of weights, a 90 GB pool; a successor's provisional pool is
    8,192 tokens of 40 KB."""
    pool, provisional = 90 * GB, PROVISIONAL_TOKENS * 40e3
    peak = 20.6 * GB + pool + 4 * GB  # weights, pool, a step's working memory
    free = 150 * GB - peak
    assert memory.successor_bytes(peak, pool, provisional) == pytest.approx(1.1 * (24.6 * GB + provisional), rel=0.01)
    assert memory.successor_fits(free, peak, peak, pool, provisional)
    assert not free > memory.SUCCESSOR_HEADROOM * peak, "what a whole second child needs does not fit"
    # This child may grow back to its peak while the successor loads: that is not free for it.
    assert not memory.successor_fits(free, peak - 10 * GB, peak, pool, provisional)


def test_a_pool_sized_from_the_card_leaves_room_for_a_successor_only_where_one_fits(tiny_model):
    """``size_from_card``'s arithmetic, with the card's figures given in tokens of the tiny model's KV
    cache: 20,000 tokens' worth of weights, a successor needs 1.1 x (weights + an 8,192-token
    provisional pool), and room for a successor is left only if 4 typical rows (4 x 1,536 tokens)
    still fit beside it. The pool is allocated for real (on the CPU)."""
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))

    def decoder_on(card_tokens: int, allocate: bool = True) -> PagedDecoder:
        decoder = PagedDecoder(engine.model, max_batch=4, max_tokens=1024, max_new_tokens=64, pad_id=engine.pad_id,
                               pool_tokens=PROVISIONAL_TOKENS, allocate=allocate)
        token = decoder.token_bytes
        weights, total = 20_000 * token, card_tokens * token

        def card_memory() -> tuple[int, int, int, int]:  # what CUDA would report: weights, the pool, nothing else
            held = weights + int(decoder.kv.nbytes)
            return total - held, total, held, held

        decoder.card_memory = card_memory  # type: ignore[method-assign]
        return decoder

    need = 1.1 * (20_000 + PROVISIONAL_TOKENS)  # in tokens: 31,011
    big = 75_000  # 0.9 x 75,000 - 20,000 = 47,500 tokens of room: a successor and 16,489 more
    decoder = decoder_on(big)
    tokens = decoder.size_from_card(0.9, 2048, encoder_bytes=0)
    assert decoder.successor_fits and decoder.successor_bytes == pytest.approx(need * decoder.token_bytes, rel=1e-6)
    assert tokens == decoder.pool_tokens == 16_489 // BLOCK_TOKENS * BLOCK_TOKENS
    assert not decoder.provisional

    small = 55_000  # 29,500 tokens of room: a successor would leave fewer than 4 typical rows
    decoder = decoder_on(small)
    tokens_small = decoder.size_from_card(0.9, 2048, encoder_bytes=0)
    assert tokens_small == 29_500 // BLOCK_TOKENS * BLOCK_TOKENS == decoder.pool_tokens
    assert not decoder.successor_fits and decoder.successor_bytes == 0

    # A successor plans the same pool while its predecessor holds the card, and takes it once it has left.
    successor = decoder_on(big, allocate=False)
    planned = successor.size_from_card(0.9, 2048, encoder_bytes=0)
    assert successor.provisional and successor.pool_tokens == PROVISIONAL_TOKENS
    assert successor.allocate() and successor.pool_tokens == planned == tokens and successor.successor_fits

    # By default the encoder cache takes a sixteenth of the pool's room, and a successor leaves it too.
    default = decoder_on(big)
    assert default.size_from_card(0.9, 2048) == pytest.approx(tokens * 15 / 16, abs=BLOCK_TOKENS)
    assert default.encoder_cache.max_bytes == pytest.approx(tokens * decoder.token_bytes / 16, rel=0.01)
    successor = decoder_on(big, allocate=False)
    successor.size_from_card(0.9, 2048)
    assert successor.allocate() and successor.pool_tokens == default.pool_tokens


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc"))
                    or not Path(sysconfig.get_paths()["include"], "Python.h").exists(),
                    reason="torch.compile on the CPU needs a C compiler and Python's headers")
def test_what_is_compiled_on_the_provisional_pool_serves_the_full_one(tiny_model):
    """Compiled layers (as on CUDA; forced here on the CPU) traced on batches 1 and 2 of the provisional
    pool, at a short length and a long one, trace nothing more for any batch of the full pool: a
    successor compiles before its predecessor leaves, not after."""
    from torch._dynamo.utils import counters

    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_DECODE": "generate"}))
    decoder = PagedDecoder(engine.model, max_batch=8, max_tokens=1024, max_new_tokens=64, pad_id=engine.pad_id,
                           pool_tokens=32768, compile_layers=True, allocate=False)
    assert decoder.compiled and decoder.provisional
    torch._dynamo.reset()
    counters.clear()
    for rows, length in [(1, 256), (2, 256), (1, 1024), (2, 1024)]:
        decoder.decode(rows, length, 1)  # no row decodes: each step reads block 0 and writes there
    traced = counters["stats"]["unique_graphs"]
    assert traced > 0
    assert decoder.allocate()
    for rows, length in [(8, 256), (4, 512), (2, 1024), (8, 1024), (1, 512), (4, 256)]:
        decoder.decode(rows, length, 1)
    assert counters["stats"]["unique_graphs"] == traced, "traced again on the full pool"
