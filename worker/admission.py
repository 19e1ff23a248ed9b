"""Which queued jobs the GPU worker's child starts now, decided from plain figures: :func:`decide`.

The child (``tasks.serve``) describes the jobs it holds and has not started as :class:`Queued`, and its
running batch, its session locks and whether it stops as an :class:`EngineState`; :func:`decide` says
which jobs to start, in order, and why each other one stays queued (an :class:`Admission`). Nothing
here touches Redis, Celery or a model, so every rule can be tested alone; ``worker.continuous`` uses
:func:`room_for` for its own ``room_for``, so both count the free rows the same way.

The rules, in order, for each queued job, most urgent (lowest Redis priority) then oldest first:

1. A worker that drains, or a child that leaves on a memory guard, starts nothing (``STOPPING``).
2. Beside a job that runs alone (running now, or started alone by this decision) nothing starts
   (``ALONE``).
3. A job starts only if the batch has room for its priority (:func:`room_for`), counting the jobs this
   decision starts before it as waiting in the batch (``FULL``). A less urgent job never has more room
   than a more urgent one, so the jobs after one held so are held so too.
4. A job whose earlier run died with its child (``died_before``) starts only into an idle batch,
   counting the jobs this decision starts before it (``BUSY``), and then runs alone: it is the last
   job started, so a job that kills its child takes the jobs beside it down once at most.
5. A turn of a session starts only if it can take the session's lock: none of this child's jobs holds
   it (``sessions_here``, and the turns this decision starts before it), and no job elsewhere holds
   it, unless the lock names this very job (delivered again after its child died), which takes it
   back (``SESSION``). So of two queued turns of one session, one at most starts in a decision.

The caller carries the decision out in order: each job of ``start`` takes its session's lock first,
if it has one. A lock refused there (another job took it meanwhile, or Redis did not answer) means the
rest of the decision was made with one job too many: the caller records it in ``locked_elsewhere``
and decides again, after the jobs it has started joined the batch. A job that fails before it joins
the batch only makes the decision cautious; the next one sees the rows as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

#: Hold reasons: the worker stops; a job runs alone; no row for its priority; it waits for an idle
#: batch to run alone; another turn of its session holds the session's lock.
STOPPING = "stopping"
ALONE = "alone"
FULL = "full"
BUSY = "busy"
SESSION = "session"


@dataclass(frozen=True)
class Queued:
    """A job the child holds and has not started."""

    id: str
    priority: int  # Redis priority: 0 is most urgent, 9 least
    order: int  # arrival order in the child
    session: str | None  # the session it is a turn of, or None
    died_before: bool  # redelivered and an earlier run was counted: it must run alone


@dataclass(frozen=True)
class Rows:
    """The running batch as the next admission sees it (``worker.continuous.Continuous.snapshot``)."""

    free: int  # rows free now
    reserved: int  # rows kept for urgent jobs (GLYPHQ urgent slots)
    waiting_urgent: int  # jobs added to the batch but not yet given a row, urgent ones
    waiting_normal: int  # the same, the others
    urgent_priority: int  # a job of Redis priority <= this is urgent
    busy: bool  # any job is running or waiting in the batch

    def urgent(self, priority: int) -> bool:
        """Whether a job of ``priority`` may take the rows kept for urgent jobs."""
        return priority <= self.urgent_priority

    def joined(self, priority: int) -> Rows:
        """These rows once a job of ``priority`` is added to the batch: it waits there for a row."""
        if self.urgent(priority):
            return replace(self, waiting_urgent=self.waiting_urgent + 1, busy=True)
        return replace(self, waiting_normal=self.waiting_normal + 1, busy=True)


@dataclass(frozen=True)
class EngineState:
    """What the child's admission depends on besides its queued jobs."""

    rows: Rows
    alone: bool  # a job is running alone now: start nothing beside it
    sessions_here: frozenset[str]  # sessions whose turn lock a job of this child holds
    # session -> id of the job holding its lock elsewhere ("" when Redis did not answer), those not
    # yet due to be tried again
    locked_elsewhere: Mapping[str, str]
    stopping: bool  # the worker drains, or this child leaves on a memory guard: start nothing


@dataclass(frozen=True)
class Admission:
    """What to do with the queued jobs: ``start`` them in this order, ``hold`` the others, each with its
    reason (in the order they were considered); ``alone``: the job of ``start`` that runs alone (its last)."""

    start: tuple[Queued, ...]
    hold: tuple[tuple[Queued, str], ...]
    alone: Queued | None


def room_for(rows: Rows, priority: int) -> int:
    """How many more jobs of ``priority`` the batch's next iteration could start, after its waiting ones.

    The last ``reserved`` free rows take urgent jobs only: the waiting normal jobs take the other free
    rows first, the waiting urgent ones any of them."""
    urgent, normal = rows.waiting_urgent, rows.waiting_normal
    unkept = max(0, rows.free - rows.reserved)  # the free rows any job may take
    if rows.urgent(priority):
        return rows.free - urgent - min(normal, unkept)
    return unkept - normal - max(0, urgent - (rows.free - unkept))


def decide(queued: Sequence[Queued], state: EngineState) -> Admission:
    """Which of ``queued`` to start now and why the others wait; see the module docstring."""
    jobs = sorted(queued, key=lambda job: (job.priority, job.order))
    if state.stopping:
        return Admission((), tuple((job, STOPPING) for job in jobs), None)
    rows = state.rows
    locked = set(state.sessions_here)
    start: list[Queued] = []
    hold: list[tuple[Queued, str]] = []
    alone: Queued | None = None
    for job in jobs:
        reason = _held(job, rows, locked, state.locked_elsewhere, state.alone or alone is not None)
        if reason is not None:
            hold.append((job, reason))
            continue
        start.append(job)
        rows = rows.joined(job.priority)
        if job.session is not None:
            locked.add(job.session)
        if job.died_before:
            alone = job
    return Admission(tuple(start), tuple(hold), alone)


def _held(job: Queued, rows: Rows, locked: set[str], elsewhere: Mapping[str, str], alone: bool) -> str | None:
    """Why ``job`` cannot start now, or None if it can."""
    if alone:
        return ALONE
    if room_for(rows, job.priority) <= 0:
        return FULL
    if job.died_before and rows.busy:
        return BUSY
    if job.session is not None:
        holder = elsewhere.get(job.session)
        if job.session in locked or (holder is not None and holder != job.id):
            return SESSION
    return None
