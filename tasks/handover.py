"""Starting a GPU worker's next child before the current one leaves, so a recycle costs no waiting.

Billiard forks a replacement only after a child has exited, and the replacement then loads the model
(seconds for a 10B model, more when its decode steps are compiled) while the queue waits. Here the
worker's main process forks the successor while the current child still has
``GLYPHQ_RECYCLE_OVERLAP_S`` seconds of jobs left. The successor loads the model with a provisional KV
cache, compiles its decode steps and answers a warm-up batch, waits for the predecessor to leave, and
then takes its full cache (``worker.runtime``); billiard counts it ready when it returns, so one child
answers at a time. While both are alive the GPU holds two copies of the weights, which is why the
current child first checks that the successor fits (``worker.memory.successor_fits``).
"""

from __future__ import annotations

import logging
from typing import Any

from glyphq.tasks import private

log = logging.getLogger(__name__)


def start_successor(task_pool: Any) -> None:
    """Fork the next child of a one-process prefork pool now, to replace the one it has.

    Nothing to do when the pool is not a running one-process pool, or a successor is already there.
    """
    from glyphq.worker import runtime

    def before(pid: int) -> None:
        runtime.handover_from = pid  # the successor reads it after the fork

    def after() -> None:
        runtime.handover_from = None

    current = private.child_pids(task_pool)
    successor = private.fork_successor(task_pool, before, after)
    if successor is not None:
        log.info("started child %d to take over from child %s", successor, ", ".join(map(str, sorted(current))))


def child_pids(task_pool: Any) -> set[int]:
    """The pids of the pool's child processes (billiard has not yet reaped the ones missing here)."""
    return private.child_pids(task_pool)


def reap(task_pool: Any) -> None:
    """Let billiard clean up after exited children now (celery#9588: it may notice an exit only at its
    5-second maintenance timer, and a recycle would wait that long for no reason)."""
    private.reap(task_pool)
