"""Pages read once: the encoder cache and shared prefix blocks (``worker.prefix``, ``worker.blocks``,
``worker.encoder_cache``, ``worker.paged``), on the tiny model in float32 against ``generate``.

The tiny model shows a page as 16 image tokens, so a 12-page document fills three 64-token blocks.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import glm4v_in_memory, png_bytes
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.worker.blocks import BLOCK_TOKENS, BlockPool, BlockTable
from glyphq.worker.continuous import Continuous
from glyphq.worker.encoder_cache import EncoderCache
from glyphq.worker.engine import EngineJob, load
from glyphq.worker.prefix import block_keys, page_key, page_spans
from glyphq.worker.schedule import Candidate, RowState, schedule

BOX = (1280, 720)


def _page(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(size=size, seed=seed)))


def _document(seeds: list[int], question: str, new: int = 12) -> EngineJob:
    return EngineJob(images=[_page(seed) for seed in seeds], question=question, max_new_tokens=new, document=True)


def _engine(model, **env: str):
    return load(Settings.from_env({"GLYPHQ_MODEL": str(model), "GLYPHQ_MAX_BATCH": "4", **env}))


def _generate(model, jobs: list[EngineJob]) -> list[list[int]]:
    plain = load(Settings.from_env({"GLYPHQ_MODEL": str(model), "GLYPHQ_DECODE": "generate"}))
    return [plain.answer([job], BOX)[0].token_ids for job in jobs]


# -- keys -------------------------------------------------------------------------------------------


def test_two_pages_with_the_same_token_ids_never_share_a_block_key():
    image = 7
    ids = [1] + [image] * 130 + [2, 3]
    owner = page_spans(ids, image, [65, 65])
    first, second = page_key(_page(1)), page_key(_page(2))
    assert first != second
    same = block_keys(ids, owner, [first, second])
    other_second = block_keys(ids, owner, [first, second[::-1]])
    assert len(same) == 2
    assert same[0] == other_second[0], "block 0 shows the first page only"
    assert same[1] != other_second[1], "block 1 shows the second page: its key names it"
    other_first = block_keys(ids, owner, [second, second])
    assert other_first[0] != same[0] and other_first[1] != same[1], "a key covers every page before it"


def test_a_page_key_names_its_pixels_and_the_size_it_was_fitted_to():
    page = _page(3)
    assert page_key(page) == page_key(page.copy())
    assert page_key(page) != page_key(page.resize((150, 100)))
    assert page_key(page) != page_key(page.convert("L"))


def test_page_spans_refuse_counts_that_do_not_add_up():
    with pytest.raises(ValueError, match="more image tokens"):
        page_spans([5, 5, 5], 5, [1, 1])
    with pytest.raises(ValueError, match="fewer image tokens"):
        page_spans([5, 5, 5], 5, [2, 2])


# -- the pool's kept blocks --------------------------------------------------------------------------


def test_kept_blocks_are_shared_then_evicted_oldest_first_only_when_no_free_block_is_left():
    pool = BlockPool(6)  # 5 to hand out
    first, second = BlockTable(pool), BlockTable(pool)
    assert first.reserve(3 * BLOCK_TOKENS)
    for block, key in zip(first.blocks, "abc", strict=True):
        pool.keep(block, key)
    assert second.share(["a", "b", "x"]) == 2 and second.blocks == first.blocks[:2]
    assert pool.refs[first.blocks[0]] == 2
    first.release()
    assert pool.free == 3, "block c is evictable: counted as free; a and b are held by the second row"
    assert pool.matching(["a", "b", "c"]) == (3, 1)
    assert pool.take(2) is not None and pool.evictions == 0, "plain free blocks first"
    assert pool.take(1) is not None and pool.evictions == 1 and "c" not in pool.kept
    assert pool.take(1) is None, "a block a row shares is never evicted"
    second.release()
    assert pool.matching(["a", "b"]) == (2, 2)


def test_an_evictable_block_shared_again_is_held_and_no_longer_free():
    pool = BlockPool(3)
    row = BlockTable(pool)
    assert row.reserve(BLOCK_TOKENS)
    pool.keep(row.blocks[0], "k")
    row.release()
    assert pool.free == 2
    again = BlockTable(pool)
    assert again.share(["k"]) == 1 and pool.free == 1 and again.frees() == 1
    with pytest.raises(ValueError, match="only a held block"):
        pool.keep(2, "other")


# -- the plan -----------------------------------------------------------------------------------------


def _plan(rows, waiting, free, computing=None):
    return schedule(rows, waiting, free, max_rows=8, reserved=0, urgent_priority=0, chunk_tokens=4096,
                    check_every=8, first_stretch=8, computing=computing)


def test_a_job_that_shares_its_prefix_needs_blocks_for_the_rest_only():
    prompt = 10 * BLOCK_TOKENS + 5
    alone = Candidate("job", 5, 0, prompt)
    sharing = Candidate("job", 5, 0, prompt, cached=8 * BLOCK_TOKENS)
    assert _plan([], [alone], free=5).admit == []
    plan = _plan([], [sharing], free=5)
    assert plan.admit == ["job"] and plan.chunks == [("job", 8 * BLOCK_TOKENS, prompt)]
    revived = Candidate("job", 5, 0, prompt, cached=8 * BLOCK_TOKENS, shared_free=4)
    assert _plan([], [revived], free=5).admit == [], "the evictable blocks it shares come out of the free count"


def test_a_job_whose_next_block_is_being_computed_waits_and_others_go_past():
    first = Candidate("first", 5, 0, 500, needs="k0")
    twin = Candidate("twin", 5, 1, 500, needs="k0")
    other = Candidate("other", 5, 2, 500, needs="z0")
    plan = _plan([], [first, twin, other], free=100)
    assert plan.admit == ["first", "other"], "the twin waits for first's blocks"
    held = _plan([], [twin], free=100, computing={"k0", "k1"})
    assert held.admit == []


def test_evictable_blocks_are_taken_before_any_running_row_is_preempted():
    decoding = RowState("row", 9, 0, cached=BLOCK_TOKENS, prompt=40, blocks=1, left=100, decoding=True)
    plan = _plan([decoding], [Candidate("new", 5, 1, 100)], free=3)  # e.g. 3 evictable kept blocks
    assert plan.preempt == [] and plan.admit == ["new"]


# -- the engine, against generate ---------------------------------------------------------------------


def test_questions_about_one_document_share_its_blocks_and_answer_as_generate(endless_model):
    engine = _engine(endless_model)
    pages = list(range(100, 112))
    first = _document(pages, "When does the lease end")
    second = _document(pages, "Who pays for repairs")
    partly = _document(pages[:8] + list(range(200, 204)), "When does the lease end")  # shares 8 pages
    expected = _generate(endless_model, [first, second, partly])
    results = [engine.answer([job], BOX)[0] for job in (first, second, partly)]
    assert [r.token_ids for r in results] == expected
    assert results[0].prefix_cached_tokens == 0
    length = results[1].tokens_in
    assert results[1].prefix_cached_tokens == (length - 1) // BLOCK_TOKENS * BLOCK_TOKENS >= 3 * BLOCK_TOKENS, (
        "every full block but the last prompt token's")
    assert results[2].prefix_cached_tokens == 2 * BLOCK_TOKENS, "blocks 0 and 1 show pages 1-8 only"
    assert results[1].encoder_cached_pages == 1, "the last page ends past the shared blocks: the cache has it"
    assert results[2].encoder_cached_pages == 1, "page 8 straddles blocks 1 and 2: its features were kept"


def test_pages_in_another_order_come_from_the_encoder_cache_and_answer_as_generate(endless_model):
    engine = _engine(endless_model)
    first = _document([1, 2, 3, 4, 5], "What is the rent")
    shuffled = _document([5, 4, 3, 2, 1], "What is the rent")
    expected = _generate(endless_model, [first, shuffled])
    results = [engine.answer([job], BOX)[0] for job in (first, shuffled)]
    assert [r.token_ids for r in results] == expected
    assert results[1].encoder_cached_pages == 5 and results[1].prefix_cached_tokens == 0
    figures = engine.decoder.encoder_cache.figures()
    assert figures["pages"] == 5 and figures["hits"] == 5 and figures["bytes"] > 0


def test_with_the_caches_off_nothing_is_kept_and_answers_are_the_same(endless_model):
    engine = _engine(endless_model, GLYPHQ_PREFIX_CACHE="off", GLYPHQ_ENCODER_CACHE_MB="0")
    job = _document(list(range(30, 42)), "When does the lease end")
    results = [engine.answer([job], BOX)[0] for _ in range(2)]
    assert results[0].token_ids == results[1].token_ids == _generate(endless_model, [job])[0]
    assert results[1].prefix_cached_tokens == 0 and results[1].encoder_cached_pages == 0
    assert engine.decoder.pool.kept_blocks == 0 and engine.decoder.encoder_cache.figures()["pages"] == 0


def test_questions_sent_together_prefill_the_pages_once_then_decode_side_by_side(endless_model):
    engine = _engine(endless_model)
    pages = list(range(300, 312))
    questions = ["When does it end", "Who pays", "What is the rent", "Can I keep a cat"]
    jobs = [_document(pages, question, new=24) for question in questions]
    expected = _generate(endless_model, jobs)
    running = Continuous(engine, BOX)
    for index, job in enumerate(jobs):
        running.add(index, job)
    outcomes = {f.key: f.outcome for f in running.run()}
    results = [outcomes[i] for i in range(len(jobs))]
    assert [r.token_ids for r in results] == expected
    computed = sum(r.tokens_in - r.prefix_cached_tokens for r in results)
    shared = (results[0].tokens_in - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert sorted(r.prefix_cached_tokens for r in results) == [0, shared, shared, shared]
    assert computed == sum(r.tokens_in for r in results) - 3 * shared
    assert max(r.batch_size for r in results) == len(jobs), "all four decoded side by side"


def test_under_memory_pressure_kept_blocks_are_evicted_and_no_row_is_preempted(endless_model):
    engine = _engine(endless_model, GLYPHQ_KV_CACHE_TOKENS=str(12 * BLOCK_TOKENS))
    for seed in range(3):  # each leaves three kept blocks behind
        engine.answer([_document(list(range(400 + 20 * seed, 412 + 20 * seed)), "Who signs", new=8)], BOX)
    pool = engine.decoder.pool
    assert pool.kept_blocks >= 6 and pool.free == pool.capacity, "kept blocks no row holds count as free"
    fresh = [_document(list(range(500 + 20 * i, 512 + 20 * i)), "Who signs", new=40) for i in range(2)]
    expected = _generate(endless_model, fresh)
    running = Continuous(engine, BOX)
    for index, job in enumerate(fresh):
        running.add(index, job)
    outcomes = {f.key: f.outcome for f in running.run()}
    assert [outcomes[i].token_ids for i in range(2)] == expected
    assert pool.evictions > 0 and running.stats.preemptions == 0


def test_an_encoder_cache_keeps_copies_and_evicts_the_least_recently_used():
    cache = EncoderCache(max_bytes=3 * 4 * 4)  # three pages of 4 float32 values
    output = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    for index in range(3):
        cache.put(bytes([index]), output[index:index + 1])
    assert cache.entries[b"\x00"].untyped_storage().data_ptr() != output.untyped_storage().data_ptr()
    assert cache.get(b"\x00") is not None  # now the most recently used
    cache.put(b"\x03", output[3:4])
    assert cache.get(b"\x01") is None and cache.get(b"\x00") is not None
    assert cache.figures() == {"pages": 3, "bytes": 48, "max_bytes": 48, "hits": 2, "misses": 1, "evictions": 1}
    cache.put(b"big", torch.zeros(100))
    assert b"big" not in cache.entries, "features larger than the whole cache are not kept"


def test_two_questions_about_one_document_begin_with_the_same_tokens_up_to_the_question(tiny_model):
    engine = _engine(tiny_model)
    pages = [_page(seed) for seed in (1, 2, 3)]
    first = engine.process(EngineJob(pages, "When does the lease end", 8, document=True), pages)["input_ids"][0]
    second = engine.process(EngineJob(pages, "Who pays for repairs", 8, document=True), pages)["input_ids"][0]
    same = next(i for i, (a, b) in enumerate(zip(first.tolist(), second.tolist(), strict=False)) if a != b)
    image = (first == engine.image_token_id).nonzero()[:, 0]
    words = len(engine.processor.tokenizer("Question:", add_special_tokens=False)["input_ids"])
    assert same > int(image[-1]) + words, "the pages and the text before the question are one prefix"


def test_glm4v_pages_shared_and_cached_give_generates_tokens():
    """GLM-4.1V's shapes: a page's patches are rows of ``pixel_values`` by its grid, its features a
    quarter as many (2x2 merge), its 3-D positions from ``get_rope_index``. Prompts that share their
    first two or three pages answer as ``generate`` does, from shared blocks and the encoder cache."""
    from glyphq.worker.paged import PagedDecoder

    model = glm4v_in_memory()
    config = model.config
    patch = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
    pixels = {name: torch.randn(256, patch) for name in ("p1", "p2", "p3", "p4")}  # a 16x16 grid: 64 tokens

    def prompt(pages: list[str], question: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[5, 6, 7] + [122, *[120] * 64, 123] * len(pages) + question])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.cat([pixels[p] for p in pages]),
                "image_grid_thw": torch.tensor([[1, 16, 16]] * len(pages)), "mm_token_type_ids": (ids == 120).long()}

    decoder = PagedDecoder(model, max_batch=2, max_tokens=512, max_new_tokens=16, pad_id=0, pool_tokens=2048,
                           encoder_cache_bytes=1 << 20)

    def answer(pages: list[str], question: list[int]) -> tuple[list[int], list[int], int, int]:
        inputs = prompt(pages, question)
        with torch.inference_mode():
            expected = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
        page_keys = [name.encode() for name in pages]
        keys = decoder.prompt_keys(inputs, page_keys)
        length = inputs["input_ids"].shape[1]
        cached = decoder.share(1, keys, length)
        assert decoder.reserve(1, length + 10)
        decoder.start(1, inputs, None, page_keys, keys, cached)
        for start in range(cached, length, 100):
            decoder.prefill([(1, start, min(start + 100, length))])
        decoder.decode(2, length + 10, 9)
        got, hits = decoder.tokens_of(1, 10), decoder.encoder_hits_of(1)
        decoder.release(1)
        return got, expected, cached, hits

    got, expected, cached, hits = answer(["p1", "p2", "p3"], [8, 9, 10, 11])
    assert got == expected and cached == 0 and hits == 0
    got, expected, cached, hits = answer(["p1", "p2", "p3"], [12, 13])
    assert got == expected and cached == 3 * BLOCK_TOKENS and hits == 1, "3 + 3 x 66 + 2 tokens: 3 full blocks"
    got, expected, cached, hits = answer(["p1", "p2", "p4"], [8, 9, 10, 11])
    assert got == expected and cached == 2 * BLOCK_TOKENS and hits == 1, "p2 ends in block 2: cached, p4 is new"
    got, expected, cached, hits = answer(["p4", "p3", "p1"], [8, 9])
    assert got == expected and cached == 0 and hits == 3, "every page from the encoder cache"


def test_a_decoding_row_short_of_blocks_is_preempted_and_answers_later_as_generate(endless_model):
    """Should the free blocks fall short of what the plan counted (kept blocks of a preempted row shared
    by a job admitted after it), the row that cannot grow waits and runs again; nothing fails."""
    engine = _engine(endless_model, GLYPHQ_KV_CACHE_TOKENS=str(16 * BLOCK_TOKENS))
    job = _document(list(range(600, 612)), "Who signs", new=80)
    expected = _generate(endless_model, [job])
    running = Continuous(engine, BOX)
    running.add("job", job)
    while not any(row.decoding for row in running.rows.values()):
        running.step()
    held = BlockTable(engine.decoder.pool)
    assert held.reserve(engine.decoder.pool.free * BLOCK_TOKENS), "another holder takes every free block"
    running._decode(BLOCK_TOKENS)  # as a plan that counted blocks gone since would: the row needs a new one
    assert running.stats.preemptions == 1 and not running.rows
    held.release()
    outcomes = {f.key: f.outcome for f in running.run()}
    assert [outcomes["job"].token_ids] == expected
    assert outcomes["job"].prefix_cached_tokens == 3 * BLOCK_TOKENS, "it ran again from its own kept blocks"


def test_a_crowd_of_repeated_documents_under_memory_pressure_answers_as_generate(endless_model):
    """Twenty jobs over six documents that share pages, at mixed priorities and answer lengths, added
    while others run, on a pool too small for all: blocks are shared, kept and evicted, and rows are
    preempted (how many depends on when each job's pages are ready), and every answer is the one
    ``generate`` gives."""
    import random

    engine = _engine(endless_model, GLYPHQ_MAX_BATCH="6", GLYPHQ_KV_CACHE_TOKENS=str(16 * BLOCK_TOKENS))
    documents = [list(range(800, 812)), list(range(800, 808)) + list(range(820, 824)), list(range(830, 842)),
                 list(range(800, 812))[::-1], list(range(850, 862)), list(range(870, 882))]
    questions = ["Who signs", "When does it end", "What is the rent"]
    chooser = random.Random(5)
    jobs = [_document(chooser.choice(documents), chooser.choice(questions), new=chooser.choice([6, 20, 60]))
            for _ in range(20)]
    priorities = [chooser.choice([0, 5, 9]) for _ in jobs]
    expected = _generate(endless_model, jobs)
    running = Continuous(engine, BOX, urgent_priority=0)
    outcomes: dict = {}
    for index, job in enumerate(jobs):
        running.add(index, job, priority=priorities[index])
        if index % 3 == 2:
            outcomes.update({f.key: f.outcome for f in running.step()})
    outcomes.update({f.key: f.outcome for f in running.run()})
    assert [outcomes[i].token_ids for i in range(len(jobs))] == expected
    assert sum(outcomes[i].prefix_cached_tokens > 0 for i in range(len(jobs))) >= 10
    assert engine.decoder.pool.evictions > 0


def test_rows_hold_no_pixels_and_waiting_jobs_hold_a_bounded_number_of_pages(endless_model):
    """A document's processor output (its pixels, ~0.2 GB for 40 pages on a GPU) is dropped once its row
    has started, and waiting jobs are prepared until they hold ``PREPARED_PAGES`` pages; rows preempted
    on the small pool process their pages again, and every answer is ``generate``'s."""
    from glyphq.worker.continuous import PREPARED_PAGES

    engine = _engine(endless_model, GLYPHQ_MAX_BATCH="4", GLYPHQ_KV_CACHE_TOKENS=str(14 * BLOCK_TOKENS))
    jobs = [_document(list(range(900 + 12 * i, 912 + 12 * i)), "Who signs", new=100) for i in range(10)]
    running = Continuous(engine, BOX)
    for index, job in enumerate(jobs):
        running.add(index, job)
    outcomes: dict = {}
    most_prepared = 0
    while running.busy:
        outcomes.update({f.key: f.outcome for f in running.step()})
        assert all(row.waiting.prompt is None for row in running.rows.values())
        prepared = sum(len(w.fitted) for w in running.waiting if w.prompt is not None)
        most_prepared = max(most_prepared, prepared)
    running.close()
    assert 0 < most_prepared <= PREPARED_PAGES + 12
    assert [outcomes[i].token_ids for i in range(len(jobs))] == _generate(endless_model, jobs)
