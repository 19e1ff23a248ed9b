"""The GPU worker's scheduler (``tasks.scheduler``), driven without a Celery worker: a fake event loop and clock,
fake engine children and fake Celery requests. What each child is handed and when, how each report is answered,
and what happens when a child dies, a job is revoked, the broker connection is lost, a time limit passes, a
successor takes over or the worker stops.

Each fake child's channel is a real ``tasks.channel.Channel``: the test plays the child's side of its pipes, and its
sentinel is the read end of a pipe that the "child" closes when it exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError

from glyphq.celeryconfig import settings
from glyphq.producer.errors import InvalidJob
from glyphq.tasks import private, scheduler
from glyphq.tasks.channel import Channel, encode
from glyphq.tasks.messages import job_message
from glyphq.tasks.scheduler import RESTART_DELAY_S, WATCH_S, Scheduler, reserved_jobs
from glyphq.worker import status

LAST = {"control": "last"}


class Clock:
    """``time.monotonic`` as the scheduler reads it, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeLoop:
    """The scheduler's :class:`~glyphq.tasks.scheduler.Loop`: records readers, writers and timers; the test fires a
    reader or writer and moves the clock, which runs the timers that are due."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.timers: list[list[Any]] = []  # [due, callback, interval or None]

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback

    def remove_writer(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timers.append([self.clock.now + seconds, callback, None])

    def call_repeatedly(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timers.append([self.clock.now + seconds, callback, seconds])

    def fire(self, fd: int) -> None:
        self.readers[fd]()

    def fire_writer(self, fd: int) -> None:
        self.writers[fd]()

    def advance(self, seconds: float) -> None:
        """Move the clock, then run every timer due (a repeating one once, however far the clock moved)."""
        self.clock.now += seconds
        while due := [timer for timer in self.timers if timer[0] <= self.clock.now]:
            timer = min(due, key=lambda t: t[0])
            if timer[2] is None:
                self.timers.remove(timer)
            else:
                timer[0] = self.clock.now + timer[2]
            timer[1]()


class FakeChild:
    """An engine child as the scheduler sees it (``EngineProcess``'s attributes), played by the test."""

    def __init__(self, number: int, predecessor: int | None, buckets: Sequence[Any], clock: Clock) -> None:
        self.number = number
        self.predecessor = predecessor
        self.buckets = list(buckets)
        self.channel = Channel()
        self.sentinel, self._sentinel_w = os.pipe()
        self.started_at = 0.0
        self.ready = False
        self.last_sent = False
        self.leaving: str | None = None
        self.killed = False
        self.status: dict[str, Any] = {}
        self.pid = 40000 + number
        self.kills = 0
        self.exit_on_kill = True  # False: a kill that has not landed yet
        self.started = False
        self.exited = False  # the test closed the child's ends: its pipes read to their end, its sentinel fires
        self.closed = False  # the scheduler closed the main process's ends
        self._code: int | None = None
        self._clock = clock

    # -- what the scheduler calls -------------------------------------------------------------------

    def start(self) -> None:
        self.started = True
        self.started_at = self._clock.now

    def exitcode(self) -> int | None:
        return self._code

    def kill(self) -> None:
        self.killed = True
        self.kills += 1
        if self.exit_on_kill and not self.exited:
            self.exit(-signal.SIGKILL)

    def close(self) -> None:
        assert self.exited, "the scheduler closes a child only once it has exited"
        self.channel.close()
        os.close(self.sentinel)
        self.closed = True

    # -- the child's side, played by the test --------------------------------------------------------

    def take(self) -> list[dict[str, Any]]:
        """The frames handed over since the last call."""
        return self.channel.receive()

    def write(self, event: str, **fields: Any) -> None:
        self.channel.report({"event": event, **fields})

    def exit(self, code: int) -> None:
        """Exit: the child's ends of its pipes close, and its sentinel becomes readable."""
        assert not self.exited
        self.exited = True
        self._code = code
        for fd in (self.channel.jobs_r, self.channel.reports_w, self._sentinel_w):
            os.close(fd)

    def dispose(self) -> None:
        """At the end of a test: close every fd the scheduler or the test has not closed."""
        if not self.exited:
            self.exit(0)
        if not self.closed:
            self.close()


class FakeBackend:
    def __init__(self) -> None:
        self.revoked: list[tuple[str, str, bool]] = []
        self.failures: list[tuple[str, BaseException]] = []

    def mark_as_revoked(self, task_id: str, reason: str, request: Any = None, store_result: bool = True) -> None:
        assert request is not None and request.id == task_id
        self.revoked.append((task_id, reason, store_result))

    def mark_as_failure(self, task_id: str, exc: BaseException, request: Any = None) -> None:
        self.failures.append((task_id, exc))


class FakeTask:
    """A request's task: its name and result backend (hashable, as Celery's signals need their sender)."""

    name = "glyphq.answer"

    def __init__(self) -> None:
        self.backend = FakeBackend()


class FakeRequest:
    """What the scheduler calls on a Celery request; records every call in :attr:`calls`."""

    name = "glyphq.answer"
    hostname = "celery@test"

    def __init__(self, task_id: str, priority: int, revoked_ids: set[str], args: Any = None, kwargs: Any = None):
        self.id = task_id
        self.args = [] if args is None else args
        self.kwargs = {"job": {"question": f"question of {task_id}"}} if kwargs is None else kwargs
        self.delivery_info = {"priority": priority, "routing_key": "gpu", "redelivered": False}
        self.task = FakeTask()
        self.calls: list[tuple[Any, ...]] = []
        self._revoked_ids = revoked_ids

    def revoked(self) -> bool:
        """As Celery's: True (and the request announced revoked) if its id is in the worker's revoked set."""
        if self.id in self._revoked_ids:
            self.calls.append(("revoked",))
            return True
        return False

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.calls.append(("on_accepted", pid))

    def acknowledge(self) -> None:
        self.calls.append(("acknowledge",))

    def reject(self, requeue: bool = False) -> None:
        self.calls.append(("reject", requeue))

    def send_event(self, type_: str, **fields: Any) -> None:
        self.calls.append(("event", type_, fields))

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        self.calls.append(("on_failure", exc_info.type))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        self.calls.append(("on_timeout", soft, timeout))

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def events(self) -> list[str]:
        return [call[1] for call in self.calls if call[0] == "event"]


class FakeConsumer:
    """Celery's consumer as the scheduler sees it: a reconnect gives it a new ``connection``."""

    def __init__(self) -> None:
        self.connection = object()


class World:
    """A scheduler with its fakes, and the calls it made to ``tasks.private``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.clock = Clock()
        self.loop = FakeLoop(self.clock)
        self.children: list[FakeChild] = []
        self.made: list[tuple[int, int | None, list[Any]]] = []  # new_child's arguments
        self.done: list[tuple[str, bool]] = []  # private.request_done
        self.reserved: list[str] = []  # private.request_reserved: the message comes back from Redis
        self.revoked: set[str] = set()  # the worker's revoked set
        self.shutting_down = False
        monkeypatch.setattr(scheduler, "time", types.SimpleNamespace(monotonic=self.clock.monotonic))
        monkeypatch.setattr(private, "request_done", lambda request, successful: self.done.append((request.id,
                                                                                                   successful)))
        monkeypatch.setattr(private, "request_reserved", lambda request: self.reserved.append(request.id))
        monkeypatch.setattr(private, "is_revoked", lambda task_id: task_id in self.revoked)
        monkeypatch.setattr(status, "_status", {})
        self.configure()

    def configure(self, **fields: Any) -> None:
        defaults: dict[str, Any] = {"max_batch": 4, "max_tasks_per_child": 100, "recycle_overlap_s": 0,
                                    "time_limit_s": 360, "model_load_timeout_s": 600}
        self.monkeypatch.setattr(scheduler, "settings", dataclasses.replace(settings, **{**defaults, **fields}))

    def scheduler(self, **fields: Any) -> Scheduler:
        self.configure(**fields)
        return Scheduler(self.loop, new_child=self._new_child, shutting_down=lambda: self.shutting_down)

    def _new_child(self, number: int, predecessor: int | None, buckets: Sequence[Any]) -> FakeChild:
        child = FakeChild(number, predecessor, buckets, self.clock)
        self.made.append((number, predecessor, list(buckets)))
        self.children.append(child)
        return child

    def ready_child(self, sched: Scheduler) -> FakeChild:
        """Start the first child and have it report ready."""
        sched.start()
        return self.ready(self.children[-1])

    def ready(self, child: FakeChild) -> FakeChild:
        """The child reports ready (loaded, or for a successor: took over)."""
        self.report(child, "ready", pid=child.pid)
        return child

    def add(self, sched: Scheduler, *task_ids: str) -> list[FakeRequest]:
        """Requests of ``task_ids`` (priority 5), each given to the scheduler in turn."""
        requests = [self.request(task_id) for task_id in task_ids]
        for request in requests:
            sched.add(request)
        return requests

    def request(self, task_id: str, priority: int = 5, **fields: Any) -> FakeRequest:
        return FakeRequest(task_id, priority, self.revoked, **fields)

    def report(self, child: FakeChild, event: str, **fields: Any) -> None:
        """The child reports, and the event loop finds its reports pipe readable."""
        child.write(event, **fields)
        self.loop.fire(child.channel.reports_r)

    def succeed(self, child: FakeChild, task_id: str, fits: bool = False) -> None:
        self.report(child, "started", id=task_id, pid=child.pid)
        self.report(child, "succeeded", id=task_id, runtime=1.5, exception=None, successor_fits=fits)

    def exit(self, child: FakeChild, code: int) -> None:
        """The child exits (if it has not already), and the event loop finds its sentinel readable."""
        if not child.exited:
            child.exit(code)
        self.loop.fire(child.sentinel)

    def close(self) -> None:
        watched_ok = watches_only_live_children(self)
        for child in self.children:
            child.dispose()
        assert watched_ok, "the event loop still watches an fd of a child the scheduler closed"


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = World(monkeypatch)
    yield w
    w.close()


def ids(frames: list[dict[str, Any]]) -> list[str]:
    """The ids of the jobs among ``frames`` (not the control frames)."""
    return [frame["id"] for frame in frames if "control" not in frame]


def frame(request: FakeRequest) -> dict[str, Any]:
    """The frame a child reads for ``request``."""
    return json.loads(encode(job_message(request)))


def watches_only_live_children(world: World) -> bool:
    """Whether every fd the event loop watches is one of a child the scheduler has not closed."""
    live: set[int] = set()
    for child in world.children:
        if not child.closed:
            live |= {child.sentinel, child.channel.reports_r, child.channel.jobs_w}
    return set(world.loop.readers) | set(world.loop.writers) <= live


# -- 1. hand-out --------------------------------------------------------------------------------------


def test_jobs_are_handed_most_urgent_then_oldest_at_most_reserved_jobs_at_once_and_none_before_ready(world):
    sched = world.scheduler(max_batch=4)
    assert reserved_jobs(4) == 5
    sched.start()
    child = world.children[0]
    for task_id, priority in [("a", 5), ("b", 0), ("c", 9), ("d", 0), ("e", 5), ("f", 3), ("g", 0)]:
        sched.add(world.request(task_id, priority))
    assert child.take() == [], "a child still loading is handed nothing"

    world.ready(child)
    frames = child.take()
    assert ids(frames) == ["b", "d", "g", "f", "a"]
    assert frames[0]["task"] == "glyphq.answer" and frames[0]["priority"] == 0
    assert frames[0]["kwargs"] == {"job": {"question": "question of b"}}
    assert [item[2].id for item in sched.waiting] == ["e", "c"]

    sched.add(world.request("h", 1))  # more urgent than what waits, but no room yet
    assert child.take() == []
    world.succeed(child, "b")
    assert ids(child.take()) == ["h"]
    world.succeed(child, "d")
    assert ids(child.take()) == ["e"]
    assert [item[2].id for item in sched.waiting] == ["c"]


def test_a_request_revoked_while_it_waited_is_not_handed(world):
    sched = world.scheduler()
    sched.start()
    child = world.children[0]
    revoked, kept = world.add(sched, "revoked", "kept")
    world.revoked.add("revoked")
    world.ready(child)
    assert ids(child.take()) == ["kept"]
    assert revoked.calls == [("revoked",)], "Celery's Request.revoked announces it"


def test_a_job_too_large_or_with_malformed_arguments_is_refused_alone(world):
    sched = world.scheduler(max_message_bytes=2000)
    child = world.ready_child(sched)
    big = world.request("big", kwargs={"job": {"question": "x" * 5000}})
    bad_args = world.request("bad-args", args="not a list")
    bad_kwargs = world.request("bad-kwargs", kwargs=["not", "an", "object"])
    fine = world.request("fine")
    for request in (big, bad_args, fine, bad_kwargs):
        sched.add(request)

    assert ids(child.take()) == ["fine"]
    assert set(sched.handed) == {"fine"} and sched.waiting == []
    for request, field in ((big, "message"), (bad_args, "args"), (bad_kwargs, "kwargs")):
        [(task_id, exc)] = request.task.backend.failures
        assert task_id == request.id and isinstance(exc, InvalidJob) and exc.field == field
        assert request.names() == ["acknowledge", "event"]
        assert request.events() == ["task-failed"]
        assert (request.id, False) in world.done
    assert fine.calls == []


def test_the_main_process_never_waits_for_room_in_the_jobs_pipe(world):
    sched = world.scheduler(max_batch=8)  # 10 jobs of about 20 KiB: more than a 64 KiB pipe holds
    child = world.ready_child(sched)
    for i in range(reserved_jobs(8)):
        sched.add(world.request(f"j{i}", kwargs={"job": {"question": "q" * 20_000}}))
    assert child.channel.jobs_w in world.loop.writers, "what did not fit waits for the pipe to be writable"
    received = child.take()
    world.loop.fire_writer(child.channel.jobs_w)
    received += child.take()
    for _ in range(100):
        if child.channel.jobs_w not in world.loop.writers:
            break
        world.loop.fire_writer(child.channel.jobs_w)
        received += child.take()
    assert ids(received) == [f"j{i}" for i in range(reserved_jobs(8))]


# -- 2. the per-child budget ------------------------------------------------------------------------


def test_a_child_is_handed_max_tasks_per_child_jobs_then_last_and_the_rest_wait_for_the_next_child(world):
    sched = world.scheduler(max_batch=8, max_tasks_per_child=3)
    first = world.ready_child(sched)
    for i in range(5):
        sched.add(world.request(f"j{i}"))
    frames = first.take()
    assert ids(frames) == ["j0", "j1", "j2"]
    assert frames[-1] == LAST
    assert first.last_sent and first.leaving == "tasks"
    assert sched.recycles_by_reason == {"tasks": 1}

    sched.add(world.request("j5"))
    for task_id in ("j0", "j1", "j2"):
        world.succeed(first, task_id)
    assert first.take() == [], "nothing more after last"
    assert len(world.children) == 1

    world.report(first, "leaving", reason="tasks")
    world.exit(first, 0)
    assert world.made == [(1, None, []), (2, None, [])], "the next child starts at once"
    second = world.children[1]
    assert second.take() == []
    world.ready(second)
    frames = second.take()
    assert ids(frames) == ["j3", "j4", "j5"] and frames[-1] == LAST
    assert sched.current is second


def test_a_job_revoked_before_it_started_gives_its_slot_back(world):
    sched = world.scheduler(max_batch=1, max_tasks_per_child=2)  # one handed at a time
    child = world.ready_child(sched)
    a, b, c = (world.request(task_id) for task_id in "abc")
    for request in (a, b, c):
        sched.add(request)
    assert ids(child.take()) == ["a"]

    assert sched.terminate(a)
    assert child.take() == [{"control": "cancel", "id": "a"}]
    world.report(child, "revoked", id="a")
    assert ids(child.take()) == ["b"]
    world.succeed(child, "b")
    frames = child.take()
    assert ids(frames) == ["c"] and frames[-1] == LAST, "a did not count towards the child's two jobs"


# -- 3. job reports -------------------------------------------------------------------------------


def test_started_and_ended_reports_are_answered_through_celery(world):
    sched = world.scheduler(max_batch=8)
    child = world.ready_child(sched)
    requests = {task_id: world.request(task_id) for task_id in ("ok", "bad", "unstored", "dup")}
    for request in requests.values():
        sched.add(request)
    child.take()

    world.report(child, "started", id="ok", pid=child.pid)
    assert requests["ok"].calls == [("on_accepted", child.pid)]
    world.report(child, "succeeded", id="ok", runtime=1.25, exception=None, successor_fits=False)
    assert requests["ok"].calls[1:] == [("acknowledge",),
                                        ("event", "task-succeeded", {"result": "(stored)", "runtime": 1.25})]

    world.report(child, "started", id="bad", pid=child.pid)
    world.report(child, "failed", id="bad", runtime=0.5, exception="ValueError('no')", successor_fits=False)
    assert requests["bad"].calls[1:] == [("acknowledge",), ("event", "task-failed", {"exception": "ValueError('no')"})]

    world.report(child, "started", id="unstored", pid=child.pid)
    world.report(child, "unstored", id="unstored")
    assert requests["unstored"].calls[1:] == [("reject", True)], "not acknowledged: Redis delivers it again"

    world.report(child, "duplicate", id="dup")
    assert requests["dup"].calls == [("acknowledge",)]

    assert world.done == [("ok", True), ("bad", False), ("unstored", False), ("dup", True)]
    assert sched.handed == {}

    world.report(child, "succeeded", id="ok", runtime=1.0, exception=None, successor_fits=False)
    world.report(child, "started", id="nobody", pid=child.pid)
    assert len(requests["ok"].calls) == 3, "a report for a job it no longer holds is ignored"


# -- 4. a child dies ----------------------------------------------------------------------------------


def test_a_child_that_dies_before_it_is_ready_is_started_again_after_a_delay(world):
    sched = world.scheduler()
    sched.start()
    first = world.children[0]
    sched.add(world.request("a"))
    world.exit(first, 1)
    assert first.closed and watches_only_live_children(world)
    assert len(world.children) == 1, "not at once: a broken device would start one child after another"

    world.loop.advance(RESTART_DELAY_S / 2)
    assert len(world.children) == 1
    world.loop.advance(RESTART_DELAY_S / 2)
    assert world.made == [(1, None, []), (2, None, [])]
    second = world.children[1]
    world.ready(second)
    assert ids(second.take()) == ["a"]


def test_the_jobs_a_dead_child_had_not_started_go_to_the_next_child(world):
    sched = world.scheduler()
    first = world.ready_child(sched)
    a, b = world.add(sched, "a", "b")
    assert ids(first.take()) == ["a", "b"]
    world.exit(first, -signal.SIGKILL)
    assert a.calls == [] and b.calls == []
    assert len(world.children) == 2, "a child that was ready is replaced at once"

    sched.add(world.request("c"))  # arrived later, same priority: goes after them
    second = world.children[1]
    world.ready(second)
    assert ids(second.take()) == ["a", "b", "c"]


def test_the_jobs_a_dead_child_had_started_fail_with_worker_lost(world):
    sched = world.scheduler()
    first = world.ready_child(sched)
    a, b = world.add(sched, "a", "b")
    first.take()
    world.report(first, "started", id="a", pid=first.pid)
    world.exit(first, -signal.SIGSEGV)
    assert a.calls == [("on_accepted", first.pid), ("on_failure", WorkerLostError)]
    assert b.calls == []
    second = world.children[1]
    world.ready(second)
    assert ids(second.take()) == ["b"]


def test_a_child_that_left_is_replaced_at_once_and_nothing_fails(world):
    sched = world.scheduler(max_tasks_per_child=1)
    first = world.ready_child(sched)
    a, b = world.add(sched, "a", "b")
    assert first.take() == [frame(a), LAST]
    world.succeed(first, "a")
    world.report(first, "leaving", reason="tasks")
    world.exit(first, 0)
    assert first.closed and watches_only_live_children(world)
    assert world.made == [(1, None, []), (2, None, [])]
    assert [timer for timer in world.loop.timers if timer[2] is None] == [], "no delayed restart"
    assert a.names() == ["on_accepted", "acknowledge", "event"] and b.calls == []
    second = world.children[1]
    world.ready(second)
    assert ids(second.take()) == ["b"]


def test_reports_written_just_before_a_child_exits_are_still_handled(world):
    sched = world.scheduler()
    first = world.ready_child(sched)
    a, b, c = world.request("a"), world.request("b"), world.request("c")
    for request in (a, b, c):
        sched.add(request)
    first.take()
    # Written, but the event loop sees the sentinel before the reports pipe.
    first.write("started", id="a", pid=first.pid)
    first.write("succeeded", id="a", runtime=2.0, exception=None, successor_fits=False)
    first.write("started", id="b", pid=first.pid)
    world.exit(first, -signal.SIGKILL)
    assert a.names() == ["on_accepted", "acknowledge", "event"] and a.events() == ["task-succeeded"]
    assert b.calls == [("on_accepted", first.pid), ("on_failure", WorkerLostError)]
    assert c.calls == []
    assert watches_only_live_children(world)
    assert sched.handed == {} and [item[2].id for item in sched.waiting] == ["c"]


# -- 5. revoke and terminate --------------------------------------------------------------------------


def assert_announced_revoked(world: World, request: FakeRequest) -> None:
    """``request`` was announced revoked by the scheduler (its last calls), as Celery's ``Request.revoked`` does."""
    assert request.calls[-2:] == [("acknowledge",), ("event", "task-revoked", {"terminated": True, "signum": None,
                                                                                "expired": False})]
    assert request.task.backend.revoked == [(request.id, "terminated", True)]
    assert (request.id, False) in world.done


def test_terminate_of_a_waiting_request_announces_it_revoked_at_once(world):
    sched = world.scheduler()
    sched.start()
    child = world.children[0]
    a, b = world.add(sched, "a", "b")
    assert sched.terminate(a)
    assert a.names() == ["acknowledge", "event"]
    assert_announced_revoked(world, a)
    world.ready(child)
    assert ids(child.take()) == ["b"]
    assert not sched.terminate(world.request("unknown")), "a request it does not hold is Celery's to terminate"


def test_terminate_of_a_handed_job_sends_cancel_and_the_revoked_report_announces_it(world):
    sched = world.scheduler()
    child = world.ready_child(sched)
    a, b = world.add(sched, "a", "b")
    child.take()
    world.report(child, "started", id="a", pid=child.pid)
    assert sched.terminate(a)
    assert sched.terminate(a)
    assert child.take() == [{"control": "cancel", "id": "a"}], "one cancel frame"
    assert a.calls == [("on_accepted", child.pid)], "announced once the child dropped it"
    world.report(child, "revoked", id="a")
    assert a.names() == ["on_accepted", "acknowledge", "event"]
    assert_announced_revoked(world, a)
    assert set(sched.handed) == {"b"} and b.calls == []


def test_a_job_cancelled_too_late_keeps_its_outcome(world):
    sched = world.scheduler()
    child = world.ready_child(sched)
    a = world.request("a")
    sched.add(a)
    child.take()
    world.report(child, "started", id="a", pid=child.pid)
    sched.terminate(a)
    world.report(child, "succeeded", id="a", runtime=1.0, exception=None, successor_fits=False)
    assert a.events() == ["task-succeeded"] and a.task.backend.revoked == []


def test_a_plain_revoke_of_a_handed_job_not_started_is_dropped_by_the_watch(world):
    sched = world.scheduler()
    child = world.ready_child(sched)
    a, b, c = world.request("a"), world.request("b"), world.request("c")
    for request in (a, b, c):
        sched.add(request)
    child.take()
    world.report(child, "started", id="b", pid=child.pid)
    world.revoked.update({"a", "b"})  # celery revoke, no --terminate
    world.loop.advance(WATCH_S)
    assert child.take() == [{"control": "cancel", "id": "a"}], "b has started: Celery would not stop it either"
    world.loop.advance(WATCH_S)
    assert child.take() == [], "asked once"
    world.report(child, "revoked", id="a")
    assert a.calls == [("revoked",)], "Celery's Request.revoked announces a job in the revoked set"
    assert set(sched.handed) == {"b", "c"}


# -- 6. a lost broker connection ----------------------------------------------------------------------


def test_a_lost_connection_kills_the_child_once_and_its_jobs_come_back_from_redis(world):
    sched = world.scheduler(max_batch=2)  # two handed, the rest wait
    consumer = FakeConsumer()
    sched.attach(consumer)
    first = world.ready_child(sched)
    a, b, c = world.request("a"), world.request("b"), world.request("c")
    for request in (a, b, c):
        sched.add(request)
    assert ids(first.take()) == ["a", "b"]
    world.report(first, "started", id="a", pid=first.pid)
    world.report(first, "started", id="b", pid=first.pid)

    assert sched.cancel(a) and sched.cancel(b)
    assert first.kills == 1, "one kill for the child of both"
    assert not sched.cancel(c), "a request it has not handed is not cancelled here"

    consumer.connection = object()  # Celery reconnects
    sched.attach(consumer)
    assert world.reserved == ["c"] and sched.waiting == []
    world.exit(first, -signal.SIGKILL)
    assert sorted(world.reserved) == ["a", "b", "c"]
    for request in (a, b, c):
        assert "on_failure" not in request.names() and "acknowledge" not in request.names()

    second = world.children[1]
    world.ready(second)
    assert second.take() == []
    sched.add(world.request("d"))
    assert ids(second.take()) == ["d"]


def test_requests_of_a_lost_connection_are_not_handed(world):
    sched = world.scheduler(max_batch=1)
    consumer = FakeConsumer()
    sched.attach(consumer)
    sched.start()
    child = world.children[0]
    sched.add(world.request("a"))
    consumer.connection = object()
    world.ready(child)
    assert child.take() == [] and world.reserved == ["a"]


# -- 7. time limits -------------------------------------------------------------------------------


def test_a_job_past_the_hard_time_limit_times_out_and_its_child_is_killed(world):
    sched = world.scheduler(time_limit_s=60)
    first = world.ready_child(sched)
    a, b, c = world.request("a"), world.request("b"), world.request("c")
    for request in (a, b, c):
        sched.add(request)
    first.take()
    world.report(first, "started", id="a", pid=first.pid)
    world.loop.advance(30)
    world.report(first, "started", id="b", pid=first.pid)
    world.loop.advance(29)
    assert first.kills == 0
    world.loop.advance(2)  # a at 61 s, b at 31 s
    assert a.calls == [("on_accepted", first.pid), ("on_timeout", False, 60)]
    assert first.kills == 1

    world.exit(first, -signal.SIGKILL)
    assert a.calls[-1] == ("on_timeout", False, 60), "failed once, by its time limit"
    assert b.calls == [("on_accepted", first.pid), ("on_failure", WorkerLostError)]
    second = world.children[1]
    world.ready(second)
    assert ids(second.take()) == ["c"]


def test_a_report_of_a_job_past_its_time_limit_is_ignored(world):
    """It failed with ``on_timeout`` already (stored, acknowledged, task-failed sent)."""
    sched = world.scheduler(time_limit_s=60)
    first = world.ready_child(sched)
    a = world.request("a")
    sched.add(a)
    first.take()
    world.report(first, "started", id="a", pid=first.pid)
    first.exit_on_kill = False
    world.loop.advance(61)
    assert a.calls[-1] == ("on_timeout", False, 60)
    world.report(first, "succeeded", id="a", runtime=61.0, exception=None, successor_fits=False)
    assert a.calls == [("on_accepted", first.pid), ("on_timeout", False, 60)]
    assert world.done == []


def test_a_child_not_ready_within_the_load_time_limit_is_killed(world):
    sched = world.scheduler(model_load_timeout_s=100)
    sched.start()
    first = world.children[0]
    world.loop.advance(100)
    assert first.kills == 0
    world.loop.advance(1)
    assert first.kills == 1
    world.exit(first, -signal.SIGKILL)
    world.loop.advance(RESTART_DELAY_S)
    assert len(world.children) == 2
    second = world.children[1]
    world.ready(second)
    world.loop.advance(1000)
    assert second.kills == 0, "a ready child has no load time limit"


# -- 8. the successor ---------------------------------------------------------------------------------


def test_a_successor_loads_beside_the_current_child_and_takes_over_when_ready(world):
    sched = world.scheduler(max_batch=4, recycle_overlap_s=10**6)
    first = world.ready_child(sched)
    world.report(first, "status", fields={"decode_buckets": [[4, 256], [8, 512]]})
    for i in range(3):
        sched.add(world.request(f"j{i}"))
    first.take()
    world.loop.advance(2)
    world.succeed(first, "j0", fits=False)
    assert len(world.children) == 1, "not before the child says a successor fits beside it"
    world.succeed(first, "j1", fits=True)
    assert world.made[1] == (2, first.pid, [(4, 256), (8, 512)])
    second = world.children[1]
    assert second.started and sched.successor is second and sched.current is first

    sched.add(world.request("j3"))
    assert second.take() == [], "no job before it is ready"
    assert ids(first.take()) == ["j3"]
    world.succeed(first, "j2", fits=True)
    assert len(world.children) == 2, "one successor"

    world.ready(second)
    assert sched.current is second and sched.successor is None
    assert first.take() == [LAST], "the predecessor, still running, is handed nothing more"
    assert first.leaving == "tasks" and sched.recycles_by_reason == {"tasks": 1}
    sched.add(world.request("j4"))
    assert ids(second.take()) == ["j4"]

    world.succeed(first, "j3")
    world.report(first, "leaving", reason="tasks")
    world.exit(first, 0)
    assert len(world.children) == 2 and sched.current is second


def test_a_successor_is_told_only_the_well_formed_decode_steps_its_predecessor_published(world):
    """``decode_buckets`` crosses the child's channel: whatever it holds, the main process starts the
    successor with the pairs of positive integers in it, and raises nothing."""
    sched = world.scheduler(max_batch=4, recycle_overlap_s=10**6)
    first = world.ready_child(sched)
    world.report(first, "status", fields={"decode_buckets": [[4, 256], "x", [1], [2, -3], [True, 8], [1, 2.5],
                                                             None, [2, 512, 1], [8, 1024]]})
    world.add(sched, "a", "b")
    first.take()
    world.loop.advance(2)
    world.succeed(first, "a", fits=True)
    assert world.made[1] == (2, first.pid, [(4, 256), (8, 1024)])


def test_a_successor_starts_once_the_jobs_left_take_the_overlap_or_less(world):
    sched = world.scheduler(max_batch=1, max_tasks_per_child=4, recycle_overlap_s=250)
    first = world.ready_child(sched)
    for i in range(6):
        sched.add(world.request(f"j{i}"))
    for i in range(2):
        assert ids(first.take()) == [f"j{i}"]
        world.loop.advance(100)  # one job each 100 s
        world.succeed(first, f"j{i}", fits=True)
        if i == 0:
            assert len(world.children) == 1, "three jobs left: 300 s"
    assert world.made[1] == (2, first.pid, []), "two jobs left: 200 s"
    second = world.children[1]

    frames = first.take()
    assert ids(frames) == ["j2"]
    world.succeed(first, "j2", fits=True)
    assert first.take() == [frame(world.request("j3")), LAST]
    world.succeed(first, "j3", fits=True)
    world.report(first, "leaving", reason="tasks")
    world.exit(first, 0)
    assert len(world.children) == 2, "the successor takes over: no other child"
    assert second.take() == []
    world.ready(second)
    assert ids(second.take()) == ["j4"]


def test_without_overlap_no_successor_starts_before_the_current_child_has_left(world):
    sched = world.scheduler(max_batch=4, max_tasks_per_child=2, recycle_overlap_s=0)
    first = world.ready_child(sched)
    for i in range(3):
        sched.add(world.request(f"j{i}"))
    assert first.take()[-1] == LAST
    world.succeed(first, "j0", fits=True)
    world.succeed(first, "j1", fits=True)
    assert len(world.children) == 1
    world.report(first, "leaving", reason="tasks")
    world.exit(first, 0)
    assert world.made == [(1, None, []), (2, None, [])]


def test_a_child_a_memory_guard_replaces_gets_no_successor_beside_it(world):
    sched = world.scheduler(max_batch=4, recycle_overlap_s=10**6)
    first = world.ready_child(sched)
    sched.add(world.request("a"))
    first.take()
    world.report(first, "recycle", reason="rss", detail="rss 30 GiB over 28 GiB")
    assert sched.recycles_by_reason == {"rss": 1}
    assert first.leaving == "rss" and first.last_sent
    sched.add(world.request("b"))
    assert first.take() == [], "handed nothing more (its guard stops it, no last frame needed)"
    world.loop.advance(1)
    world.succeed(first, "a", fits=True)
    assert len(world.children) == 1, "a successor beside it would add to what it holds"

    world.report(first, "leaving", reason="rss")
    world.exit(first, 0)
    assert world.made == [(1, None, []), (2, None, [])]
    assert sched.recycles_by_reason == {"rss": 1}
    second = world.children[1]
    world.ready(second)
    assert ids(second.take()) == ["b"]


# -- 9. the worker stops ------------------------------------------------------------------------------


def test_after_drain_nothing_is_handed_every_child_drains_and_kill_all_kills_every_child(world):
    sched = world.scheduler(max_batch=4, recycle_overlap_s=10**6)
    first = world.ready_child(sched)
    a, b = world.add(sched, "a", "b")
    first.take()
    world.report(first, "started", id="a", pid=first.pid)
    world.loop.advance(1)
    world.succeed(first, "b", fits=True)
    second = world.children[1]

    sched.drain()
    assert first.channel.draining() and second.channel.draining()
    sched.add(world.request("c"))
    assert first.take() == [] and second.take() == []

    world.shutting_down = True
    sched.kill_all()
    assert first.kills == 1 and second.kills == 1
    assert sched.children == [] and first.closed and second.closed
    assert watches_only_live_children(world)
    assert a.calls[-1] == ("on_failure", WorkerLostError)
    assert len(world.children) == 2, "no child is started as the worker stops"


def test_finish_waits_for_the_children_to_end_their_jobs_and_kills_a_successor_still_loading(world):
    sched = world.scheduler(max_batch=1, recycle_overlap_s=10**6)
    first = world.ready_child(sched)
    a, b, c = world.request("a"), world.request("b"), world.request("c")
    for request in (a, b, c):
        sched.add(request)
    first.take()
    world.loop.advance(1)
    world.succeed(first, "a", fits=True)
    second = world.children[1]
    first.take()
    world.report(first, "started", id="b", pid=first.pid)

    # The child ends the job it runs and leaves (it sees the draining flag).
    first.write("succeeded", id="b", runtime=1.0, exception=None, successor_fits=True)
    first.write("leaving", reason="drain")
    first.exit(0)
    sched.finish()
    assert second.kills == 1 and first.kills == 0
    assert b.names() == ["on_accepted", "acknowledge", "event"]
    assert sched.children == [] and first.closed and second.closed
    assert world.reserved == ["c"], "what waits comes back from Redis"
    assert len(world.children) == 2


def test_finish_kills_what_is_left_when_its_time_is_up(world):
    sched = world.scheduler()
    first = world.ready_child(sched)
    a = world.request("a")
    sched.add(a)
    first.take()
    world.report(first, "started", id="a", pid=first.pid)
    sched.finish(timeout=0)
    assert first.kills == 1 and sched.children == []
    assert a.calls[-1] == ("on_failure", WorkerLostError)


# -- 10. the model cannot load ------------------------------------------------------------------------


def test_a_model_error_stops_the_worker_and_the_jobs_stay_queued(world, monkeypatch):
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(scheduler.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    sched = world.scheduler()
    sched.start()
    child = world.children[0]
    a = world.request("a")
    sched.add(a)
    world.report(child, "model_error", error="some/model: OSError: no such file")
    assert status.read()["model_error"] == "some/model: OSError: no such file"
    assert sent == [(os.getpid(), signal.SIGTERM)]
    assert sched.stopping
    world.exit(child, 3)
    world.loop.advance(10 * RESTART_DELAY_S)
    assert len(world.children) == 1, "no child is started again"
    assert a.calls == [] and world.reserved == []
