"""The GPU worker's status: what its engine child knows (model, device, GPU memory, its task count),
held by the main process for ``celery inspect stats``, which Flower shows on its worker page.

The child publishes fields as they change; they travel to the main process over the child's channel
(``tasks.engine_process``), which merges them here. A process without a child (a render worker, a job
answered in process) keeps what it publishes itself. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_status: dict[str, Any] = {}
_sink: Callable[[dict[str, Any]], None] | None = None


def send_to(sink: Callable[[dict[str, Any]], None]) -> None:
    """In an engine child, as it starts: send every published field set to ``sink``."""
    global _sink
    _sink = sink


def publish(**fields: Any) -> None:
    """Publish ``fields``: sent to the main process from an engine child, else merged here."""
    if _sink is not None:
        _sink(fields)
    else:
        merge(fields)


def merge(fields: dict[str, Any]) -> None:
    """In the main process: take the fields a child published."""
    _status.update(fields)


def read() -> dict[str, Any]:
    """The status as this process knows it ({} before anything was published)."""
    return dict(_status)
