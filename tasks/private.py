"""Every use of Celery's, kombu's, billiard's and uvicorn's private parts, in one place, each with its reason.

Each one has a canary test in ``tests/test_private.py`` that fails when an upgrade changes what it
relies on; ``pyproject.toml`` pins the three packages to the ranges those tests passed on.

1. :func:`default_strategy`: Celery's default execution strategy (``celery.worker.strategy.default``).
   ``Task.Strategy`` is documented, but the default one that parses a message into a request is not
   public API. glyphq wraps it so that ready GPU requests go to its scheduler instead of the pool,
   the way ``celery-batches`` does (clokep/celery-batches; Celery's own ``contrib.batches`` was
   removed, celery/celery#1067).
2. :func:`request_done`: ``celery.worker.state.task_ready`` takes a finished request out of the
   worker's active and reserved sets (``celery inspect active``), which Celery's own ``on_success``
   would do; glyphq acknowledges and sends the events itself, with the job's real runtime.
3. :func:`use_solo_pool`: a GPU worker runs Celery's ``solo`` pool, because glyphq starts, watches and
   replaces its engine child itself (``tasks.engine_process``) and runs no task in Celery's pool. The
   ``worker_init`` signal is public and comes after ``-Q`` is applied, but the pool class it replaces is
   the ``WorkController``'s ``pool_cls`` attribute, which is not documented; ``-P``/``worker_pool`` are
   one setting for every worker of a deployment, and render workers need prefork.
4. :func:`set_request_handler`: not private itself, it is how point 6 reaches the worker's scheduler
   without importing it.
5. :func:`fix_kombu_close`: kombu 5.7's Redis channel reads a pending BRPOP reply as it closes (since
   celery/kombu#1733); on a lost connection that read raises, Celery's second close fails with
   ``AttributeError`` and the worker exits. The close is retried once, so unacknowledged messages
   are restored and the worker reconnects.
6. :class:`CancelledForRedelivery`: the request class of the GPU tasks. On a lost broker connection
   Celery cancels each running late-ack request (``Consumer.on_connection_error_after_connected``
   calls ``Request.cancel``), which stores a RETRY state first, and kills the request's pool process
   (``pool.terminate_job``); a GPU job runs in glyphq's engine child, which the scheduler kills instead
   (``tasks.scheduler.Scheduler.cancel``). With Redis down that store blocks the worker through the
   result backend's retries (about 9 s a job) and then fails, and a request whose cancel failed
   is later taken as terminated: stored as REVOKED and acknowledged, so the job was lost
   (glyphq issue 14). Its cancel stores nothing, as Celery's own shutdown cancel does for late-ack
   tasks (``Consumer.cancel_active_requests``): the message stays unacknowledged and Redis delivers it
   again. Upstream: celery/celery#7185 (that cancel writes to the result backend while it is down).
   Its ``terminate`` ends one job alone: Celery's revoke control (``celery.worker.control._revoke``)
   flags the id as revoked and then calls ``Request.terminate(pool, signal)``, which signals the
   request's process, and a GPU child runs up to ``GLYPHQ_MAX_BATCH`` jobs at once. The worker's
   scheduler drops the job from the running batch instead (``tasks.scheduler.Scheduler.terminate``).
   Celery has no hook for a pool that runs several requests in one process; a process per request
   is its model.
7. :func:`is_revoked`: whether an id is in the worker's revoked set (``celery.worker.state.revoked``,
   which Celery's revoke control fills and ``Request.revoked`` reads). Celery checks it only when a
   request is about to run; a GPU job handed to the child waits there for a slot, so the scheduler
   looks for plain revokes (no terminate) of those jobs itself. Same reason as the terminate in 6.
8. :class:`GuardedConsumer`: the worker's consumer class (the documented ``worker_consumer`` setting),
   whose ``on_unknown_task`` reads the message's ``id`` header without a guard. A message for a task
   no worker knows, sent without an id, raises ``KeyError`` there, which the connection loop takes for
   a lost broker: the worker reconnects, the message is restored, and the loop never ends. The guard
   rejects such a message with an ERROR line. Upstream: celery/celery#493 (messages with missing fields
   crash the worker; the protocol says ``id`` is required, and Celery trusts it).
9. :func:`header_deadline_protocol`: uvicorn (0.54) closes a kept-alive connection idle between
   requests (``timeout_keep_alive``) but sets no deadline on receiving a request's head: a client that
   sends a header byte every few seconds holds its connection for ever, before the gateway reads any API
   key (slowloris). ``uvicorn.Config(http=...)`` takes a protocol class, which is public; the subclass of
   ``uvicorn.protocols.http.h11_impl.H11Protocol`` reads its ``cycle``, ``loop``, ``transport`` and
   ``client`` and ``RequestResponseCycle.response_complete``, which are not. The deadline counts the way
   hyper's header read timeout does (hyperium/hyper#2675): from the connection's opening, or from the
   first byte of its next request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from celery.worker.consumer import Consumer
from celery.worker.request import Request

log = logging.getLogger(__name__)


# -- 1. the default strategy ----------------------------------------------------------------------

def default_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default ``Task.Strategy`` for ``task``, as the consumer would build it."""
    from celery.worker.strategy import default

    return default(task, app, consumer, **kwargs)


# -- 2. a request that ended ----------------------------------------------------------------------

def request_done(request: Any, successful: bool) -> None:
    """Take ``request`` out of the worker's active and reserved requests."""
    from celery.worker import state

    state.task_ready(request, successful=successful)


def request_reserved(request: Any) -> None:
    """Take a request the worker no longer holds out of its reserved set (its message comes back)."""
    from celery.worker import state

    state.task_ready(request)


def shutting_down() -> bool:
    """Whether the worker is stopping (warm or cold)."""
    from celery.worker import state

    return bool(state.should_stop or state.should_terminate)


# -- 3. a GPU worker's pool ------------------------------------------------------------------------

def use_solo_pool(worker: Any) -> None:
    """Make ``worker`` (the ``WorkController`` that ``worker_init`` sends) run Celery's solo pool."""
    from celery.concurrency.solo import TaskPool

    worker.pool_cls = TaskPool


def pool_class(worker: Any) -> Any:
    """The pool class ``worker`` will run (for the canary test)."""
    return worker.pool_cls


# -- 4. who ends a GPU request ---------------------------------------------------------------------

class RequestHandler(Protocol):
    """What ends a GPU request that the worker's scheduler holds (``tasks.scheduler.Scheduler``)."""

    def terminate(self, request: Any) -> bool: ...
    def cancel(self, request: Any) -> bool: ...


class _Handler:
    current: RequestHandler | None = None


def set_request_handler(handler: RequestHandler | None) -> None:
    """In a GPU worker's main process: the scheduler that ends the GPU requests it holds."""
    _Handler.current = handler


# -- 5. kombu's Redis channel close ---------------------------------------------------------------

def fix_kombu_close() -> None:
    """Retry kombu's Redis channel close once when the first attempt fails on a lost connection. Idempotent."""
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel.close
    if getattr(original, "glyphq_fix", False):
        return

    def close(channel: Any) -> None:
        try:
            original(channel)
        except channel.connection_errors:
            if channel.closed:
                raise
            original(channel)  # the BRPOP reply is gone now; this time the close runs to the end

    close.glyphq_fix = True  # type: ignore[attr-defined]
    kombu_redis.Channel.close = close  # type: ignore[method-assign]


# -- 6. the cancel on a lost connection, and terminate ------------------------------------------

class CancelledForRedelivery(Request):
    """A GPU task's request: cancelled on a lost connection without storing a state, and terminated
    alone (see point 6)."""

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Stop the engine child that runs the request, as Celery stops a request's process, and leave its
        message for Redis to deliver again."""
        handler = _Handler.current
        if handler is None or not handler.cancel(self):
            super().cancel(pool, signal=signal, emit_retry=False)

    def terminate(self, pool: Any, signal: Any = None) -> None:
        """End this job alone when the worker's scheduler holds it, not its child and every job beside it
        (``signal`` is then unused); else terminate it as Celery does."""
        handler = _Handler.current
        if handler is None or not handler.terminate(self):
            super().terminate(pool, signal=signal)


# -- 7. the revoked set -----------------------------------------------------------------------------

def is_revoked(task_id: str) -> bool:
    """Whether ``task_id`` is in the worker's revoked set (a ``celery revoke`` since the worker started)."""
    from celery.worker import state

    return task_id in state.revoked


# -- 8. a message for an unknown task, without an id -----------------------------------------------

class GuardedConsumer(Consumer):
    """Celery's consumer, which drops a message for an unknown task that it cannot even fail (see point 8)."""

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Refuse a message for a task this worker does not have, as Celery does; one without an id is
        rejected with an ERROR line instead of breaking the connection loop."""
        try:
            super().on_unknown_task(body, message, exc)
        except Exception as error:  # noqa: BLE001  (whatever the message holds, it goes alone)
            log.error("dropped a message for an unknown task (%s) that could not be refused the usual way: %s: %s",
                      str(exc)[:120], type(error).__name__, str(error)[:200])
            if not message.acknowledged:
                message.reject_log_error(log, self.connection_errors)


# -- 9. uvicorn's HTTP/1.1 protocol -----------------------------------------------------------------

def header_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head ``seconds`` after
    it opened, or after the first byte of its next request on a kept-alive connection (see point 9)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None
        _waiting_after: object = None  # the request cycle that was current when the deadline was set

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._set_deadline()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._set_deadline()
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_after:
                self._clear_deadline()  # a new request's head arrived

        def connection_lost(self, exc: Exception | None) -> None:
            self._clear_deadline()
            super().connection_lost(exc)

        def _set_deadline(self) -> None:
            self._waiting_after = self.cycle
            self._deadline = self.loop.call_later(seconds, self._head_too_slow)

        def _clear_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_too_slow(self) -> None:
            self._deadline = None
            if self.cycle is self._waiting_after and not self.transport.is_closing():
                log.debug("closing %s: no whole request head within %g s", self.client, seconds)
                self.transport.close()

    return HeaderDeadline
