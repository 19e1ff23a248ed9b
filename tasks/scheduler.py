"""The GPU worker's main process: hand each reserved job to the child, answer each one when it ends.

The path of one job, start to end:

1. Celery's consumer reserves the message and its default strategy makes a request of it; for the GPU
   tasks the strategy here passes every ready request to the worker's :class:`Scheduler`.
2. The scheduler starts the pool job :func:`tasks.serve.serve` on the child if none is running, and
   hands the request over through the channel (``tasks.channel``), most urgent first, then oldest,
   at most ``reserved_jobs(GLYPHQ_MAX_BATCH)`` at a time (all the worker reserves).
3. The child runs it in its running batch and reports "started" (the scheduler calls Celery's
   ``Request.on_accepted``: task-started for Flower, the job is active in ``inspect active``) and,
   once its result is stored, "succeeded" or "failed" with its runtime: the scheduler acknowledges
   the message (``Request.acknowledge``) and sends the task-succeeded or task-failed event.
4. When the child dies, every job it started and did not end goes through Celery's
   ``Request.on_failure`` with ``WorkerLostError``: requeued (``task_reject_on_worker_lost``), or
   acknowledged if its result was already stored. The jobs handed to it that it had not started
   are handed to the next child. A job past ``GLYPHQ_TIME_LIMIT`` fails with
   Celery's ``Request.on_timeout`` and its child is killed, as billiard's hard limit does.
5. ``celery revoke --terminate`` (Flower's Terminate) of a job the scheduler holds ends that job
   alone (:meth:`Scheduler.terminate`, called by the GPU request's ``terminate``): one still waiting
   here is announced revoked at once (``Request.revoked``: REVOKED stored, task-revoked sent,
   acknowledged); one handed to the child gets a "cancel" control frame, the child drops it from
   its running batch and reports "revoked", and the scheduler announces it the same way. Celery's
   own terminate would kill the child and every job beside it. A job that ended before the frame
   came keeps its outcome; if the child dies first, the job comes back and is discarded as revoked.
   A plain ``celery revoke`` of a job the child holds but has not started is dropped the same way
   (the scheduler looks every ``WATCH_S``).
6. When the broker connection is lost, Celery cancels the jobs that run: their child is killed, and
   ``tasks.private.CancelledForRedelivery`` stores nothing for them. Every job the scheduler held
   belongs to that connection: none that dies with the child, or still waits, is acknowledged,
   rejected or stored, so Redis delivers each message again (at once when the worker closes the
   connection, or after the visibility timeout if Redis was still down then), and nothing more is
   handed to the child.

Recycling counts jobs: a child is handed at most as many jobs as it has room for
(``GLYPHQ_MAX_TASKS_PER_CHILD``); its successor may be started while it finishes them (``tasks.handover``).
The scheduler lives in the main process and runs on its event loop, so it needs no locks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError

from glyphq.celeryconfig import settings
from glyphq.producer.errors import InvalidJob
from glyphq.tasks import channel as channels
from glyphq.tasks import handover, intake, private

log = logging.getLogger(__name__)

#: How often the scheduler checks the hard time limit of the jobs that run.
WATCH_S = 0.5
#: How often, and for how long at most, it looks whether a leaving child has been reaped.
LEAVING_POLL_S = 0.02
LEAVING_WAIT_S = 30.0
#: Serving epochs, counted over every scheduler of the worker, so none repeats after a reconnect.
_EPOCHS = itertools.count(1)


#: Results the pace of a child is measured over, for when to start its successor.
PACE_JOBS = 64


def reserved_jobs(max_batch: int) -> int:
    """How many messages a GPU worker reserves from Redis: one per slot of its running batch, and a
    quarter more waiting in the child, so that a slot that frees is filled without a round trip to
    Redis. Every reserved job is handed to the child, which admits the most urgent first; a job still
    in Redis comes next in Redis's priority order as soon as one ends."""
    return max_batch + max_batch // 4


@dataclass
class _Handed:
    request: Any
    epoch: int
    frame: bytes  # its message as the channel carries it (``_encoded``), kept to hand it over again
    started: float | None = None  # time.monotonic() the child started it
    timed_out: bool = False
    cancelling: bool = False  # revoked: the child was told to drop it


class Scheduler:
    """Holds a GPU worker's ready requests and hands them to its child; see the module docstring."""

    def __init__(self, consumer: Any, channel: channels.Channel) -> None:
        self.consumer = consumer
        self.pool = consumer.pool
        self.timer = consumer.timer
        self.channel = channel
        self.connection = consumer.connection  # the broker connection the requests came on
        self.task_names: set[str] = set()
        self.waiting: list[tuple[int, int, Any, bytes]] = []  # (redis priority, arrival, request, its frame)
        self.handed: dict[str, _Handed] = {}
        self.epoch = 0  # the epoch being served
        self.serving = False
        self.room: int | None = None  # jobs the current child may still be handed; None: a new child
        self.pid: int | None = None
        self._arrivals = 0
        self._leaving: tuple[int, float] | None = None
        self._paced: tuple[float, int] = (time.monotonic(), 0)  # since, jobs ended: the child's pace
        self._ends: deque[float] = deque(maxlen=PACE_JOBS)  # when this child's latest jobs ended
        hub = getattr(getattr(consumer, "controller", None), "hub", None)
        if hub is None:
            from kombu.asynchronous import get_event_loop

            hub = get_event_loop()
        self.hub = hub
        if hub is not None:
            hub.add_reader(channel.reports_r, self.read_reports)
        else:  # pragma: no cover  (a worker without an event loop)
            self.timer.call_repeatedly(0.01, self.read_reports)
        self.timer.call_repeatedly(WATCH_S, self._watch)

    # -- intake ---------------------------------------------------------------------------------

    def add(self, request: Any) -> None:
        """Take a request that Celery's strategy accepted (not revoked, not expired, no ETA). One whose
        arguments are not a job's, or too large to hand to the child, fails alone (``tasks.intake``)."""
        try:
            frame = _encoded(request)
        except InvalidJob as exc:
            intake.refuse_request(request, exc)
            return
        self._arrivals += 1
        self.waiting.append((_redis_priority(request), self._arrivals, request, frame))
        self.pump()

    def pump(self) -> None:
        """Start a pool job if needed, and hand the child what it has room for."""
        if self.connection_lost():
            self.release_waiting()
            return
        if private.shutting_down() or self._leaving is not None or not self.waiting:
            return
        if not self.serving:
            self._serve()
            if not self.serving:
                return
        self.waiting.sort(key=lambda item: item[:2])
        limit = reserved_jobs(settings.max_batch)
        while self.waiting and len(self.handed) < limit and self.room_left() > 0:
            _priority, _arrival, request, frame = self.waiting.pop(0)
            if request.revoked():  # acknowledges it and records it as revoked
                continue
            self.handed[request.id] = _Handed(request, self.epoch, frame)
            self.room = self.room_left() - 1
            self._hand_over(self.epoch, frame)

    def _hand_over(self, epoch: int, message: dict[str, Any] | bytes) -> None:
        """Hand a frame to the child without waiting: what the pipe has no room for is written when the
        event loop finds it writable (a child still loading its model reads nothing yet)."""
        if not self.channel.hand_over(epoch, message):
            self._write_when_ready()

    def _write_when_ready(self) -> None:
        if self.hub is not None:
            self.hub.add_writer(self.channel.jobs_w, self._write_jobs)
        else:  # pragma: no cover  (a worker without an event loop)
            self.timer.call_after(0.01, self._write_jobs)

    def _write_jobs(self) -> None:
        """The jobs pipe has room: write the frames waiting for it, and stop watching once none waits."""
        if not self.channel.write_jobs():
            if self.hub is None:  # pragma: no cover
                self._write_when_ready()
            return
        if self.hub is not None:
            self.hub.remove_writer(self.channel.jobs_w)

    def drain(self) -> None:
        """The worker is stopping: every child starts no new job (what it has not started comes back)."""
        self.channel.drain()

    def terminate(self, request: Any) -> bool:
        """End one held request alone (``celery revoke --terminate``); False if this scheduler does not hold it.

        A waiting one is announced revoked at once. One handed to the child is dropped there, by a
        control frame, while the jobs beside it decode on; the child reports it "revoked", or, if it
        ended first, its outcome, which stands.
        """
        for item in self.waiting:
            if item[2].id == request.id:
                self.waiting.remove(item)
                _announce_revoked(item[2])
                return True
        handed = self.handed.get(request.id)
        if handed is None:
            return False
        if not handed.cancelling:
            handed.cancelling = True
            self._hand_over(handed.epoch, {"control": "cancel", "id": request.id})
        return True

    def connection_lost(self) -> bool:
        """Whether the broker connection the requests came on is gone (the consumer reconnects with a new one)."""
        return self.consumer.connection is not self.connection

    def release_waiting(self) -> None:
        """Forget the requests not handed to the child: their messages come back from Redis."""
        for item in self.waiting:
            private.request_reserved(item[2])
        self.waiting.clear()

    def room_left(self) -> int:
        return settings.max_tasks_per_child if self.room is None else self.room

    def _serve(self) -> None:
        from glyphq.tasks.serve import serve

        if self.room_left() <= 0:
            return
        epoch = self.epoch = next(_EPOCHS)
        callbacks = _ServeCallbacks(self, epoch)
        forever = 10**9  # the pool's time limits are per pool job; glyphq's are per job (see _watch)
        result = self.pool.apply_async(serve, args=(epoch, self.room_left()), accept_callback=callbacks.on_accepted,
                                       callback=callbacks.on_success, error_callback=callbacks.on_failure,
                                       soft_timeout=forever, timeout=forever, correlation_id=f"glyphq-serve-{epoch}")
        if result is not None:  # None: the pool has stopped, the worker is exiting
            self.serving = True

    # -- reports --------------------------------------------------------------------------------

    def read_reports(self) -> None:
        """Handle every report the child has written (the event loop calls this when there are some)."""
        for report in self.channel.reports():
            self._report(report)

    def _report(self, report: dict[str, Any]) -> None:
        handed = self.handed.get(str(report.get("id")))
        if handed is None:
            return  # taken back already (its child died or its time limit passed)
        request, event = handed.request, report.get("event")
        if event == "started":
            handed.started = time.monotonic()
            request.on_accepted(self.pid or report.get("pid"), time.monotonic())
            return
        del self.handed[request.id]
        if event == "revoked":  # dropped from the running batch (see terminate)
            if handed.started is None and self.room is not None:
                self.room += 1  # the child never started it, so never counted it
            _announce_revoked(request)
            self.pump()
            return
        if event == "unstored":  # the result backend failed: the message goes back to the queue
            private.request_done(request, successful=False)
            request.reject(requeue=True)
        elif event == "duplicate":
            private.request_done(request, successful=True)
            request.acknowledge()
        else:
            ok = event == "succeeded"
            private.request_done(request, successful=ok)
            request.acknowledge()
            runtime = report.get("runtime")
            if ok:
                request.send_event("task-succeeded", result="(stored)", runtime=runtime)
            else:
                request.send_event("task-failed", exception=str(report.get("exception")))
        since, ended = self._paced
        self._paced = (since, ended + 1)
        self._ends.append(time.monotonic())
        if report.get("successor_fits"):
            self._maybe_start_successor(self.room_left() + len(self.handed))
        self.pump()

    # -- the pool job ---------------------------------------------------------------------------

    def served(self, epoch: int, returned: dict[str, Any]) -> None:
        """The child stopped serving ``epoch``: what it handed back goes to the front of the queue."""
        self.read_reports()
        for report in self.channel.handed_back(returned.get("unsent") or b""):
            self._report(report)
        self.channel.forget(epoch)
        for task_id, handed in list(self.handed.items()):
            if handed.epoch == epoch:  # handed over after the child's last look: hand it over again
                del self.handed[task_id]
                if self.connection_lost():
                    private.request_reserved(handed.request)  # Redis delivers it again
                elif handed.cancelling:
                    _announce_revoked(handed.request)
                else:
                    self.waiting.append((_redis_priority(handed.request), 0, handed.request, handed.frame))
        self.serving = False
        room = int(returned.get("room") or 0)
        self.room = room or None
        if room and returned.get("room_for_a_successor"):
            self._maybe_start_successor(room + len(self.handed))
        if room == 0 and self.pid is not None:
            self._leaving = (self.pid, time.monotonic())
            self._until_gone()
        self.pump()

    def lost(self, epoch: int, exc_info: Any) -> None:
        """The child died (or was killed): every job it started and had not ended goes back through
        Celery, those it had not started wait for the next child, or, when the broker connection is
        gone (Celery killed the child for that), every one stays unacknowledged.

        Celery's ``on_failure`` would take a job that was not cancelled itself, but died beside one that
        was, as terminated: stored as REVOKED and acknowledged, and never run again.
        """
        self.read_reports()
        self.channel.forget(epoch)
        connection_lost = self.connection_lost()
        for task_id, handed in list(self.handed.items()):
            if handed.epoch != epoch:
                continue
            del self.handed[task_id]
            if handed.timed_out:
                continue  # failed and acknowledged already
            if connection_lost:
                private.request_reserved(handed.request)  # Redis delivers it again
                continue
            if handed.started is None:  # the child never started it, so it did not kill the child
                self.waiting.append((_redis_priority(handed.request), 0, handed.request, handed.frame))
                continue
            handed.request.on_failure(exc_info)
        self.serving = False
        self.room = None
        self.pid = None
        self.pump()

    def _watch(self) -> None:
        """Drop the revoked jobs the child holds but has not started (``_drop_revoked``). Fail a job past
        ``GLYPHQ_TIME_LIMIT`` as Celery does (``Request.on_timeout``) and kill its child, which is stuck
        in it: the soft limit ends a job between two decode steps, in the child."""
        self._drop_revoked()
        now = time.monotonic()
        late = [h for h in self.handed.values()
                if h.started is not None and not h.timed_out and now - h.started > settings.time_limit_s]
        if not late or self.pid is None:
            return
        for handed in late:
            handed.timed_out = True
            handed.request.on_timeout(False, settings.time_limit_s)
        log.error("killing child %d: %d job(s) past the hard time limit", self.pid, len(late))
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def _drop_revoked(self) -> None:
        """A plain ``celery revoke`` (no terminate) of a job handed to the child that has not started
        it: Celery would discard a reserved job when it comes to run it, so the child drops it from
        its queue, as for a terminate (a job that starts meanwhile is dropped from its row)."""
        for handed in list(self.handed.values()):
            if handed.started is None and not handed.cancelling and private.is_revoked(handed.request.id):
                self.terminate(handed.request)

    def _until_gone(self) -> None:
        """Hold the next jobs until the child that is leaving has been reaped, so none is handed to a
        child that will never read it; they go to the next child as soon as that one is ready."""
        if self._leaving is None:
            return
        pid, since = self._leaving
        handover.reap(self.pool)
        if pid in handover.child_pids(self.pool) and time.monotonic() - since < LEAVING_WAIT_S:
            self.timer.call_after(LEAVING_POLL_S, self._until_gone)
            return
        self._leaving = None
        self._paced = (time.monotonic(), 0)
        self._ends.clear()
        self.pump()

    def _maybe_start_successor(self, room: int) -> None:
        """Start the child's successor once the ``room`` jobs it has left to end take
        ``GLYPHQ_RECYCLE_OVERLAP_S`` or less: at the pace of its latest ``PACE_JOBS`` results once it
        has that many (since it started, the pace would count the compile before its first job), else
        at its pace since it started."""
        since, ended = self._paced
        if ended == 0 or room <= 0 or settings.recycle_overlap_s <= 0:  # nothing left: billiard replaces it
            return
        if len(self._ends) == PACE_JOBS:
            pace = (PACE_JOBS - 1) / max(self._ends[-1] - self._ends[0], 1e-6)
        else:
            pace = ended / max(time.monotonic() - since, 1e-6)
        if room / pace <= settings.recycle_overlap_s and not private.shutting_down():
            handover.start_successor(self.pool)


class _ServeCallbacks:
    def __init__(self, scheduler: Scheduler, epoch: int) -> None:
        self.scheduler = scheduler
        self.epoch = epoch

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.scheduler.pid = pid

    def on_success(self, returned: Any) -> None:
        if isinstance(returned, dict):
            self.scheduler.served(self.epoch, returned)
        else:  # the pool job raised: the child lives on, its jobs are given back to Celery
            self.scheduler.lost(self.epoch, _lost_info(f"the child failed serving: {returned!r}"))

    def on_failure(self, exc_info: Any) -> None:
        self.scheduler.lost(self.epoch, exc_info)


def _lost_info(message: str) -> ExceptionInfo:
    try:
        raise WorkerLostError(message)
    except WorkerLostError:
        return ExceptionInfo()


def _announce_revoked(request: Any) -> None:
    """Acknowledge a revoked request, store REVOKED, send task-revoked and Celery's ``task_revoked``
    signal (whose handler in ``tasks.signals`` releases the job's blobs).

    ``Request.revoked`` does all of it for an id in the worker's revoked set, where Celery's revoke
    control puts it before it terminates; the rest covers a terminate without a revoke.
    """
    if request.revoked():
        return
    from celery import signals

    from glyphq.tasks.serve import context

    private.request_done(request, successful=False)
    request.acknowledge()
    recorded = context(_message(request))
    request.task.backend.mark_as_revoked(request.id, "terminated", request=recorded, store_result=True)
    request.send_event("task-revoked", terminated=True, signum=None, expired=False)
    signals.task_revoked.send(sender=request.task, request=recorded, terminated=True, signum=None, expired=False)


def _redis_priority(request: Any) -> int:
    """The message's Redis priority (0 is most urgent, see ``producer.submit``)."""
    priority = (request.delivery_info or {}).get("priority")
    return int(priority) if isinstance(priority, int) else 9


def _encoded(request: Any) -> bytes:
    """The request's message as the channel carries it; raises ``InvalidJob`` if it is too large to hand over."""
    data = channels.encode(_message(request))
    if len(data) > settings.max_message_bytes:
        raise InvalidJob("message", f"is {len(data)} bytes, more than the worker's limit of "
                                    f"{settings.max_message_bytes} (GLYPHQ_MAX_MESSAGE_BYTES)")
    return data


def _message(request: Any) -> dict[str, Any]:
    """What the child needs of a request: id, task, arguments, and what the result backend records.
    Raises ``InvalidJob`` if the arguments are not a list and an object."""
    args, kwargs = request.args, request.kwargs
    if not isinstance(args, (list, tuple)):
        raise InvalidJob("args", f"must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise InvalidJob("kwargs", f"must be an object, got {type(kwargs).__name__}")
    delivery = request.delivery_info or {}
    return {"id": request.id, "task": request.name, "args": list(args),
            "kwargs": dict(kwargs), "priority": _redis_priority(request),
            "hostname": request.hostname,
            "delivery_info": {"routing_key": delivery.get("routing_key"), "priority": delivery.get("priority"),
                              "redelivered": bool(delivery.get("redelivered"))},
            "group": getattr(request, "group", None), "parent_id": getattr(request, "parent_id", None),
            "root_id": getattr(request, "root_id", None)}


class _SchedulingConsumer:
    """The consumer as Celery's default strategy sees it, except that ready requests go to the scheduler."""

    def __init__(self, consumer: Any, scheduler: Scheduler) -> None:
        self._consumer = consumer
        self.on_task_request = scheduler.add

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _Current:
    """The worker's one scheduler (the main process has one consumer at a time)."""

    scheduler: Scheduler | None = None


def drain() -> None:
    """On a warm shutdown: the child finishes the jobs it runs and starts none of those still waiting."""
    if _Current.scheduler is not None:
        _Current.scheduler.drain()


def terminate(request: Any) -> bool:
    """End a GPU request alone if the worker's scheduler holds it (see :meth:`Scheduler.terminate`)."""
    current = _Current.scheduler
    return current is not None and current.terminate(request)


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``Task.Strategy`` for the GPU tasks: Celery's default strategy, feeding the worker's scheduler.

    Both GPU tasks share it. Celery builds the strategies again when the consumer reconnects; a new
    scheduler then starts, and the requests the old one held belong to the lost connection: Redis
    delivers their messages again.
    """
    current = _Current.scheduler
    if current is None or current.consumer is not consumer or task.name in current.task_names:
        if current is not None:
            current.release_waiting()
        found = channels.current() or channels.create()
        current = _Current.scheduler = Scheduler(consumer, found)
    current.task_names.add(task.name)
    handler = private.default_strategy(task, app, _SchedulingConsumer(consumer, current), **kwargs)
    return intake.guard(task, consumer, handler)
