"""The GPU worker's main process: hand each reserved job to the engine child, answer each one when it ends,
and start, watch and replace the child.

The path of one job, start to end:

1. Celery's consumer reserves the message and its default strategy makes a request of it; for the GPU
   tasks the strategy here passes every ready request to the worker's :class:`Scheduler`.
2. The scheduler hands the request to the current engine child (``tasks.engine_process``) through its
   channel (``tasks.channel``), most urgent first, then oldest, at most ``reserved_jobs(GLYPHQ_MAX_BATCH)``
   at a time (all the worker reserves), and at most ``GLYPHQ_MAX_TASKS_PER_CHILD`` to one child.
3. The child runs it in its running batch and reports "started" (the scheduler calls Celery's
   ``Request.on_accepted``: task-started for Flower, the job is active in ``inspect active``) and,
   once its result is stored, "succeeded" or "failed" with its runtime: the scheduler acknowledges
   the message (``Request.acknowledge``) and sends the task-succeeded or task-failed event.
4. When a child dies, every job it started and did not end goes through Celery's ``Request.on_failure``
   with ``WorkerLostError``: requeued (``task_reject_on_worker_lost``), or acknowledged if its result was
   already stored. The jobs handed to it that it had not started are handed to the next child. A job
   past ``GLYPHQ_TIME_LIMIT`` fails with Celery's ``Request.on_timeout`` and its child is killed.
5. ``celery revoke --terminate`` (Flower's Terminate) of a job the scheduler holds ends that job alone
   (:meth:`Scheduler.terminate`): one still waiting here is announced revoked at once
   (``Request.revoked``: REVOKED stored, task-revoked sent, acknowledged); one handed to the child gets a
   "cancel" control frame, the child drops it from its running batch and reports "revoked", and the
   scheduler announces it the same way. A job that ended before the frame came keeps its outcome; if
   the child dies first, the job comes back and is discarded as revoked. A plain ``celery revoke`` of a
   job the child holds but has not started is dropped the same way (the scheduler looks every ``WATCH_S``).
6. When the broker connection is lost, Celery cancels the jobs that run (``Request.cancel``): the
   scheduler kills their child, and nothing is stored for them. Every job of that connection, dead with
   the child or still waiting, is left unacknowledged, so Redis delivers each message again.

The child's life: the scheduler starts one with the worker, and a new one whenever the current one has
left. The current child leaves after the job the scheduler counts as its ``GLYPHQ_MAX_TASKS_PER_CHILD``-th
(it is told "last" and leaves once its jobs have ended), or sooner when a memory guard asks for its
replacement. A successor is started while the current child still has ``GLYPHQ_RECYCLE_OVERLAP_S``
seconds of jobs left: it loads and warms up beside it, takes over once it has left, and reports
"ready"; only then is it handed jobs (``worker.runtime.Runtime.load``).

The scheduler lives in the main process and runs on its event loop, so it needs no locks. It reaches
Celery through the requests it is given, the consumer it is attached to and a :class:`Loop`, so the
unit tests drive it with fakes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError

from glyphq.celeryconfig import settings
from glyphq.producer.errors import InvalidJob
from glyphq.tasks import intake, private
from glyphq.tasks.engine_process import EngineProcess
from glyphq.tasks.messages import encoded, redis_priority
from glyphq.worker import metrics, status

log = logging.getLogger(__name__)

#: How often the scheduler checks the hard time limit of the jobs that run, the load time limit of the
#: children that load, and the revoked jobs the child holds.
WATCH_S = 0.5
#: Results the pace of a child is measured over, for when to start its successor, and the shortest
#: time its pace is measured over before it has that many.
PACE_JOBS = 64
PACE_MIN_S = 5.0
#: How long a child that died before it was ready waits to be started again (a broken device would
#: otherwise start one child after another as fast as they die).
RESTART_DELAY_S = 1.0
#: How long a warm shutdown waits beyond the hard time limit for the children to end their jobs.
FINISH_MARGIN_S = 30.0


def reserved_jobs(max_batch: int) -> int:
    """How many messages a GPU worker reserves from Redis: one per slot of its running batch, and a
    quarter more waiting in the child, so that a slot that frees is filled without a round trip to
    Redis. Every reserved job is handed to the child, which admits the most urgent first; a job still
    in Redis comes next in Redis's priority order as soon as one ends."""
    return max_batch + max_batch // 4


#: The most decode steps a successor is told to warm (a child publishes those it ran more than once).
MAX_DECODE_STEPS = 64


def decode_steps(published: Any) -> list[tuple[int, int]]:
    """The (rows, cache length) pairs of a child's published ``decode_buckets`` that are pairs of positive
    integers, at most ``MAX_DECODE_STEPS``: what its successor warms. The value came over the child's
    channel, so anything else in it is dropped, and the main process's event loop never raises on it."""
    steps: list[tuple[int, int]] = []
    for step in published if isinstance(published, list) else []:
        if (isinstance(step, list) and len(step) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in step)):
            steps.append((step[0], step[1]))
    return steps[:MAX_DECODE_STEPS]


class Loop(Protocol):
    """The event loop the scheduler runs on: the worker's (kombu's ``Hub``), or a test's."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_writer(self, fd: int) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> Any: ...
    def call_repeatedly(self, delay: float, callback: Callable[[], None]) -> Any: ...


#: Makes an unstarted engine child: (number, predecessor's pid or None, decode steps to warm).
NewChild = Callable[[int, "int | None", Sequence[tuple[int, int]]], Any]


@dataclass
class _Handed:
    request: Any
    child: Any  # the EngineProcess it was handed to
    frame: bytes  # its message as the channel carries it (``messages.encoded``), kept to hand it over again
    connection: Any  # the broker connection its message came on
    started: float | None = None  # time.monotonic() the child started it
    timed_out: bool = False
    cancelling: bool = False  # revoked: the child was told to drop it


class Scheduler:
    """Holds a GPU worker's ready requests and its engine children; see the module docstring.

    ``new_child(number, predecessor, buckets)`` makes an unstarted ``EngineProcess``;
    ``shutting_down()`` says whether the worker stops.
    """

    def __init__(self, loop: Loop, new_child: NewChild = EngineProcess,
                 shutting_down: Callable[[], bool] = private.shutting_down) -> None:
        self.loop = loop
        self.new_child = new_child
        self.shutting_down = shutting_down
        self.consumer: Any = None
        self.connection: Any = None  # the broker connection of the requests that wait
        self.task_names: set[str] = set()
        self.waiting: list[tuple[int, int, Any, bytes]] = []  # (redis priority, arrival, request, its frame)
        self.handed: dict[str, _Handed] = {}
        self.children: list[Any] = []  # every child alive: the current one, its successor, one leaving
        self.current: Any = None  # the ready child jobs are handed to
        self.successor: Any = None  # the child started to take over from the current one
        self.room = 0  # jobs the current child may still be handed (GLYPHQ_MAX_TASKS_PER_CHILD)
        self.started = 0  # children started so far
        self.readied = 0  # children that became the current one (the status's "children": recycles + 1)
        self.stopping = False
        self.recycles_by_reason: dict[str, int] = {}
        self._arrivals = 0
        self._paced: tuple[float, int] = (time.monotonic(), 0)  # since, jobs ended: the child's pace
        self._ends: deque[float] = deque(maxlen=PACE_JOBS)  # when the current child's latest jobs ended
        loop.call_repeatedly(WATCH_S, self._watch)

    # -- children -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first child (it loads the model while the consumer connects)."""
        if not self.children:
            self.successor = self._start_child()

    def _start_child(self, predecessor: Any = None) -> Any:
        self.started += 1
        buckets = decode_steps(predecessor.status.get("decode_buckets")) if predecessor is not None else []
        child = self.new_child(self.started, predecessor.pid if predecessor is not None else None, buckets)
        child.start()
        self.children.append(child)
        self._watch_child(child)
        if predecessor is None:
            log.info("started child %d", child.pid)
        else:
            log.info("started child %d to take over from child %d", child.pid, predecessor.pid)
        return child

    def _watch_child(self, child: Any) -> None:
        """Have the event loop call back when the child reports, exits, or its jobs pipe has room again."""
        if not child.channel.ended:
            self.loop.add_reader(child.channel.reports_r, lambda: self._read(child))
        self.loop.add_reader(child.sentinel, lambda: self._exited(child))
        if child.channel.waiting_bytes:
            self.loop.add_writer(child.channel.jobs_w, lambda: self._write_jobs(child))

    def rewatch(self) -> None:
        """Watch every child again: Celery's consumer empties its event loop when it loses the broker
        connection, and registers the worker's steps with it again once it has reconnected."""
        for child in self.children:
            self._watch_child(child)

    def _childless(self) -> bool:
        """Whether the worker runs on and no child answers or is on its way to."""
        return self.current is None and self.successor is None and not self.stopping and not self.shutting_down()

    def _start_later(self) -> None:
        if self._childless():
            self.successor = self._start_child()

    def _read(self, child: Any) -> None:
        """Handle every report the child has written (the event loop calls this when there are some)."""
        for report in child.channel.reports():
            self._report(child, report)
        if child.channel.ended:  # an ended pipe is always readable: stop watching it
            self.loop.remove_reader(child.channel.reports_r)

    def _exited(self, child: Any) -> None:
        """The child has exited: read what it wrote last, then give its jobs back (see the module docstring)."""
        self.loop.remove_reader(child.sentinel)
        if not child.channel.ended:
            self._read(child)
            self.loop.remove_reader(child.channel.reports_r)
        self.loop.remove_writer(child.channel.jobs_w)
        code = child.exitcode()
        child.close()
        self.children.remove(child)
        if child.leaving is not None and code == 0:
            log.info("child %d left (%s)", child.pid, child.leaving)
        elif child.killed or self.stopping:
            log.info("child %d ended (%s)", child.pid, "killed" if child.killed else f"status {code}, the worker stops")
        else:
            how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
            log.error("child %d ended unexpectedly (%s)%s", child.pid, how,
                      "" if child.ready else " before it was ready")
        self._give_back(child, _lost_info(f"child {child.pid} ended unexpectedly ({code})"))
        if child is self.current:
            self.current, self.room = None, 0
        if child is self.successor:
            self.successor = None
        if self._childless():
            if child.ready or child.leaving is not None:
                self.successor = self._start_child()
            else:
                self.loop.call_later(RESTART_DELAY_S, self._start_later)
        self.pump()

    def _give_back(self, child: Any, exc_info: Any) -> None:
        """The jobs handed to a child that has exited: each one it started and did not end goes back
        through Celery, those it had not started wait for the next child, or, when their broker
        connection is gone, every one stays unacknowledged.

        Celery's ``on_failure`` would take a job that was not cancelled itself, but died beside one that
        was, as terminated: stored as REVOKED and acknowledged, and never run again.
        """
        for task_id, handed in list(self.handed.items()):
            if handed.child is not child:
                continue
            del self.handed[task_id]
            if handed.timed_out:
                continue  # failed and acknowledged already
            if not self._connected(handed.connection):
                private.request_reserved(handed.request)  # Redis delivers it again
            elif handed.started is None:  # the child never started it, so it did not kill the child
                if handed.cancelling:
                    intake.announce_revoked(handed.request)
                else:
                    self.waiting.append((redis_priority(handed.request), 0, handed.request, handed.frame))
            else:
                handed.request.on_failure(exc_info)

    def _ready(self, child: Any) -> None:
        """A child has loaded (a successor: taken over): it is the current one from now on. A predecessor
        still running (its successor stopped waiting for it) is handed no more jobs."""
        child.ready = True
        if child is self.successor:
            self.successor = None
        previous, self.current = self.current, child
        if previous is not None and previous is not child:
            self._send_last(previous)
        self.room = settings.max_tasks_per_child
        self._paced = (time.monotonic(), 0)
        self._ends.clear()
        self.readied += 1
        status.merge({**child.status, "children": self.readied})
        self.pump()

    def _send_last(self, child: Any) -> None:
        """Tell ``child`` no more jobs will come: it leaves once those it holds have ended."""
        if child.last_sent:
            return
        child.last_sent = True
        child.leaving = child.leaving or "tasks"
        self._hand_over(child, {"control": "last"})
        if child.leaving == "tasks":
            self._count_recycle("tasks")

    def _count_recycle(self, reason: str) -> None:
        metrics.recycled(reason)
        self.recycles_by_reason[reason] = self.recycles_by_reason.get(reason, 0) + 1
        status.merge({"recycles_by_reason": dict(self.recycles_by_reason)})

    # -- intake ---------------------------------------------------------------------------------

    def attach(self, consumer: Any) -> None:
        """The consumer whose requests come next: on a new broker connection, the requests still waiting
        belong to the lost one, and Redis delivers their messages again."""
        if consumer is not self.consumer or consumer.connection is not self.connection:
            self.release_waiting()
            self.task_names.clear()
        self.consumer, self.connection = consumer, consumer.connection

    def add(self, request: Any) -> None:
        """Take a request that Celery's strategy accepted (not revoked, not expired, no ETA). One whose
        arguments are not a job's, or too large to hand to the child, fails alone (``tasks.intake``)."""
        try:
            frame = encoded(request, settings.max_message_bytes)
        except InvalidJob as exc:
            intake.refuse_request(request, exc)
            return
        self._arrivals += 1
        self.waiting.append((redis_priority(request), self._arrivals, request, frame))
        self.pump()

    def pump(self) -> None:
        """Hand the current child what it has room for."""
        if not self._connected(self.connection):
            self.release_waiting()
            return
        child = self.current
        if self.stopping or self.shutting_down() or child is None or child.last_sent or not self.waiting:
            return
        self.waiting.sort(key=lambda item: item[:2])
        limit = reserved_jobs(settings.max_batch)
        while self.waiting and len(self.handed) < limit and self.room > 0:
            _priority, _arrival, request, frame = self.waiting.pop(0)
            if request.revoked():  # acknowledges it and records it as revoked
                continue
            self.handed[request.id] = _Handed(request, child, frame, self.connection)
            self.room -= 1
            self._hand_over(child, frame)
        if self.room == 0:
            self._send_last(child)

    def _hand_over(self, child: Any, message: dict[str, Any] | bytes) -> None:
        """Hand a frame to a child without waiting: what the pipe has no room for is written when the
        event loop finds it writable (a child still loading its model reads nothing yet)."""
        if not child.channel.hand_over(message):
            self.loop.add_writer(child.channel.jobs_w, lambda: self._write_jobs(child))

    def _write_jobs(self, child: Any) -> None:
        """The jobs pipe has room: write the frames waiting for it, and stop watching once none waits."""
        if child.channel.write_jobs():
            self.loop.remove_writer(child.channel.jobs_w)

    def release_waiting(self) -> None:
        """Forget the requests not handed to the child: their messages come back from Redis."""
        for item in self.waiting:
            private.request_reserved(item[2])
        self.waiting.clear()

    def _connected(self, connection: Any) -> bool:
        """Whether ``connection`` is still the consumer's (it reconnects with a new one)."""
        return self.consumer is None or self.consumer.connection is connection

    # -- revoke, terminate, cancel --------------------------------------------------------------

    def terminate(self, request: Any) -> bool:
        """End one held request alone (``celery revoke --terminate``); False if this scheduler does not hold it.

        A waiting one is announced revoked at once. One handed to the child is dropped there, by a
        control frame, while the jobs beside it decode on; the child reports it "revoked", or, if it
        ended first, its outcome, which stands.
        """
        for item in self.waiting:
            if item[2].id == request.id:
                self.waiting.remove(item)
                intake.announce_revoked(item[2])
                return True
        handed = self.handed.get(request.id)
        if handed is None:
            return False
        if not handed.cancelling:
            handed.cancelling = True
            self._hand_over(handed.child, {"control": "cancel", "id": request.id})
        return True

    def cancel(self, request: Any) -> bool:
        """The broker connection of a running request was lost (Celery cancels it so that Redis delivers it
        again): kill the child that runs it, as Celery's own cancel kills the request's process. False if
        this scheduler does not hold it."""
        handed = self.handed.get(request.id)
        if handed is None:
            return False
        if not handed.child.killed:
            log.warning("the broker connection was lost: ending child %d, whose jobs come back from Redis",
                        handed.child.pid)
            handed.child.kill()
        return True

    def drain(self) -> None:
        """The worker is stopping: every child starts no new job (what it has not started comes back)."""
        self.stopping = True
        for child in self.children:
            child.channel.drain()

    # -- reports --------------------------------------------------------------------------------

    def _report(self, child: Any, report: dict[str, Any]) -> None:
        event = report.get("event")
        if event == "status":
            fields = report.get("fields")
            if isinstance(fields, dict):
                child.status.update(fields)
                if child is self.current:
                    status.merge(fields)
        elif event == "ready":
            self._ready(child)
        elif event == "recycle":
            self._recycling(child, str(report.get("reason")), str(report.get("detail")))
        elif event == "leaving":
            child.leaving = child.leaving or str(report.get("reason"))
        elif event == "model_error":
            self._model_error(str(report.get("error")))
        else:
            self._job_report(child, report)

    def _recycling(self, child: Any, reason: str, detail: str) -> None:
        """A memory guard asked for ``child``'s replacement: it is handed nothing more, starts no new job,
        and its replacement starts once it has left (a successor beside it would add to what it holds)."""
        log.info("replacing child %d after the jobs it runs (%s): %s", child.pid, reason, detail)
        if child.leaving is None:  # one replacement, counted once: "tasks" was counted when it was told "last"
            self._count_recycle(reason)
        child.leaving = reason
        child.last_sent = True
        if child is self.current:
            self.room = 0

    def _model_error(self, error: str) -> None:
        """The model could not load: stop the worker (it exits non-zero, ``tasks.signals``); the jobs stay queued."""
        status.merge({"model_error": error})
        self.stopping = True
        os.kill(os.getpid(), signal.SIGTERM)

    def _job_report(self, child: Any, report: dict[str, Any]) -> None:
        handed = self.handed.get(str(report.get("id")))
        if handed is None or handed.child is not child or handed.timed_out:
            return  # taken back already (its child died or its time limit passed)
        request, event = handed.request, report.get("event")
        if event == "started":
            handed.started = time.monotonic()
            request.on_accepted(child.pid, time.monotonic())
            return
        del self.handed[request.id]
        if event == "revoked":  # dropped from the running batch (see terminate)
            if handed.started is None and child is self.current and not child.last_sent:
                self.room += 1  # it never ran, so it does not count towards this child's jobs
            intake.announce_revoked(request)
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
        if child is self.current:
            since, ended = self._paced
            self._paced = (since, ended + 1)
            self._ends.append(time.monotonic())
            if report.get("successor_fits"):
                self._maybe_start_successor(self.room + sum(h.child is child for h in self.handed.values()))
        self.pump()

    # -- limits ---------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Drop the revoked jobs the child holds but has not started (``_drop_revoked``); enforce the hard
        time limit and the load time limit."""
        self._drop_revoked()
        self._enforce_limits()

    def _enforce_limits(self) -> None:
        """Fail a job past ``GLYPHQ_TIME_LIMIT`` as Celery does (``Request.on_timeout``) and kill its child,
        which is stuck in it: the soft limit ends a job between two decode steps, in the child. Kill a
        child that has not loaded within ``GLYPHQ_MODEL_LOAD_TIMEOUT``."""
        now = time.monotonic()
        for child in list(self.children):
            if child.killed:
                continue
            if not child.ready and child.leaving is None and now - child.started_at > settings.model_load_timeout_s:
                log.error("killing child %d: not ready within %d s (GLYPHQ_MODEL_LOAD_TIMEOUT)", child.pid,
                          settings.model_load_timeout_s)
                child.kill()
                continue
            late = [h for h in self.handed.values() if h.child is child and h.started is not None
                    and not h.timed_out and now - h.started > settings.time_limit_s]
            if not late:
                continue
            for handed in late:
                handed.timed_out = True
                handed.request.on_timeout(False, settings.time_limit_s)
            log.error("killing child %d: %d job(s) past the hard time limit", child.pid, len(late))
            child.kill()

    def _drop_revoked(self) -> None:
        """A plain ``celery revoke`` (no terminate) of a job handed to the child that has not started
        it: Celery would discard a reserved job when it comes to run it, so the child drops it from
        its queue, as for a terminate (a job that starts meanwhile is dropped from its row)."""
        for handed in list(self.handed.values()):
            if handed.started is None and not handed.cancelling and private.is_revoked(handed.request.id):
                self.terminate(handed.request)

    def _maybe_start_successor(self, room: int) -> None:
        """Start the current child's successor once the ``room`` jobs it has left to end take
        ``GLYPHQ_RECYCLE_OVERLAP_S`` or less: at the pace of its latest ``PACE_JOBS`` results once it
        has that many (since it started, the pace would count the compile before its first job), else
        at its pace since it started, over ``PACE_MIN_S`` at least."""
        since, ended = self._paced
        current = self.current
        if (current is None or self.successor is not None or current.leaving not in (None, "tasks") or ended == 0
                or room <= 0 or settings.recycle_overlap_s <= 0 or self.stopping or self.shutting_down()):
            return
        if len(self._ends) == PACE_JOBS:
            pace = (PACE_JOBS - 1) / max(self._ends[-1] - self._ends[0], 1e-6)
        else:  # a child's first few results come in a burst: over less than PACE_MIN_S they overstate its pace
            pace = ended / max(time.monotonic() - since, PACE_MIN_S)
        if room / pace <= settings.recycle_overlap_s:
            self.successor = self._start_child(predecessor=current)

    # -- the worker stops -----------------------------------------------------------------------

    def finish(self, timeout: float | None = None) -> None:
        """On a warm shutdown, after :meth:`drain`: wait for the children to end the jobs they run (their
        reports acknowledge them), at most ``timeout`` seconds (the hard time limit and a margin), then
        kill what is left. A successor still loading has nothing to end and is killed at once."""
        self.drain()
        end = time.monotonic() + (settings.time_limit_s + FINISH_MARGIN_S if timeout is None else timeout)
        for child in list(self.children):
            if not child.ready:
                child.kill()
        while self.children and time.monotonic() < end:
            self._enforce_limits()
            watched = {child.sentinel: child for child in self.children}
            readable, _, _ = select.select(list(watched), [], [], min(WATCH_S, max(0.0, end - time.monotonic())))
            for child in list(self.children):
                self._read(child)
                if child.sentinel in readable:
                    self._exited(child)
        self.kill_all()
        self.release_waiting()

    def kill_all(self) -> None:
        """End every child now (a cold shutdown, or a warm one past its time)."""
        for child in list(self.children):
            child.kill()
        for child in list(self.children):
            with contextlib.suppress(OSError):
                select.select([child.sentinel], [], [], 5.0)
            self._exited(child)


def _lost_info(message: str) -> ExceptionInfo:
    try:
        raise WorkerLostError(message)
    except WorkerLostError:
        return ExceptionInfo()
