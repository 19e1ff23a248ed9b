"""The worker child's status, shared with its parent through memory made before the fork.

The child publishes what it knows (model, device, GPU memory, its task count) after loading and after
each job; the parent reads it for ``celery inspect stats``, which Flower shows on its worker page.
No torch here: the parent of a render worker imports this too.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from typing import Any

_SIZE = 16384
_HEADER = struct.Struct("<I")
_shared: mmap.mmap | None = None
_last_read: dict[str, Any] = {}


def create() -> None:
    """In the worker's main process, before the pool forks: make the shared page."""
    global _shared
    if _shared is None:
        _shared = mmap.mmap(-1, _SIZE)  # anonymous and MAP_SHARED: children write, the parent reads


def publish(**fields: Any) -> dict[str, Any]:
    """In a child: merge ``fields`` into the status and publish it; returns the new status."""
    status = {**read(), **fields}
    if _shared is not None:
        data = json.dumps(status, default=str).encode()
        if len(data) + _HEADER.size <= _SIZE:
            _shared.seek(0)
            _shared.write(_HEADER.pack(0) + data)  # length 0 while writing: readers keep the last status
            _shared.seek(0)
            _shared.write(_HEADER.pack(len(data)))
    return status


def read() -> dict[str, Any]:
    """The last complete status a child published ({} before any)."""
    global _last_read
    if _shared is None:
        return dict(_last_read)
    (length,) = _HEADER.unpack(_shared[: _HEADER.size])
    if 0 < length <= _SIZE - _HEADER.size:
        with contextlib.suppress(ValueError):  # caught mid-write: keep the previous one
            _last_read = json.loads(_shared[_HEADER.size : _HEADER.size + length])
    return dict(_last_read)
