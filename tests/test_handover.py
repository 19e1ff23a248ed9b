"""Recycling with a hand-over: the next child loads while the current one answers, then takes over.

A real redis-server, a real worker subprocess and the tiny model that never stops on its own, so
each batch takes a while and the successor is ready before its predecessor leaves.
"""

from __future__ import annotations

import io
import re

from conftest import png_bytes, wait_until
from PIL import Image

from glyphq.celeryconfig import Settings, settings
from glyphq.producer import submit
from glyphq.producer.store import Store
from glyphq.worker.engine import EngineJob, load

TAKE_OVER = re.compile(r"taking over from child (\d+): \d+ decode step\(s\) captured on a provisional cache"
                       r"[a-z -]* in [\d.]+ s, then waited ([\d.]+) s")
FULL_CACHE = re.compile(r"GpuChild-(\d+)\] full cache allocated and \d+ decode step\(s\) captured in ([\d.]+) s "
                        r"after child (\d+) left")


def _answer_all(count: int, tokens: int) -> list[dict]:
    jobs = [submit(png_bytes(seed=700 + i), f"Question {i}?", max_new_tokens=tokens) for i in range(count)]
    results = [job.result(timeout=300) for job in jobs]
    assert [Store(settings).runs(job.id) for job in jobs] == [1] * count, "a job ran more than once"
    return results


def _runs(pids: list[int]) -> list[int]:
    """The pids in the order they answered, each run of equal pids once."""
    return [pid for i, pid in enumerate(pids) if i == 0 or pid != pids[i - 1]]


#: New tokens of each job of the first test: enough that a child's ten jobs outlast its successor's start.
TOKENS = 480


def test_next_child_loads_while_the_current_one_answers(start_worker, endless_model):
    """Four slots: a successor starts with a provisional cache of two rows and takes its full one once
    its predecessor has left; every answer equals the job's answer without a hand-over."""
    worker = start_worker(model=endless_model, max_tasks_per_child=10, max_batch=4, recycle_overlap_s=600)
    results = _answer_all(30, tokens=TOKENS)

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
    # Each took its full cache only after its predecessor had left, and before it answered.
    log = worker.log()
    full = FULL_CACHE.findall(log)
    assert [int(pid) for _, _, pid in full][:2] == runs[:2], full
    for (number, _, pid), (taken, _) in zip(full, takeovers, strict=False):
        assert pid == taken
        assert log.index(f"GpuChild-{number}] full cache") < log.index(f"GpuChild-{number}] first generate")
    assert worker.proc.poll() is None

    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(endless_model), "GLYPHQ_DECODE": "generate"}))
    jobs = [EngineJob([Image.open(io.BytesIO(png_bytes(seed=700 + i))).convert("RGB")], f"Question {i}?", TOKENS)
            for i in range(30)]
    expected = [r for start in range(0, 30, 10) for r in engine.answer(jobs[start:start + 10], settings.max_image_size)]
    assert [(r["answer"], r["tokens_in"]) for r in results] == [(r.answer, r.tokens_in) for r in expected]


def test_without_overlap_the_next_child_starts_after_the_last_one_left(start_worker, endless_model):
    worker = start_worker(model=endless_model, max_tasks_per_child=10, max_batch=2, recycle_overlap_s=0)
    results = _answer_all(20, tokens=8)

    runs = _runs([r["worker"]["pid"] for r in results])
    assert len(runs) == len(set(runs)) == 2
    assert "taking over" not in worker.log()


def test_successor_of_an_idle_child_stops_waiting_before_celery_would_kill_it(start_worker, endless_model):
    """The queue goes quiet while a successor waits: before GLYPHQ_MODEL_LOAD_TIMEOUT it takes its full
    cache beside the old child (on the CPU it fits; on a GPU where it does not, the successor leaves
    instead) and joins in, and the two share the jobs until the old one reaches its count and leaves."""
    worker = start_worker(model=endless_model, max_tasks_per_child=6, max_batch=4, recycle_overlap_s=600,
                          model_load_timeout=10)
    first = _answer_all(2, tokens=8)
    assert wait_until(lambda: "still running; this child takes jobs too" in worker.log(), 60), worker.log()[-2000:]
    later = _answer_all(10, tokens=8)

    old = first[0]["worker"]["pid"]
    assert {r["worker"]["pid"] for r in later} - {old}, "the successor answered jobs"
    assert sum(r["worker"]["pid"] == old for r in first + later) <= 6 + 1, "the old child left at its count"
    assert "Timed out waiting for UP" not in worker.log()
    assert re.search(rf"full cache allocated and \d+ decode step\(s\) captured in [\d.]+ s beside child {old}, "
                     "which still runs", worker.log()), "the successor took its full cache beside the old child"
    assert worker.proc.poll() is None
