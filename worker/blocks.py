"""The KV cache's blocks: which fixed-size blocks of the pool are free, which each row holds, and which
hold a prompt prefix that later rows may share.

Every layer's keys and values live in one pool of ``BLOCK_TOKENS``-token blocks (``worker.paged``);
this module only counts them, so it needs no model and no torch. A row holds a list of blocks (its
block table): token ``i`` of the row lives in block ``table[i // BLOCK_TOKENS]`` at offset
``i % BLOCK_TOKENS``. A row takes blocks as it grows and gives them all back when it ends; nothing is
set aside for the tokens a row might write later.

Shared prefix blocks
    A block filled with prompt tokens may be *kept* under a key (``worker.prefix.block_keys``: the
    hash of the prompt up to and through it, pages included). A later row whose prompt has the same
    keys holds those blocks instead of computing them again (:meth:`BlockPool.share`). Each block has
    a reference count: a kept block that no row holds any more is *evictable*. It is counted as free,
    and :meth:`BlockPool.take` hands evictable blocks out only when no plain free block is left, least
    recently released first (a row's tail blocks before its head), dropping their keys. So kept
    blocks cost nothing when memory is short, and a block some row holds is never evicted.

Block 0 is never handed out: rows that take part in a step without writing (padding of a decode
step captured for more rows than decode) write there and read from there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

#: Tokens per block. Small enough that a row wastes little (at most 63 tokens, about 4% of a
#: 1,500-token job of the realistic mix), large enough that block tables stay short (a job of the
#: realistic mix holds about 24 blocks, a 40-page document about 550) and a block's keys are one
#: contiguous run of 64 positions for a gather (and half of FlexAttention's 128-token mask blocks).
BLOCK_TOKENS = 64
#: Blocks no row may hold (the scratch block 0).
RESERVED_BLOCKS = 1


def blocks_for(tokens: int) -> int:
    """Blocks that hold ``tokens`` tokens."""
    return -(-tokens // BLOCK_TOKENS)


class BlockPool:
    """Free, held and kept blocks of a pool of ``blocks`` blocks (block 0 included, never handed out)."""

    def __init__(self, blocks: int) -> None:
        if blocks <= RESERVED_BLOCKS:
            raise ValueError(f"a pool needs more than {RESERVED_BLOCKS} block(s), got {blocks}")
        self.refs = [0] * blocks
        self.free_list = list(range(blocks - 1, RESERVED_BLOCKS - 1, -1))  # popped from the end: lowest first
        self.kept: dict[Hashable, int] = {}  # prefix key -> the block that holds it
        self.key_of: dict[int, Hashable] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # kept blocks no row holds, oldest first
        self.evictions = 0  # kept blocks handed out for other tokens (their keys dropped)

    @property
    def capacity(self) -> int:
        """Blocks rows may hold in all (the pool less the scratch block)."""
        return len(self.refs) - RESERVED_BLOCKS

    @property
    def free(self) -> int:
        """Blocks no row holds now: plain free ones and evictable kept ones."""
        return len(self.free_list) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some row holds now."""
        return self.capacity - self.free

    def take(self, count: int) -> list[int] | None:
        """``count`` blocks no row holds, each now held once; None, taking none, if fewer are free.
        Plain free blocks go first, then evictable kept ones, oldest first (their keys are dropped)."""
        if count > self.free:
            return None
        taken = [self.free_list.pop() for _ in range(min(count, len(self.free_list)))]
        while len(taken) < count:
            block, _ = self.evictable.popitem(last=False)
            del self.kept[self.key_of.pop(block)]
            self.evictions += 1
            taken.append(block)
        for block in taken:
            self.refs[block] = 1
        return taken

    def hold(self, blocks: list[int]) -> None:
        """One more holder for each of ``blocks`` (held already): a row that shares them."""
        for block in blocks:
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is free: take it, do not share it")
            self.refs[block] += 1

    def give_back(self, blocks: list[int]) -> None:
        """One holder fewer for each of ``blocks``; a block no one holds is free again, or evictable if
        it is kept. Given back last block first, so that a row's tail is evicted before its head."""
        for block in reversed(blocks):
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is free already")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free_list.append(block)

    def grow(self, blocks: int) -> None:
        """Add blocks ``[len, blocks)`` to the pool (a pool grows only)."""
        if blocks < len(self.refs):
            raise ValueError(f"a pool of {len(self.refs)} blocks cannot shrink to {blocks}")
        added = range(len(self.refs), blocks)
        self.refs += [0] * len(added)
        self.free_list = list(reversed(added)) + self.free_list  # the old blocks are handed out first

    # -- shared prefix blocks ---------------------------------------------------------------------

    def matching(self, keys: Sequence[Hashable]) -> tuple[int, int]:
        """How many of ``keys``, from the first, are kept, and how many of those are evictable (counted
        as free now, so sharing them takes them from the free count). Changes nothing."""
        matched = evictable = 0
        for key in keys:
            block = self.kept.get(key)
            if block is None:
                break
            matched += 1
            evictable += block in self.evictable
        return matched, evictable

    def share(self, keys: Sequence[Hashable]) -> list[int]:
        """Hold the kept blocks of the longest run of ``keys`` from the first: the blocks a new row's
        prompt starts with, in order (none if the first key is not kept)."""
        blocks: list[int] = []
        for key in keys:
            block = self.kept.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            blocks.append(block)
        return blocks

    def keep(self, block: int, key: Hashable) -> None:
        """Keep ``block`` (held, filled with prompt tokens) under ``key`` for later rows. A key kept
        already (by a block filled at the same time by another row) stays with its block."""
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is free: only a held block can be kept")
        if key in self.kept or block in self.key_of:
            return
        self.kept[key] = block
        self.key_of[block] = key

    def forget(self) -> None:
        """Keep no block any more: evictable blocks are plain free ones again (held ones stay held)."""
        self.free_list += list(self.evictable)
        self.evictable.clear()
        self.kept.clear()
        self.key_of.clear()
        self.evictions = 0

    @property
    def kept_blocks(self) -> int:
        """Blocks kept under a prefix key, held by rows or evictable."""
        return len(self.kept)


class BlockTable:
    """The blocks one row holds, in token order, taken from ``pool`` as the row grows."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []

    @property
    def tokens(self) -> int:
        """Tokens the row's blocks hold."""
        return len(self.blocks) * BLOCK_TOKENS

    def share(self, keys: Sequence[Hashable]) -> int:
        """Start an empty row with the kept blocks of its prompt's first keys; the blocks it shares."""
        if self.blocks:
            raise ValueError("only an empty row starts with shared blocks")
        self.blocks = self.pool.share(keys)
        return len(self.blocks)

    def reserve(self, tokens: int) -> bool:
        """Hold blocks for the row's first ``tokens`` tokens; False, taking none, if the pool lacks them."""
        missing = blocks_for(tokens) - len(self.blocks)
        if missing <= 0:
            return True
        taken = self.pool.take(missing)
        if taken is None:
            return False
        self.blocks += taken
        return True

    def release(self) -> None:
        """Give every block back to the pool."""
        self.pool.give_back(self.blocks)
        self.blocks = []

    def frees(self) -> int:
        """Blocks that would no longer be held by anyone if this row ended now."""
        return sum(self.pool.refs[block] == 1 for block in self.blocks)
