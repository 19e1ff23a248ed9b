"""The KV cache's blocks: which fixed-size blocks of the pool are free, and which each row holds.

Every layer's keys and values live in one pool of ``BLOCK_TOKENS``-token blocks (``worker.paged``);
this module only counts them, so it needs no model and no torch. A row holds a list of blocks (its
block table): token ``i`` of the row lives in block ``table[i // BLOCK_TOKENS]`` at offset
``i % BLOCK_TOKENS``. A row takes blocks as it grows and gives them all back when it ends; nothing is
set aside for the tokens a row might write later.

Each block has a reference count, so that one block may later be held by several rows (a shared
prefix, such as a page seen before): it is free again only when its last holder gives it back. Today
every block has one holder.

Block 0 is never handed out: rows that take part in a step without writing (padding of a decode
step captured for more rows than decode) write there and read from there.
"""

from __future__ import annotations

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
    """Free and held blocks of a pool of ``blocks`` blocks (block 0 included, never handed out)."""

    def __init__(self, blocks: int) -> None:
        if blocks <= RESERVED_BLOCKS:
            raise ValueError(f"a pool needs more than {RESERVED_BLOCKS} block(s), got {blocks}")
        self.refs = [0] * blocks
        self.free_list = list(range(blocks - 1, RESERVED_BLOCKS - 1, -1))  # popped from the end: lowest first

    @property
    def capacity(self) -> int:
        """Blocks rows may hold in all (the pool less the scratch block)."""
        return len(self.refs) - RESERVED_BLOCKS

    @property
    def free(self) -> int:
        """Blocks no row holds now."""
        return len(self.free_list)

    @property
    def used(self) -> int:
        """Blocks some row holds now."""
        return self.capacity - self.free

    def take(self, count: int) -> list[int] | None:
        """``count`` free blocks, each now held once; None, taking none, if fewer are free."""
        if count > len(self.free_list):
            return None
        taken = [self.free_list.pop() for _ in range(count)]
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
        """One holder fewer for each of ``blocks``; a block no one holds is free again."""
        for block in blocks:
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is free already")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_list.append(block)

    def grow(self, blocks: int) -> None:
        """Add blocks ``[len, blocks)`` to the pool (a pool grows only)."""
        if blocks < len(self.refs):
            raise ValueError(f"a pool of {len(self.refs)} blocks cannot shrink to {blocks}")
        added = range(len(self.refs), blocks)
        self.refs += [0] * len(added)
        self.free_list = list(reversed(added)) + self.free_list  # the old blocks are handed out first


class BlockTable:
    """The blocks one row holds, in token order, taken from ``pool`` as the row grows."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []

    @property
    def tokens(self) -> int:
        """Tokens the row's blocks hold."""
        return len(self.blocks) * BLOCK_TOKENS

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
