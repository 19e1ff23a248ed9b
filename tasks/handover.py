"""Starting a GPU worker's next child before the current one leaves, so a recycle costs no waiting.

Billiard forks a replacement only after a child has exited, and the replacement then loads the model
(seconds for a 10B model, more when its decode steps are compiled) while the queue waits. Here the
worker's main process forks the successor while the current child still has
``GLYPHQ_RECYCLE_OVERLAP_S`` seconds of jobs left. The successor loads the model, captures the decode
steps its predecessor used, and only then waits for the predecessor to leave (``worker.runtime``);
billiard counts it ready when it returns, so one child answers at a time. While both are alive the GPU
holds two copies of the model, which is why the current child first checks that a second one fits.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.pool import RUN

log = logging.getLogger(__name__)


def start_successor(task_pool: Any) -> None:
    """Fork the next child of a one-process prefork pool now, to replace the one it has.

    Nothing to do when the pool is not a running one-process pool, or a successor is already there.
    The pool keeps its size of one, so billiard forks nobody when the old child exits.
    """
    from glyphq.worker import runtime

    pool = getattr(task_pool, "_pool", None)
    if pool is None or getattr(pool, "_state", None) != RUN or pool._processes != 1 or len(pool._pool) != 1:
        return
    current = pool._pool[0]
    runtime.handover_from = current.pid  # the successor reads it after the fork
    pool._processes += 1
    try:
        pool.on_grow(1)  # a spare set of pipes for the successor (AsynPool keeps one per process)
        successor = pool._create_worker_process(pool._avail_index())
    finally:
        pool._processes -= 1
        runtime.handover_from = None
    log.info("started child %d to take over from child %d", successor.pid, current.pid)


def child_pids(task_pool: Any) -> set[int]:
    """The pids of the pool's child processes (billiard has not yet reaped the ones missing here)."""
    pool = getattr(task_pool, "_pool", None)
    return {int(process.pid) for process in getattr(pool, "_pool", None) or [] if process.pid}


def reap(task_pool: Any) -> None:
    """Let billiard clean up after exited children now.

    It notices an exit through a pipe that sometimes stays silent, and then only at its 5-second
    maintenance timer (celery#9588): a recycle would wait that long for no reason.
    """
    maintain = getattr(task_pool, "maintain_pool", None)
    if maintain is not None:
        maintain()
