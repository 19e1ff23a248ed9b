"""Which queued jobs the GPU worker's child starts (``worker.admission``): pure decisions, one rule a test.

A job's Redis priority 0 is the most urgent; in these tests only priority 0 may take the kept rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glyphq.worker.admission import (
    ALONE,
    BUSY,
    FULL,
    SESSION,
    STOPPING,
    Admission,
    EngineState,
    Queued,
    Rows,
    decide,
    room_for,
)

URGENT = 0
NORMAL = 5


def job(id: str, priority: int = NORMAL, order: int = 0, session: str | None = None,
        died_before: bool = False) -> Queued:
    return Queued(id, priority, order, session, died_before)


def rows(free: int = 4, reserved: int = 0, urgent: int = 0, normal: int = 0, busy: bool | None = None) -> Rows:
    return Rows(free=free, reserved=reserved, waiting_urgent=urgent, waiting_normal=normal, urgent_priority=URGENT,
                busy=bool(urgent or normal) if busy is None else busy)


def state(rows_: Rows | None = None, alone: bool = False, here: frozenset[str] = frozenset(),
          elsewhere: dict[str, str] | None = None, stopping: bool = False) -> EngineState:
    return EngineState(rows=rows_ or rows(), alone=alone, sessions_here=here, locked_elsewhere=elsewhere or {},
                       stopping=stopping)


def ids(jobs: tuple[Queued, ...]) -> list[str]:
    return [j.id for j in jobs]


def reasons(admission: Admission) -> dict[str, str]:
    return {j.id: reason for j, reason in admission.hold}


def test_jobs_start_most_urgent_first_then_oldest():
    queued = [job("late", NORMAL, 1), job("low", 9, 0), job("early", NORMAL, 0), job("now", URGENT, 5)]
    admission = decide(queued, state(rows(free=8)))
    assert ids(admission.start) == ["now", "early", "late", "low"]
    assert admission.hold == () and admission.alone is None


def test_an_empty_queue_starts_nothing():
    assert decide([], state()) == Admission((), (), None)
    assert decide([], state(stopping=True, alone=True)) == Admission((), (), None)


def test_a_kept_row_takes_an_urgent_job_and_not_a_normal_one():
    """One free row, and it is kept: the normal job waits, the urgent one behind it in age starts."""
    queued = [job("normal", NORMAL, 0), job("urgent", URGENT, 1)]
    admission = decide(queued, state(rows(free=1, reserved=1)))
    assert ids(admission.start) == ["urgent"]
    assert reasons(admission) == {"normal": FULL}


def test_jobs_started_in_one_decision_take_the_rows_of_the_next():
    """Two free rows, one kept: one normal job starts, then urgent ones take what is left."""
    queued = [job("n1", NORMAL, 0), job("n2", NORMAL, 1), job("u1", URGENT, 2), job("u2", URGENT, 3)]
    admission = decide(queued, state(rows(free=2, reserved=1)))
    assert ids(admission.start) == ["u1", "u2"], "the urgent jobs come first, and take both rows"
    assert reasons(admission) == {"n1": FULL, "n2": FULL}
    admission = decide([job("n1", NORMAL, 0), job("n2", NORMAL, 1)], state(rows(free=2, reserved=1)))
    assert ids(admission.start) == ["n1"] and reasons(admission) == {"n2": FULL}


def test_a_full_batch_holds_every_job():
    queued = [job("a", URGENT, 0), job("b", NORMAL, 1)]
    admission = decide(queued, state(rows(free=0, reserved=1)))
    assert admission.start == () and reasons(admission) == {"a": FULL, "b": FULL}
    admission = decide(queued, state(rows(free=3, reserved=1, urgent=1, normal=2)))
    assert admission.start == (), "the waiting jobs take the free rows first"


# (free, reserved, waiting urgent, waiting normal) -> room for an urgent job, room for a normal one
ROOMS = {
    (4, 0, 0, 0): (4, 4),
    (2, 1, 0, 0): (2, 1),
    (1, 1, 0, 0): (1, 0),  # only the kept row is free
    (2, 1, 0, 2): (1, -1),  # a normal job waits beyond the unkept row: the kept one is still the urgent jobs'
    (2, 1, 1, 0): (1, 1),  # the waiting urgent job takes the kept row
    (2, 1, 2, 0): (0, 0),  # the second waiting urgent job takes the unkept row too
    (0, 1, 0, 0): (0, 0),
    (3, 2, 1, 1): (1, 0),
}


def _continuous(free: int, reserved: int, urgent: int, normal: int):
    """A ``Continuous`` holding ``urgent`` and ``normal`` waiting jobs, with ``free`` of its rows free;
    ``max_batch`` is chosen so that it keeps ``reserved`` rows (``reserved_slots``)."""
    from glyphq.worker.continuous import URGENT_SHARE, Continuous, _Waiting

    max_batch = max(reserved * URGENT_SHARE, free)
    assert max_batch // URGENT_SHARE == reserved
    engine = SimpleNamespace(slots=SimpleNamespace(max_batch=max_batch), prefill_chunk=512)
    running = Continuous(engine, (320, 240), urgent_priority=URGENT)
    priorities = [URGENT] * urgent + [NORMAL] * normal
    running.waiting = [_Waiting(f"w{i}", None, priority, i, None) for i, priority in enumerate(priorities)]
    running.rows = {slot: object() for slot in range(max_batch - free)}
    return running


@pytest.mark.parametrize("figures", sorted(ROOMS))
def test_room_for_is_the_running_batchs_own_count(figures):
    free, reserved, urgent, normal = figures
    running = _continuous(*figures)
    busy = bool(urgent or normal) or free < running.decoder.max_batch
    assert running.snapshot() == rows(free, reserved, urgent, normal, busy=busy) and running.busy == busy
    assert (room_for(running.snapshot(), URGENT), room_for(running.snapshot(), NORMAL)) == ROOMS[figures]
    assert (running.room_for(URGENT), running.room_for(NORMAL)) == ROOMS[figures]


def test_nothing_starts_while_the_worker_stops():
    queued = [job("b", NORMAL, 1), job("a", URGENT, 0)]
    admission = decide(queued, state(rows(free=8), stopping=True))
    assert admission.start == () and admission.alone is None
    assert admission.hold == ((queued[1], STOPPING), (queued[0], STOPPING))


def test_nothing_starts_beside_a_job_running_alone():
    admission = decide([job("a", URGENT, 0), job("b", NORMAL, 1)], state(rows(free=7, busy=True), alone=True))
    assert admission.start == () and reasons(admission) == {"a": ALONE, "b": ALONE}


def test_a_job_that_died_before_waits_for_an_idle_batch():
    queued = [job("died", URGENT, 0, died_before=True), job("other", NORMAL, 1)]
    admission = decide(queued, state(rows(free=3, busy=True)))
    assert ids(admission.start) == ["other"] and admission.alone is None, "the jobs behind it start meanwhile"
    assert reasons(admission) == {"died": BUSY}


def test_a_job_that_died_before_waits_for_the_jobs_started_before_it():
    """The batch is idle, but a more urgent job starts first in this decision: it keeps the batch busy."""
    queued = [job("first", URGENT, 0), job("died", NORMAL, 1, died_before=True), job("third", NORMAL, 2)]
    admission = decide(queued, state(rows(free=4, busy=False)))
    assert ids(admission.start) == ["first", "third"] and admission.alone is None
    assert reasons(admission) == {"died": BUSY}


def test_a_job_that_died_before_starts_alone_into_an_idle_batch():
    queued = [job("died", URGENT, 0, died_before=True), job("b", URGENT, 1), job("c", NORMAL, 2),
              job("d", NORMAL, 3, died_before=True)]
    admission = decide(queued, state(rows(free=4, busy=False)))
    assert admission.start == (queued[0],) and admission.alone is queued[0]
    assert reasons(admission) == {"b": ALONE, "c": ALONE, "d": ALONE}


def test_a_job_that_died_before_needs_room_too():
    admission = decide([job("died", NORMAL, 0, died_before=True)], state(rows(free=1, reserved=1, busy=False)))
    assert admission.start == () and reasons(admission) == {"died": FULL}


def test_a_turn_waits_while_a_job_here_holds_its_session():
    queued = [job("turn", URGENT, 0, session="s"), job("other", NORMAL, 1, session="t")]
    admission = decide(queued, state(rows(free=4), here=frozenset({"s"})))
    assert ids(admission.start) == ["other"] and reasons(admission) == {"turn": SESSION}


def test_a_turn_waits_while_another_job_elsewhere_holds_its_session():
    queued = [job("turn", NORMAL, 0, session="s"), job("unread", NORMAL, 1, session="u"), job("free", NORMAL, 2)]
    admission = decide(queued, state(rows(free=4), elsewhere={"s": "someone-else", "u": ""}))
    assert ids(admission.start) == ["free"]
    assert reasons(admission) == {"turn": SESSION, "unread": SESSION}, "'': Redis did not answer"


def test_a_turn_takes_back_the_lock_it_held_before_its_child_died():
    admission = decide([job("turn", NORMAL, 0, session="s")], state(rows(free=4), elsewhere={"s": "turn"}))
    assert ids(admission.start) == ["turn"] and admission.hold == ()


def test_two_turns_of_one_session_start_one_at_a_time():
    queued = [job("second", NORMAL, 2, session="s"), job("first", NORMAL, 1, session="s"),
              job("another", NORMAL, 3, session="t")]
    admission = decide(queued, state(rows(free=4)))
    assert ids(admission.start) == ["first", "another"] and reasons(admission) == {"second": SESSION}


def test_holds_keep_the_visiting_order_each_with_its_first_reason():
    """Rooms are checked before a died job's idle batch, and that before sessions."""
    queued = [job("u", URGENT, 0), job("died", URGENT, 1, session="s", died_before=True),
              job("turn", URGENT, 2, session="x"), job("n1", NORMAL, 3), job("n2", NORMAL, 4)]
    admission = decide(queued, state(rows(free=2, reserved=1, busy=False), here=frozenset({"x"})))
    assert ids(admission.start) == ["u", "n1"]
    assert [(j.id, reason) for j, reason in admission.hold] == [("died", BUSY), ("turn", SESSION), ("n2", FULL)]


# -- properties -----------------------------------------------------------------------------------


def _room_before(free: int, reserved: int, waiting: list[int], urgent_priority: int, priority: int) -> int:
    """``Continuous.room_for`` as it was written before ``worker.admission`` took it over."""
    urgent = sum(p <= urgent_priority for p in waiting)
    normal = len(waiting) - urgent
    unkept = max(0, free - reserved)
    if priority <= urgent_priority:
        return free - urgent - min(normal, unkept)
    return unkept - normal - max(0, urgent - (free - unkept))


def _admit_before(queued: list[Queued], state: EngineState) -> list[str]:
    """``tasks.serve.Server._admit`` and ``_lock_session`` as they were, over a fake batch and lock: the
    ids started, in order. A lock no one else holds is granted."""
    if state.stopping:
        return []
    r = state.rows
    waiting = [r.urgent_priority] * r.waiting_urgent + [r.urgent_priority + 1] * r.waiting_normal
    busy = r.busy
    sessions = set(state.sessions_here)
    started: list[str] = []
    alone = state.alone
    for item in sorted(queued, key=lambda j: (j.priority, j.order)):
        if alone:
            break
        if _room_before(r.free, r.reserved, waiting, r.urgent_priority, item.priority) <= 0:
            continue
        if item.died_before and busy:
            continue
        if item.session is not None:
            elsewhere = state.locked_elsewhere.get(item.session)
            if item.session in sessions or (elsewhere is not None and elsewhere != item.id):
                continue
            sessions.add(item.session)
        started.append(item.id)
        waiting.append(item.priority)
        busy = True
        if item.died_before:
            alone = True
    return started


@st.composite
def situations(draw) -> tuple[list[Queued], EngineState]:
    sessions = st.none() | st.sampled_from(["s", "t", "u"])
    count = draw(st.integers(0, 12))
    queued = [Queued(f"j{i}", draw(st.integers(0, 9)), draw(st.integers(0, 20)), draw(sessions),
                     draw(st.booleans())) for i in range(count)]
    urgent, normal = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    figures = Rows(free=draw(st.integers(0, 8)), reserved=draw(st.integers(0, 3)), waiting_urgent=urgent,
                   waiting_normal=normal, urgent_priority=draw(st.integers(0, 3)),
                   busy=bool(urgent or normal) or draw(st.booleans()))
    here = frozenset(draw(st.sets(st.sampled_from(["s", "t", "u"]))))
    elsewhere = draw(st.dictionaries(st.sampled_from(["s", "t", "u"]),
                                     st.sampled_from(["", "other"] + [j.id for j in queued])))
    rarely = st.integers(0, 4).map(lambda n: n == 0)
    return queued, EngineState(figures, draw(rarely), here, elsewhere, draw(rarely))


@settings(max_examples=500, deadline=None)
@given(situations())
def test_decide_starts_what_the_child_started_before(situation):
    queued, engine = situation
    assert ids(decide(queued, engine).start) == _admit_before(queued, engine)


@settings(max_examples=500, deadline=None)
@given(situations())
def test_decide_starts_no_more_than_the_free_rows_and_in_urgency_order(situation):
    queued, engine = situation
    admission = decide(queued, engine)
    figures = engine.rows
    assert len(admission.start) <= max(0, figures.free)
    normal = [j for j in admission.start if not figures.urgent(j.priority)]
    assert len(normal) <= max(0, figures.free - figures.reserved), "the kept rows take urgent jobs only"
    urgency = [(j.priority, j.order) for j in admission.start]
    assert urgency == sorted(urgency)
    assert sorted(ids(admission.start) + [j.id for j, _ in admission.hold]) == sorted(ids(tuple(queued)))
    started = [j.session for j in admission.start if j.session is not None]
    assert len(started) == len(set(started)) and not set(started) & engine.sessions_here
    if admission.alone is not None:
        assert admission.start == (admission.alone,) and not figures.busy and admission.alone.died_before


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 8), st.integers(0, 3), st.lists(st.integers(0, 9), max_size=6), st.integers(0, 3),
       st.integers(0, 9))
def test_room_for_is_the_formula_it_was_and_never_more_for_a_less_urgent_job(free, reserved, waiting, urgent_priority,
                                                                           priority):
    urgent = sum(p <= urgent_priority for p in waiting)
    figures = Rows(free, reserved, urgent, len(waiting) - urgent, urgent_priority, bool(waiting))
    assert room_for(figures, priority) == _room_before(free, reserved, waiting, urgent_priority, priority)
    assert room_for(figures, priority) >= room_for(figures, priority + 1)
