"""How a card's memory is split (``worker.budget``) and when the GPU guard replaces a child (``worker.memory``).

Pure arithmetic: the README's table of card sizes comes from the same functions the worker sizes its
pool with.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glyphq.celeryconfig import Settings
from glyphq.worker import memory
from glyphq.worker.blocks import BLOCK_TOKENS
from glyphq.worker.budget import (
    CARDS_MIB,
    GLYPH_TOKEN_BYTES,
    MIB,
    PROVISIONAL_TOKENS,
    SUCCESSOR_HEADROOM,
    card_table,
    plan_pool,
    successor_need,
)

GB = 1e9
GIB = 1024**3
README = Path(__file__).resolve().parents[1] / "README.md"
CHUNKS = {24: 2048, 48: 4096, 80: 8192, 141: 8192}


def test_glyph_kv_is_40_kb_per_token():
    assert GLYPH_TOKEN_BYTES == 40 * 1024


def test_a_large_card_leaves_room_for_a_successor_a_small_one_does_not():
    token = GLYPH_TOKEN_BYTES
    weights, context, working = int(20.6 * GB), GIB, int(1.2 * GB)
    need = successor_need(weights, working, token)
    assert need == int(SUCCESSOR_HEADROOM * (weights + working + PROVISIONAL_TOKENS * token))

    big = plan_pool(80 * GIB, weights + context, weights, working, token, 0.9, max_batch=64, encoder_bytes=0)
    room = int(0.9 * 80 * GIB) - weights - context - working
    assert big.successor_fits and big.successor_bytes == need
    assert big.tokens == (room - need) // token // BLOCK_TOKENS * BLOCK_TOKENS
    assert big.bytes == big.tokens * token and big.rows == 64 and big.pool_rows == big.tokens // 1536

    small = plan_pool(48 * GIB, weights + context, weights, working, token, 0.9, max_batch=64, encoder_bytes=0)
    assert not small.successor_fits and small.successor_bytes == 0
    assert small.tokens == (int(0.9 * 48 * GIB) - weights - context - working) // token // BLOCK_TOKENS * BLOCK_TOKENS
    assert small.rows == 64 < small.pool_rows, "the pool holds more typical rows than the cap"

    # By default the encoder cache takes a sixteenth of what the pool would take, up to 4 GiB.
    shared = plan_pool(80 * GIB, weights + context, weights, working, token, 0.9, max_batch=64)
    assert shared.encoder_bytes == (room - need) // 16
    assert shared.tokens == (room - need - shared.encoder_bytes) // token // BLOCK_TOKENS * BLOCK_TOKENS
    huge = plan_pool(141 * GIB, weights + context, weights, working, token, 0.9, max_batch=64)
    assert huge.encoder_bytes == 4 * GIB


def test_room_for_a_successor_is_left_only_if_the_pool_still_holds_max_batch_rows():
    token, weights = GLYPH_TOKEN_BYTES, int(20.6 * GB)
    room_for = 64 * 1536 * token  # 64 typical rows
    need = successor_need(weights, 0, token)
    card = int((weights + need + room_for) / 0.9) + 1
    assert plan_pool(card, weights, weights, 0, token, 0.9, max_batch=64).successor_fits
    assert not plan_pool(card, weights, weights, 0, token, 0.9, max_batch=65).successor_fits
    assert plan_pool(card - 10 * MIB, weights, weights, 0, token, 0.9, max_batch=64).successor_fits is False


def test_a_full_card_still_gives_one_block():
    plan = plan_pool(24 * GIB, 30 * GIB, 20 * GIB, 0, GLYPH_TOKEN_BYTES, 0.9, max_batch=64)
    assert plan.tokens == BLOCK_TOKENS and plan.rows == 0 and not plan.successor_fits


def test_the_defaults_give_rows_on_every_card_and_a_hand_over_on_80_and_141_gb():
    defaults = Settings()
    table = {row["card_gb"]: row for row in card_table(defaults.gpu_memory_utilization, defaults.max_batch, CHUNKS)}
    assert set(table) == set(CARDS_MIB)
    assert table[24]["rows"] >= 8, "the issue's target on a 24 GB card"
    assert [table[gb]["successor_fits"] for gb in (24, 48, 80, 141)] == [False, False, True, True]
    assert all(table[gb]["rows"] == defaults.max_batch for gb in (48, 80, 141))


def test_the_readme_table_is_the_one_the_code_derives():
    defaults = Settings()
    text = README.read_text()
    for row in card_table(defaults.gpu_memory_utilization, defaults.max_batch, CHUNKS):
        line = re.search(rf"^ *\| {row['card_gb']} GB .*$", text, re.MULTILINE)
        assert line is not None, f"no README row for {row['card_gb']} GB"
        cells = [cell.strip() for cell in line.group(0).strip().strip("|").split("|")]
        assert cells[1:6] == [f"{row['chunk']:,}", f"{row['pool_tokens']:,}", f"{row['pool_gb']} GB",
                              f"{row['pool_rows']:,}", str(row["rows"])], cells
        assert cells[6].startswith("fits" if row["successor_fits"] else "no"), cells


@pytest.mark.parametrize(("card_gb", "baseline_gb", "limit_gb"), [
    (80, 72, 76),  # a pool at 0.9 of the card: 5% of it (4 GB) above what the child holds loaded
    (141, 127, 134.05),  # 5% of 141 GB
    (24, 22, 24),  # 2 GiB above the baseline would pass the card: the card
    (24, 10, 10 + 2 * GIB / GB),  # a small baseline: 2 GiB above it
])
def test_the_gpu_guard_follows_what_the_child_holds_loaded(card_gb, baseline_gb, limit_gb):
    limit = memory.guard_limit_bytes(card_gb * GB, baseline_gb * GB, configured_mb=0)
    assert limit == pytest.approx(limit_gb * GB)
    assert limit > baseline_gb * GB or limit == card_gb * GB, "a fresh child is never over its guard"


def test_the_gpu_guard_setting_wins_and_no_baseline_means_the_card():
    assert memory.guard_limit_bytes(80 * GB, 72 * GB, configured_mb=1000) == 1000 * memory.MB
    assert memory.guard_limit_bytes(80 * GB, None, configured_mb=0) == 80 * GB
