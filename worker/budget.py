"""How a card's memory is split between the weights, working memory, the KV cache pool and a successor.

Pure arithmetic, no torch: ``worker.paged.PagedDecoder.size_from_card`` calls :func:`plan_pool` with
the figures it measures on the card, and the README's table of card sizes comes from :func:`card_table`
with Glyph's figures, so the two cannot disagree.

The rule
    The pool takes ``utilization`` of the card, less what is in use (weights, CUDA context, buffers)
    and a prompt chunk's working memory. Where the card allows, it also leaves room for a successor
    (``worker.runtime.Runtime.load``): the successor's weights, its working memory and its provisional
    pool (``PROVISIONAL_TOKENS``), with ``SUCCESSOR_HEADROOM``. It does so only if the pool left beside
    that room still holds ``max_batch`` typical rows (``TYPICAL_ROW_TOKENS`` each): leaving room for a
    successor never lowers the rows decoding at once below their cap. Otherwise (24 and 48 GB cards)
    the pool takes the room as well, and a recycle waits for a fresh child (no overlap).

    The encoder cache (``worker.encoder_cache``: vision features of pages seen before) takes its bytes
    out of the pool's room: ``GLYPHQ_ENCODER_CACHE_MB``, or by default :func:`encoder_cache_bytes`, a
    sixteenth of that room up to 4 GiB (about 400 fitted pages of Glyph's on a 141 GB card, 190 on 80
    GB, 130 on 48 GB, 7 on 24 GB, where the pool itself is scarce).
"""

from __future__ import annotations

from dataclasses import dataclass

from glyphq.worker.blocks import BLOCK_TOKENS, blocks_for

#: Tokens of a typical job of the realistic mix: a fitted page (~900-1,200 vision tokens), the prompt
#: around it and its answer.
TYPICAL_ROW_TOKENS = 1500
#: Headroom on what a successor is expected to hold before its predecessor leaves: its CUDA context and
#: what its warm-up needs beyond the predecessor's working memory.
SUCCESSOR_HEADROOM = 1.1
#: Tokens of a successor's provisional pool, until its predecessor leaves: a warm-up batch of two pages.
PROVISIONAL_TOKENS = 8192

# Glyph (GLM-4.1V-9B) in bf16, for the README's table. The worker measures its own figures.
GLYPH_WEIGHTS_BYTES = int(20.6e9)
#: 2 key/value heads x 128 dims x 40 layers x (key, value) x 2 bytes.
GLYPH_TOKEN_BYTES = 2 * 128 * 40 * 2 * 2
#: Estimated working memory of a prefill step per prompt-chunk token (the MLP's 2 x 13,696 activations
#: in bf16 and what surrounds them); the worker measures it with a profiling pass instead.
GLYPH_WORKING_BYTES_PER_TOKEN = 150 * 1024
#: CUDA context, cuBLAS workspaces and the decoder's buffers: in use on the card beyond the weights.
CUDA_CONTEXT_BYTES = 1024**3
MIB = 1024 * 1024
#: The cards of the README's table: what ``torch.cuda.mem_get_info`` reports as their total.
CARDS_MIB = {24: 24_564, 48: 46_068, 80: 81_559, 141: 143_771}
#: The encoder cache's default share of the memory the pool would take, and its default cap.
ENCODER_CACHE_SHARE = 16
ENCODER_CACHE_CAP_BYTES = 4 * 1024**3


def encoder_cache_bytes(pool_room_bytes: int) -> int:
    """The encoder cache's default size beside a pool of ``pool_room_bytes`` (``GLYPHQ_ENCODER_CACHE_MB``
    auto): a sixteenth of it, at most ``ENCODER_CACHE_CAP_BYTES``."""
    return max(0, min(ENCODER_CACHE_CAP_BYTES, pool_room_bytes // ENCODER_CACHE_SHARE))


@dataclass(frozen=True)
class PoolPlan:
    """The pool a card gives: its ``tokens`` (a whole number of blocks) and ``bytes``, the typical rows
    it holds (``pool_rows``) and those that decode at once (``rows``, capped by ``max_batch``), whether a
    successor fits beside it, the bytes left for that successor (0 when it does not fit), and the
    encoder cache's bytes beside the pool."""

    tokens: int
    bytes: int
    pool_rows: int
    rows: int
    successor_fits: bool
    successor_bytes: int
    encoder_bytes: int = 0


def successor_need(held_bytes: int, working_bytes: int, token_bytes: int,
                   provisional_tokens: int = PROVISIONAL_TOKENS) -> int:
    """Bytes a successor holds before its predecessor leaves: what a child holds besides its pool
    (``held_bytes``: weights and buffers), its working memory and its provisional pool, with headroom."""
    return int(SUCCESSOR_HEADROOM * (held_bytes + working_bytes + provisional_tokens * token_bytes))


def plan_pool(card_bytes: int, in_use_bytes: int, held_bytes: int, working_bytes: int, token_bytes: int,
              utilization: float, max_batch: int, row_tokens: int = TYPICAL_ROW_TOKENS,
              encoder_bytes: int | None = None) -> PoolPlan:
    """The pool of a card of ``card_bytes`` with ``in_use_bytes`` in use besides the pool (weights,
    context, buffers, any other process), ``held_bytes`` of them this child's own (what a successor
    would hold again), a prompt chunk's ``working_bytes``, ``token_bytes`` of keys and values per
    token, and an encoder cache of ``encoder_bytes`` (None: :func:`encoder_cache_bytes`); see the
    module docstring. The pool is at least one block."""
    room = int(utilization * card_bytes) - in_use_bytes - working_bytes
    need = successor_need(held_bytes, working_bytes, token_bytes)
    row_blocks = blocks_for(row_tokens)
    useful = max_batch * row_blocks * BLOCK_TOKENS * token_bytes  # the pool of max_batch typical rows
    fits = room - need >= useful
    left = room - need if fits else room
    encoder = encoder_cache_bytes(left) if encoder_bytes is None else encoder_bytes
    tokens = _whole_blocks((left - encoder) // token_bytes)
    pool_rows = tokens // (row_blocks * BLOCK_TOKENS)
    return PoolPlan(tokens, tokens * token_bytes, pool_rows, min(max_batch, pool_rows), fits, need if fits else 0,
                    encoder)


def _whole_blocks(tokens: int) -> int:
    return max(BLOCK_TOKENS, tokens // BLOCK_TOKENS * BLOCK_TOKENS)


def glyph_plan(card_gb: int, utilization: float, max_batch: int, chunk: int) -> PoolPlan:
    """``plan_pool`` for Glyph on one of ``CARDS_MIB``'s cards, with estimated context and working memory."""
    held = GLYPH_WEIGHTS_BYTES
    return plan_pool(CARDS_MIB[card_gb] * MIB, held + CUDA_CONTEXT_BYTES, held,
                     chunk * GLYPH_WORKING_BYTES_PER_TOKEN, GLYPH_TOKEN_BYTES, utilization, max_batch)


def card_table(utilization: float, max_batch: int, chunks: dict[int, int]) -> list[dict[str, object]]:
    """The README's table: for each card (``CARDS_MIB``) at its prompt chunk (``chunks``: card GB ->
    tokens), the pool tokens and GB, typical rows it holds, rows decoding at once, and the hand-over."""
    table: list[dict[str, object]] = []
    for gb in CARDS_MIB:
        plan = glyph_plan(gb, utilization, max_batch, chunks[gb])
        table.append({"card_gb": gb, "chunk": chunks[gb], "pool_tokens": plan.tokens,
                      "pool_gb": round(plan.bytes / 1e9, 1), "pool_rows": plan.pool_rows, "rows": plan.rows,
                      "successor_fits": plan.successor_fits, "encoder_gb": round(plan.encoder_bytes / 1e9, 2)})
    return table


if __name__ == "__main__":  # python -m glyphq.worker.budget: the README's table at the defaults
    from glyphq.celeryconfig import Settings

    defaults = Settings()
    by_card = {24: 2048, 48: 4096, 80: 8192, 141: 8192}  # worker.paged.prefill_chunk_for
    print("| card | prompt chunk | pool tokens | pool | typical rows it holds | rows decoding at once | hand-over "
          "| encoder cache |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in card_table(defaults.gpu_memory_utilization, defaults.max_batch, by_card):
        print(f"| {row['card_gb']} GB ({CARDS_MIB[int(str(row['card_gb']))]:,} MiB) | {row['chunk']:,} | "
              f"{row['pool_tokens']:,} | {row['pool_gb']} GB | {row['pool_rows']:,} | {row['rows']} | "
              f"{'fits' if row['successor_fits'] else 'no: plain recycle'} | {row['encoder_gb']} GB |")
