"""Micro-batching of the ``gpu`` queue inside one worker: jobs that are already waiting run as one batch.

Celery hands a prefork child one task at a time. For the GPU tasks this module replaces Celery's
execution strategy (``Task.Strategy``) with one that keeps each received request in the worker's main
process, in a :class:`Batcher`. When the child is idle the batcher sends it up to
``GLYPHQ_MAX_BATCH`` waiting requests, most urgent first, as one pool job (:func:`run_batch`). It
waits at most ``GLYPHQ_BATCH_DELAY_MS`` after the oldest waiting request for stragglers.

Everything else stays Celery's, per job: the request objects, task-received/started/succeeded
events (Flower), the result of each job stored by Celery's tracer in the child, task signals, and
late acknowledgement. Each request is acknowledged only after the child has returned its batch, so
a child killed in the middle of a batch puts every job of it back on the queue
(``task_reject_on_worker_lost``).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.app.trace import fast_trace_task, loads_message, trace_task_ret
from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy
from kombu.serialization import prepare_accept_content

from glyphq.celeryconfig import settings
from glyphq.tasks import handover

log = logging.getLogger(__name__)

#: The pickled form of one request that crosses to the child: Celery's trace arguments.
TraceArgs = tuple[str, str, dict[str, Any], Any, str, str]


@dataclass
class _Waiting:
    request: Any  # celery.worker.request.Request
    since: float


class Batcher:
    """Holds the GPU requests a worker has received and sends them to its pool child in batches.

    Lives in the worker's main process and runs on its event loop, so it needs no locks.
    """

    def __init__(self, consumer: Any, max_batch: int, delay_s: float) -> None:
        self.consumer = consumer
        self.task_names: set[str] = set()
        self.pool = consumer.pool
        self.timer = consumer.timer
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.waiting: list[_Waiting] = []
        self.running = 0
        # Jobs the child may still take before it is replaced (GLYPHQ_MAX_TASKS_PER_CHILD); None: a new child.
        self.room: int | None = None
        self._wakeup: Any = None
        self._sent: tuple[float, int] = (0.0, 0)  # when the running batch was sent, and its size
        self._leaving: tuple[int, float] | None = None  # (pid, since) of a child that is being replaced

    def add(self, request: Any) -> None:
        """Take a request that Celery's strategy accepted (not revoked, not expired, no ETA)."""
        self.waiting.append(_Waiting(request, time.monotonic()))
        self.maybe_flush()

    def maybe_flush(self) -> None:
        """Send a batch when the child is idle and the batch is full or its stragglers' time is up."""
        if (self.running or self._leaving or not self.waiting or worker_state.should_stop
                or worker_state.should_terminate):
            return
        due = self.waiting[0].since + self.delay_s
        if len(self.waiting) >= self.max_batch or time.monotonic() >= due:
            self.flush()
        elif self._wakeup is None:
            self._wakeup = self.timer.call_after(max(0.0, due - time.monotonic()), self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup = None
        self.maybe_flush()

    def take(self) -> list[Any]:
        """Remove and return the next batch, led by the most urgent waiting request (oldest first).

        It is filled, in the same order, with requests of the same length class (``max_new_tokens``
        within a factor of two), so a short job never waits for a long one, nor shares its time limit.
        A redelivered request (its last run died with its child) runs alone, so a job that kills its
        child cannot take innocent jobs down with it again. The batch is no larger than the child's
        room, so recycling still counts jobs.
        """
        size = min(self.max_batch, self.room or settings.max_tasks_per_child)
        order = sorted(range(len(self.waiting)), key=lambda i: (_redis_priority(self.waiting[i].request), i))
        lead = self.waiting[order[0]].request
        if _redelivered(lead):
            chosen = {order[0]}
        else:
            length_class = _length_class(lead)
            fits = [i for i in order if not _redelivered(self.waiting[i].request)
                    and _length_class(self.waiting[i].request) == length_class]
            chosen = set(fits[:size])
        batch = [w.request for i, w in enumerate(self.waiting) if i in chosen]
        self.waiting = [w for i, w in enumerate(self.waiting) if i not in chosen]
        return [request for request in batch if not request.revoked()]  # revoked() acks and records it

    def flush(self) -> None:
        """Send the next batch to the pool (it queues there if the child is still busy)."""
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        batch = self.take()
        if not batch:
            self.maybe_flush()
            return
        self.running += 1
        callbacks = _BatchCallbacks(self, batch)
        try:
            result = self.pool.apply_async(
                run_batch,
                args=([_trace_args(request) for request in batch],),
                accept_callback=callbacks.on_accepted,
                timeout_callback=callbacks.on_timeout,
                callback=callbacks.on_success,
                error_callback=callbacks.on_failure,
                soft_timeout=settings.soft_time_limit_s,
                timeout=settings.time_limit_s,
                correlation_id=batch[0].id,
            )
        except Exception:
            self.running -= 1
            # Back to the front: these messages are still unacked and will run with the next batch.
            self.waiting[:0] = [_Waiting(request, 0.0) for request in batch]
            raise
        if result is None:  # the pool has stopped: the worker is exiting and Redis redelivers these
            self.running -= 1
            return
        for request in batch:
            request._apply_result = weakref.ref(result)  # lets `revoke --terminate` and cancel find it
        self._sent = (time.monotonic(), len(batch))
        log.debug("sent a batch of %d job(s) to the pool", len(batch))

    def finished(self, room: int | None, room_for_a_successor: bool = False, pid: int | None = None) -> None:
        """Called when the pool is done with a batch, whatever the outcome, with the child's room left,
        whether a second copy of the model would fit beside it now, and the child's pid."""
        self.running -= 1
        self.room = room or None  # 0: that child is being replaced, the next one starts empty
        if room and room_for_a_successor:
            self._maybe_start_successor(room)
        if room == 0 and pid is not None:
            self._leaving = (pid, time.monotonic())
            self._until_gone()
        self.maybe_flush()

    def _until_gone(self) -> None:
        """Hold the next batch until the child that is leaving has been reaped, so it is not written to
        a child that will never read it; it then goes to the next child as soon as that one is ready."""
        if self._leaving is None:
            return
        pid, since = self._leaving
        handover.reap(self.pool)
        if pid in handover.child_pids(self.pool) and time.monotonic() - since < LEAVING_WAIT_S:
            self.timer.call_after(LEAVING_POLL_S, self._until_gone)
            return
        self._leaving = None
        self.maybe_flush()

    def _maybe_start_successor(self, room: int) -> None:
        """Start the child's successor once the jobs it has left take ``GLYPHQ_RECYCLE_OVERLAP_S`` or less,
        at the pace of the batch that just ended (see ``tasks.handover``)."""
        sent_at, jobs = self._sent
        seconds_left = room * (time.monotonic() - sent_at) / max(1, jobs)
        if seconds_left <= settings.recycle_overlap_s and not worker_state.should_stop:
            handover.start_successor(self.pool)


#: How often, and for how long at most, the batcher looks whether a leaving child has been reaped.
LEAVING_POLL_S = 0.02
LEAVING_WAIT_S = 30.0


class _BatchCallbacks:
    """Pool callbacks for one batch, fanned out to Celery's per-request handlers."""

    def __init__(self, batcher: Batcher, batch: list[Any]) -> None:
        self.batcher = batcher
        self.batch = batch
        self.pid: int | None = None

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.pid = pid
        for request in self.batch:
            request.on_accepted(pid, time_accepted)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        for request in self.batch:
            request.on_timeout(soft, timeout)

    def on_success(self, returned: tuple[list[Any], int, bool]) -> None:
        outcomes, room, room_for_a_successor = returned
        try:
            for request, outcome in zip(self.batch, outcomes, strict=True):
                request.on_success(outcome)
        finally:
            self.batcher.finished(room, room_for_a_successor, self.pid)

    def on_failure(self, exc_info: Any) -> None:
        # The child died or hit the hard time limit: Celery decides per job (requeue when lost).
        try:
            for request in self.batch:
                request.on_failure(exc_info)
        finally:
            self.batcher.finished(None)


def _redis_priority(request: Any) -> int:
    """The message's Redis priority (0 is most urgent, see ``producer.submit``)."""
    priority = (request.delivery_info or {}).get("priority")
    return int(priority) if isinstance(priority, int) else 9


def _redelivered(request: Any) -> bool:
    return bool((request.delivery_info or {}).get("redelivered"))


def _length_class(request: Any) -> int:
    """``max_new_tokens`` rounded down to a power of two (0 when the message does not say)."""
    kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
    job = kwargs.get("job")
    tokens = job.get("max_new_tokens") if isinstance(job, dict) else None
    return int(tokens).bit_length() if isinstance(tokens, int) and tokens > 0 else 0


def _trace_args(request: Any) -> TraceArgs:
    return (request._type, request.id, request._request_dict, request._body, request._content_type,
            request._content_encoding)


def run_batch(batch: list[TraceArgs]) -> tuple[list[Any], int, bool]:
    """In the pool child: answer every job of the batch at once, then let Celery trace each job.

    The jobs are answered together first (``worker.runtime.prepare``); Celery's tracer then runs
    each task body, which picks up its prepared result or failure, stores it, and fires the task
    signals, exactly as for a job that ran alone. Returns Celery's per-job outcome tuples, how many
    more jobs this child takes before it is replaced, and whether its successor would fit beside it.
    """
    from glyphq.tasks.answer import JOB_MESSAGE
    from glyphq.tasks.app import app
    from glyphq.worker import runtime

    jobs: list[tuple[str, object]] = []
    for name, task_id, request, body, content_type, content_encoding in batch:
        if (request.get("delivery_info") or {}).get("redelivered") and _succeeded(app, task_id):
            continue  # Celery's tracer skips it (worker_deduplicate_successful_tasks)
        try:
            args, kwargs = _decode(app, body, content_type, content_encoding)
            jobs.append((task_id, JOB_MESSAGE[name](*args, **kwargs)))
        except Exception:  # noqa: S112  (the task body fails the same way when Celery calls it)
            continue
        if app.conf.task_track_started:  # the tracer would mark it only after the batch is answered
            app.backend.store_result(task_id, {"pid": os.getpid(), "hostname": request.get("hostname")},
                                     states.STARTED)
    runtime.prepare(jobs)
    try:
        return [_trace(app, *args) for args in batch], runtime.room(), runtime.room_for_a_successor()
    finally:
        runtime.forget_prepared()


def _trace(app: Any, name: str, task_id: str, request: dict[str, Any], body: Any, content_type: str,
           content_encoding: str) -> Any:
    """Celery's tracer for one job, as ``Request.execute_using_pool`` would pick it."""
    if app.use_fast_trace_task:
        return fast_trace_task(name, task_id, request, body, content_type, content_encoding)
    return trace_task_ret(name, task_id, request, body, content_type, content_encoding, app=app)


def _succeeded(app: Any, task_id: str) -> bool:
    try:
        return bool(app.backend.get_state(task_id) == states.SUCCESS)
    except Exception:  # noqa: BLE001  (unknown: let the tracer decide, as it does for a single job)
        return False


def _decode(app: Any, body: Any, content_type: str, content_encoding: str
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if content_type:
        accept = prepare_accept_content(app.conf.accept_content)
        args, kwargs, _embed = loads_message(body, content_type, content_encoding, accept=accept)
    else:
        args, kwargs, _embed = body
    return tuple(args), dict(kwargs)


class _BatchingConsumer:
    """The consumer as Celery's default strategy sees it, except that ready requests go to a batcher."""

    def __init__(self, consumer: Any, batcher: Batcher) -> None:
        self._consumer = consumer
        self.on_task_request = batcher.add

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


_current: Batcher | None = None


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``Task.Strategy`` for the GPU tasks: Celery's default strategy, feeding one batcher per consumer.

    Both GPU tasks share the batcher, so image and document jobs batch together. Celery builds the
    strategies again each time the consumer (re)connects; that starts a new batcher. The requests
    the old one still held belong to the lost connection, and Redis delivers their messages again.
    """
    global _current
    if _current is None or _current.consumer is not consumer or task.name in _current.task_names:
        if _current is not None:
            for waiting in _current.waiting:  # no longer reserved here (`celery inspect reserved`)
                worker_state.task_ready(waiting.request)
        _current = Batcher(consumer, settings.max_batch, settings.batch_delay_ms / 1000)
    _current.task_names.add(task.name)
    return default_strategy(task, app, _BatchingConsumer(consumer, _current), **kwargs)
