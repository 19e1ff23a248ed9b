"""A GPU worker's one scheduler, and the Celery strategy that feeds it the GPU tasks' requests.

``tasks.signals.EngineStep`` makes the scheduler as the worker starts (:func:`create`); the GPU tasks name
:func:`strategy` as their ``Task.Strategy`` (``tasks.answer``). No torch here.
"""

from __future__ import annotations

from typing import Any

from glyphq.tasks import intake, private
from glyphq.tasks.scheduler import Loop, Scheduler


class _SchedulingConsumer:
    """The consumer as Celery's default strategy sees it, except that ready requests go to the scheduler."""

    def __init__(self, consumer: Any, scheduler: Scheduler) -> None:
        self._consumer = consumer
        self.on_task_request = scheduler.add

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _Current:
    """The worker's one scheduler, made by the worker's engine step (``tasks.signals.EngineStep``)."""

    scheduler: Scheduler | None = None


def create(loop: Loop) -> Scheduler:
    """In a GPU worker's main process, as it starts: its scheduler, which starts the first child."""
    current = _Current.scheduler = Scheduler(loop)
    private.set_request_handler(current)
    current.start()
    return current


def current() -> Scheduler | None:
    """The worker's scheduler, or None outside a GPU worker's main process."""
    return _Current.scheduler


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``Task.Strategy`` for the GPU tasks: Celery's default strategy, feeding the worker's scheduler.

    Both GPU tasks share it. Celery builds the strategies again when the consumer reconnects; the
    requests the scheduler still waits with then belong to the lost connection: Redis delivers their
    messages again.
    """
    scheduler = _Current.scheduler
    if scheduler is None:  # a render worker: a GPU job sent to its queue is refused
        return intake.refusing_strategy(task, app, consumer, reason="it is answered only by a GPU worker")
    if task.name in scheduler.task_names or consumer is not scheduler.consumer:
        scheduler.attach(consumer)
    scheduler.task_names.add(task.name)
    handler = private.default_strategy(task, app, _SchedulingConsumer(consumer, scheduler), **kwargs)
    return intake.guard(task, consumer, handler)
