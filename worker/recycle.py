"""Asking billiard to replace this child after the task it is running.

Billiard's child loop (``billiard.pool.Worker.workloop``) checks ``mem_rss()`` against
``worker_max_memory_per_child`` after it has handed each result to the parent, and exits with
``EX_RECYCLE`` when it is over. That is the one point where a child can leave without losing or
repeating its task, so the GPU guard uses it too: after a recycle is requested, the child's
``mem_rss`` reports more than any limit, and billiard replaces the child exactly as it does for
max-memory-per-child.

On Linux, billiard's own ``mem_rss`` is the *peak* RSS (``ru_maxrss``). Loading a 10B model peaks
far above what the child holds afterwards, so a peak-based guard would replace the child after every
job. The guard here reads the child's *current* resident memory instead, which is what creeps.
"""

from __future__ import annotations

import logging
import os

import billiard.pool

from glyphq.celeryconfig import settings
from glyphq.worker import metrics, status

log = logging.getLogger(__name__)

_requested: str | None = None
_real_mem_rss = billiard.pool.mem_rss
_OVER_ANY_LIMIT_KB = 2**62


def current_rss_kb() -> int:
    """This process's resident memory now, in kB (billiard's limit unit)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:  # no /proc: fall back to billiard's measure
        return int(_real_mem_rss())


def _mem_rss() -> int:
    if _requested is None:
        rss_kb = current_rss_kb()
        limit_kb = settings.max_memory_per_child_mb * 1024
        if limit_kb and rss_kb > limit_kb:
            request("rss", f"resident memory {rss_kb // 1024} MB > GLYPHQ_MAX_MEMORY_PER_CHILD_MB={limit_kb // 1024}")
    return _OVER_ANY_LIMIT_KB if _requested is not None else current_rss_kb()


def install() -> None:
    """Route billiard's post-task memory check through this module (call once in each child)."""
    billiard.pool.mem_rss = _mem_rss


def request(reason: str, detail: str) -> None:
    """Replace this child once its current task's result has been handed over.

    ``reason`` is ``tasks``, ``rss`` or ``gpu``; it is counted in the metrics and the worker status.
    """
    global _requested
    if _requested is not None:
        return
    _requested = reason
    log.info("replacing this worker child after the current task (%s): %s", reason, detail)
    metrics.recycled(reason)
    reasons = dict(status.read().get("recycles_by_reason") or {})
    reasons[reason] = reasons.get(reason, 0) + 1
    status.publish(recycles_by_reason=reasons)


def requested() -> str | None:
    """The reason a recycle was requested in this child, or None."""
    return _requested
