"""The vision tower's output for pages seen before, kept on the device up to a size in bytes (LRU).

``worker.paged`` looks each page of a prompt up by its content key (``worker.prefix.page_key``: the
fitted page's pixels, so the box it was fitted to as well) and runs the vision tower only on the pages
it does not find. ``GLYPHQ_ENCODER_CACHE_MB`` bounds it; 0 turns it off.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """Page key -> the page's features (tokens, hidden), least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        """The features kept for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: bytes, features: torch.Tensor) -> None:
        """Keep a copy of ``features`` for ``key`` (its own memory: never a view of a larger output),
        evicting the least recently used pages past ``max_bytes``. Features larger than the whole cache
        are not kept."""
        size = features.nelement() * features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = features.detach().clone()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nelement() * old.element_size()
            self.evictions += 1

    def figures(self) -> dict[str, int]:
        """Size and counts, for the worker status and ``/metrics``."""
        return {"pages": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}
