"""Messages that can't be made into a request fail alone; the worker keeps consuming.

Anything that can write to the Redis can put a message on glyphq's queues, so a message is untrusted
input. Celery's consumer refuses some bad ones itself (an unknown task, an undecodable body), but an
exception anywhere else in turning a message into a request (a body that is not ``[args, kwargs,
embed]``, a missing ``id`` header) escapes to its connection loop: the worker exits, or reconnects
and takes the same message again, for ever. :func:`guard` wraps a task's strategy so that such a
message is refused on its own: acknowledged, with a stored ``InvalidJob`` failure when it carries a
usable id, or dropped with an ERROR line naming it when it does not.

No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError

from glyphq.producer.errors import InvalidJob
from glyphq.producer.validation import check_identifier
from glyphq.tasks import private
from glyphq.tasks.messages import context, job_message

log = logging.getLogger(__name__)

#: Errors Celery's consumer handles itself when a strategy raises them (it rejects the message).
_CELERY_HANDLES = (InvalidTaskError, ContentDisallowed, DecodeError)


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """``Task.Strategy`` for glyphq's CPU tasks: Celery's default strategy, guarded by :func:`guard`."""
    return guard(task, consumer, private.default_strategy(task, app, consumer, **kwargs))


#: The strategy a GPU worker gives every task it does not answer (:func:`refuse_tasks_but`).
REFUSING_STRATEGY = "glyphq.tasks.intake:refusing_strategy"


def refuse_tasks_but(app: Any, answered: tuple[str, ...]) -> None:
    """In a GPU worker: every task but ``answered`` (Celery's built-in ones, the render step) is refused
    when a message names it. Its solo pool would run it in the main process, blocking the event loop
    (and a built-in like ``celery.map`` would answer GPU jobs there, loading a model beside the child)."""
    for name, task in app.tasks.items():
        if name not in answered:
            task.Strategy = REFUSING_STRATEGY


def refusing_strategy(task: Any, app: Any, consumer: Any,
                      reason: str = "a GPU worker answers glyphq.answer and glyphq.answer_pages only",
                      **kwargs: Any) -> Callable[..., Any]:
    """``Task.Strategy`` that refuses every message for ``task`` alone, saying ``reason`` (see
    :func:`refuse_tasks_but`)."""

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **_: Any) -> None:
        refuse_message(task, consumer, message, InvalidJob("task", f"{task.name} is not run here: {reason}"))

    return on_message


def guard(task: Any, consumer: Any, handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a strategy's message handler: a message it fails on is refused alone (see the module docstring)."""

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        try:
            return handler(message, body, ack, reject, callbacks, **kwargs)
        except _CELERY_HANDLES:
            raise
        except Exception as exc:  # noqa: BLE001  (whatever the message holds, it fails alone)
            refuse_message(task, consumer, message, exc)
            return None

    return on_message


def refuse_message(task: Any, consumer: Any, message: Any, exc: BaseException) -> None:
    """Acknowledge a message that could not be made into a request, storing an ``InvalidJob`` failure
    under its id when it has one that glyphq would accept as a job id."""
    headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
    task_id = headers.get("id")
    size = len(message.body) if isinstance(getattr(message, "body", None), (bytes, str)) else -1
    reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    if not _usable_id(task_id):
        log.error("dropped a %s message without a usable id (%r, %d bytes): %s", task.name, str(task_id)[:80],
                  size, reason)
    else:
        log.error("Task %s[%s] refused: its message (%d bytes) is not a %s request: %s", task.name, task_id, size,
                  task.name, reason)
        failure = exc if isinstance(exc, InvalidJob) and exc.field == "task" else InvalidJob(
            "message", f"could not be read as a {task.name} request ({reason})")
        try:
            task.backend.mark_as_failure(task_id, failure, request=None)
        except Exception:  # noqa: BLE001  (the message goes anyway: kept, it would be refused again)
            log.exception("could not store the failure of %s[%s]", task.name, task_id)
    message.ack_log_error(log, consumer.connection_errors)


def _usable_id(task_id: Any) -> bool:
    try:
        return check_identifier("id", task_id) is not None
    except InvalidJob:
        return False


def refuse_request(request: Any, exc: InvalidJob) -> None:
    """Fail a request the worker will not hand to its child (too large, or arguments of the wrong shape):
    its failure stored, its message acknowledged, task-failed sent. Nothing else is touched."""
    log.error("Task %s[%s] refused: %s", request.name, request.id, exc)
    private.request_done(request, successful=False)
    try:
        request.task.backend.mark_as_failure(request.id, exc, request=None)
    except Exception:  # noqa: BLE001
        log.exception("could not store the failure of %s[%s]", request.name, request.id)
    request.acknowledge()
    request.send_event("task-failed", exception=f"InvalidJob({str(exc)[:500]!r})")


def announce_revoked(request: Any) -> None:
    """Acknowledge a revoked request, store REVOKED, send task-revoked and Celery's ``task_revoked``
    signal (whose handler in ``tasks.signals`` releases the job's blobs).

    ``Request.revoked`` does all of it for an id in the worker's revoked set, where Celery's revoke
    control puts it before it terminates; the rest covers a terminate without a revoke.
    """
    if request.revoked():
        return
    private.request_done(request, successful=False)
    request.acknowledge()
    recorded = context(job_message(request))
    request.task.backend.mark_as_revoked(request.id, "terminated", request=recorded, store_result=True)
    request.send_event("task-revoked", terminated=True, signum=None, expired=False)
    signals.task_revoked.send(sender=request.task, request=recorded, terminated=True, signum=None, expired=False)
