"""The KV cache's block pool (``worker.blocks``) and the running batch's decisions (``worker.schedule``),
without a model."""

from __future__ import annotations

import pytest

from glyphq.worker.blocks import BLOCK_TOKENS, BlockPool, BlockTable, blocks_for
from glyphq.worker.schedule import Candidate, Plan, RowState, schedule


def test_a_row_takes_blocks_as_it_grows_and_gives_them_all_back():
    pool = BlockPool(5)  # block 0 is the scratch block: 4 to hand out
    assert (pool.capacity, pool.free, pool.used) == (4, 4, 0)
    row, other = BlockTable(pool), BlockTable(pool)
    assert row.reserve(1) and row.blocks == [1]
    assert row.reserve(BLOCK_TOKENS) and row.blocks == [1], "a block holds BLOCK_TOKENS tokens"
    assert row.reserve(BLOCK_TOKENS + 1) and row.blocks == [1, 2]
    assert other.reserve(2 * BLOCK_TOKENS) and other.blocks == [3, 4]
    assert pool.free == 0 and 0 not in row.blocks + other.blocks
    assert not row.reserve(3 * BLOCK_TOKENS) and row.blocks == [1, 2], "all or nothing"
    row.release()
    assert row.blocks == [] and pool.free == 2
    assert sorted(pool.take(2) or []) == [1, 2]
    assert pool.take(1) is None


def test_a_shared_block_is_free_only_when_its_last_holder_gives_it_back():
    pool = BlockPool(3)
    blocks = pool.take(2)
    assert blocks is not None
    pool.hold(blocks[:1])
    pool.give_back(blocks)
    assert pool.free == 1, "the shared block is still held once"
    pool.give_back(blocks[:1])
    assert pool.free == 2
    with pytest.raises(ValueError, match="free already"):
        pool.give_back(blocks[:1])
    with pytest.raises(ValueError, match="is free"):
        pool.hold(blocks[:1])


def test_a_pool_grows_and_keeps_what_rows_hold():
    pool = BlockPool(3)
    row = BlockTable(pool)
    assert row.reserve(2 * BLOCK_TOKENS) and not row.reserve(3 * BLOCK_TOKENS)
    pool.grow(6)
    assert pool.capacity == 5 and pool.free == 3 and row.blocks == [1, 2]
    assert row.reserve(5 * BLOCK_TOKENS) and row.blocks == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="cannot shrink"):
        pool.grow(4)
    with pytest.raises(ValueError, match="more than 1"):
        BlockPool(1)


def _row(key: str, cached: int, blocks: int, priority: int = 5, order: int = 0, prompt: int = 100,
         left: int = 100, decoding: bool = True) -> RowState:
    return RowState(key, priority, order, cached, prompt, blocks, left, decoding)


def _plan(rows: list[RowState], waiting: list[Candidate], free: int, max_rows: int = 8, reserved: int = 0,
          chunk: int = 256):
    return schedule(rows, waiting, free, max_rows, reserved, urgent_priority=0, chunk_tokens=chunk, check_every=16,
                    first_stretch=16)


def test_decoding_rows_take_as_many_steps_as_their_blocks_and_lengths_allow():
    full_block = _row("a", cached=BLOCK_TOKENS, blocks=1)  # its next token needs a second block
    roomy = _row("b", cached=10, blocks=1, left=5)
    assert _plan([roomy], [], free=0).steps == 5, "no more than a row has left"
    assert _plan([full_block, roomy], [], free=1).steps == 5
    plan = _plan([_row("a", cached=BLOCK_TOKENS - 4, blocks=1)], [], free=0)
    assert plan.steps == 4 and not plan.preempt, "the steps its block holds"


def test_rows_are_preempted_least_urgent_then_youngest_first_when_blocks_run_out():
    rows = [_row("old", BLOCK_TOKENS, 1, priority=5, order=1), _row("urgent", BLOCK_TOKENS, 1, priority=0, order=3),
            _row("young", BLOCK_TOKENS, 1, priority=5, order=2), _row("prefilling", 64, 2, priority=1, order=4,
                                                                        decoding=False)]
    plan = _plan(rows, [Candidate("next", 0, 5, 10)], free=0)
    assert plan.preempt == ["young", "old"], "each frees one block: enough for the two rows left"
    assert plan.admit == [], "nothing is admitted while the pool is short"
    assert plan.chunks == [("prefilling", 64, 100)] and plan.steps == 1


def test_admission_needs_a_free_row_and_blocks_for_the_prompt_and_a_first_stretch():
    decoding = _row("a", cached=10, blocks=1)
    waiting = [Candidate("fits", 5, 1, prompt=2 * BLOCK_TOKENS - 10), Candidate("too long", 5, 2, prompt=500),
               Candidate("small", 5, 3, prompt=10)]
    plan = _plan([decoding], waiting, free=3)
    assert plan.admit == ["fits"], "the next one does not fit, and none overtakes it"
    assert plan.chunks == [("fits", 0, 2 * BLOCK_TOKENS - 10)] and plan.steps == 1
    assert _plan([decoding], waiting, free=2).admit == [], "2 blocks hold the prompt but not its first stretch"
    assert _plan([decoding], waiting, free=100, max_rows=2).admit == ["fits"], "one row was free"


def test_the_kept_rows_take_urgent_jobs_only_and_a_job_being_prepared_keeps_its_row():
    rows = [_row(f"r{i}", 10, 1) for i in range(6)]
    normal, urgent = Candidate("normal", 5, 1, 10), Candidate("urgent", 0, 2, 10)
    assert _plan(rows, [normal], free=50, reserved=2).admit == [], "the last 2 of 8 rows are kept"
    assert _plan(rows, [urgent, normal], free=50, reserved=2).admit == ["urgent"]
    preparing = Candidate("preparing", 0, 0, 0, ready=False)
    assert _plan(rows[:5], [preparing, urgent, normal], free=50, reserved=2).admit == ["urgent"]
    assert _plan(rows[:4], [preparing, urgent, normal], free=50, reserved=2).admit == ["urgent"], \
        "a normal job never takes a kept row"
    assert _plan(rows[:3], [preparing, urgent, normal], free=50, reserved=2).admit == ["urgent", "normal"]


def test_prompt_chunks_split_long_prompts_across_steps_most_urgent_first():
    prefilling = _row("late", cached=300, blocks=blocks_for(1000 + 16), priority=5, prompt=1000, decoding=False)
    first = _row("first", cached=100, blocks=blocks_for(400 + 16), priority=1, order=9, prompt=400, decoding=False)
    plan = _plan([prefilling, first], [Candidate("new", 0, 10, 50)], free=100, chunk=512)
    assert plan.admit == ["new"]
    assert plan.chunks == [("first", 100, 400), ("late", 300, 512)], "the chunk budget is spent, most urgent first"
    plan = _plan([prefilling], [], free=100, chunk=512)
    assert plan.chunks == [("late", 300, 812)] and plan.steps == 1


def test_an_urgent_job_takes_its_blocks_from_the_least_urgent_then_youngest_rows():
    # Four rows fill an 8-block pool; each holds 2 blocks and has room for its next token.
    rows = [_row("old", 100, 2, priority=5, order=1), _row("young", 100, 2, priority=5, order=2),
            _row("middle", 100, 2, priority=3, order=3), _row("urgent row", 100, 2, priority=0, order=4)]
    urgent = Candidate("urgent", 0, 5, prompt=100)  # 100 + 16 tokens: 2 blocks
    plan = _plan(rows, [urgent], free=0)
    assert plan.preempt == ["young"] and plan.admit == ["urgent"], "one row's blocks are enough"
    assert plan.chunks == [("urgent", 0, 100)] and plan.steps == 1
    plan = _plan(rows, [Candidate("urgent", 0, 5, prompt=300)], free=0)  # 5 blocks
    assert plan.preempt == ["young", "old", "middle"] and plan.admit == ["urgent"], "then older, then more urgent"
    assert _plan(rows, [Candidate("huge", 0, 5, prompt=700)], free=0) == Plan(steps=16), \
        "all the less urgent rows would not be enough: none is preempted and the job waits"
    assert _plan(rows, [Candidate("normal", 5, 5, prompt=100)], free=0).preempt == [], "only urgent jobs preempt"
    # An urgent row is never preempted for an urgent job.
    assert _plan(rows[3:], [Candidate("urgent", 0, 5, prompt=100)], free=0).preempt == []
