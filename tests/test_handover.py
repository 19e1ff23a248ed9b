"""Recycling with a hand-over: the next child loads while the current one answers, then takes over.

A real redis-server, a real worker subprocess and the tiny model that never stops on its own, so
each batch takes a while and the successor is ready before its predecessor leaves.
"""

from __future__ import annotations

import re

from conftest import png_bytes, wait_until

from glyphq.celeryconfig import settings
from glyphq.producer import submit
from glyphq.producer.store import Store

TAKE_OVER = re.compile(r"taking over from child (\d+): \d+ decode step\(s\) captured[a-z -]* in [\d.]+ s, "
                       r"then waited ([\d.]+) s")


def _answer_all(count: int, tokens: int) -> list[dict]:
    jobs = [submit(png_bytes(seed=700 + i), f"Question {i}?", max_new_tokens=tokens) for i in range(count)]
    results = [job.result(timeout=300) for job in jobs]
    assert [Store(settings).runs(job.id) for job in jobs] == [1] * count, "a job ran more than once"
    return results


def _runs(pids: list[int]) -> list[int]:
    """The pids in the order they answered, each run of equal pids once."""
    return [pid for i, pid in enumerate(pids) if i == 0 or pid != pids[i - 1]]


def test_next_child_loads_while_the_current_one_answers(start_worker, endless_model):
    worker = start_worker(model=endless_model, max_tasks_per_child=10, max_batch=2, recycle_overlap_s=600)
    results = _answer_all(30, tokens=96)

    pids = [r["worker"]["pid"] for r in results]
    runs = _runs(pids)
    assert len(runs) == len(set(runs)) == 3, f"one child at a time, 10 jobs each: {runs}"
    assert [r["worker"]["task_index"] for r in results] == list(range(1, 11)) * 3
    takeovers = TAKE_OVER.findall(worker.log())
    # The third child starts its own successor near its count too; that one may take over by now.
    taken_from = [int(pid) for pid, _ in takeovers]
    assert taken_from[:2] == runs[:2] and taken_from[2:] in ([], runs[2:]), \
        f"each successor took over from the child before it: {taken_from} after {runs}"
    # A successor was ready while its predecessor still had batches to answer, and waited for it.
    assert any(float(waited) > 0 for _, waited in takeovers), takeovers
    assert worker.proc.poll() is None


def test_without_overlap_the_next_child_starts_after_the_last_one_left(start_worker, endless_model):
    worker = start_worker(model=endless_model, max_tasks_per_child=10, max_batch=2, recycle_overlap_s=0)
    results = _answer_all(20, tokens=8)

    runs = _runs([r["worker"]["pid"] for r in results])
    assert len(runs) == len(set(runs)) == 2
    assert "taking over" not in worker.log()


def test_successor_of_an_idle_child_stops_waiting_before_celery_would_kill_it(start_worker, endless_model):
    """The queue goes quiet while a successor waits: before GLYPHQ_MODEL_LOAD_TIMEOUT it joins in, and
    the two children share the jobs until the old one reaches its count and leaves."""
    worker = start_worker(model=endless_model, max_tasks_per_child=6, max_batch=2, recycle_overlap_s=600,
                          model_load_timeout=10)
    first = _answer_all(2, tokens=8)
    assert wait_until(lambda: "still running; this child takes jobs too" in worker.log(), 60), worker.log()[-2000:]
    later = _answer_all(10, tokens=8)

    old = first[0]["worker"]["pid"]
    assert {r["worker"]["pid"] for r in later} - {old}, "the successor answered jobs"
    assert sum(r["worker"]["pid"] == old for r in first + later) <= 6 + 1, "the old child left at its count"
    assert "Timed out waiting for UP" not in worker.log()
    assert worker.proc.poll() is None
