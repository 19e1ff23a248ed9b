"""Iteration-level scheduling over a :class:`worker.slots.SlotDecoder`: jobs join and leave between steps.

Each :meth:`Continuous.step` is one scheduling iteration:

1. Admission: while a slot is free, the waiting job that is most urgent (lowest ``priority``), then
   oldest, whose pages are ready is put in the prefill of this iteration. A job's pages are decoded
   and fitted to the box by a few threads from the moment it is added (``PAGE_THREADS``), so that CPU
   work never holds up the rows decoding on the GPU; only the processor runs here. The last
   ``reserved_slots(max_batch)`` free slots take only jobs of ``urgent_priority`` or more urgent, so
   such a job never waits for a long row to end. One iteration prefills at most
   ``PREFILL_TOKENS`` prompt tokens (a longer single prompt goes alone), in passes of prompts of
   similar length (``worker.decode.prefill_groups``), so the rows already decoding wait at most one
   such pass (about 0.3 s on an H200 at 15k prompt tokens/s) between two decode chunks.
2. Decode: ``CHECK_EVERY`` steps of every active row (fewer when a row's ``max_new_tokens`` is near).
3. Rows that wrote a stop token, reached their ``max_new_tokens`` or passed their deadline end; their
   slots are free for the next iteration's admission, and the results are returned at once.

A prefill that fails is retried job by job, and then fails only its own job, unless the device
itself failed (a CUDA error): that raises ``DeviceFailed`` out of :meth:`Continuous.step`, as a
failing decode step does, since no row could go on.

With ``on_tokens`` set, each decode chunk ends with one call per row: ``on_tokens(key, ids)`` with the
ids the row wrote in it (its stop token left out), for streaming its text (``worker.streaming``).

Between two iterations :meth:`Continuous.cancel` drops one job (a revoke): its row ends unanswered
and frees its slot as a finished one does.

Nothing here knows about Celery or Redis.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from glyphq.worker import reasoning
from glyphq.worker.decode import CHECK_EVERY, prefill_groups
from glyphq.worker.errors import DeviceFailed, ModelError, WorkerError
from glyphq.worker.images import Box, fit_image, smaller_box
from glyphq.worker.slots import Admission

log = logging.getLogger(__name__)

#: Prompt tokens one iteration prefills at most (one prompt longer than this is prefilled alone).
PREFILL_TOKENS = 4096
#: Threads that decode and fit waiting jobs' pages (PIL releases the GIL while it decodes and resizes).
PAGE_THREADS = 4
#: One slot in this many is kept for urgent jobs (none below 16 slots).
URGENT_SHARE = 16


def reserved_slots(max_batch: int) -> int:
    """Slots kept free for urgent jobs in a running batch of ``max_batch`` slots."""
    return max_batch // URGENT_SHARE


class DeadlinePassed(WorkerError):
    """Raised when a job was still decoding at its deadline (``GLYPHQ_SOFT_TIME_LIMIT``)."""


@dataclass
class _Waiting:
    key: Any
    job: Any  # worker.engine.EngineJob
    priority: int
    order: int
    deadline: float | None
    pages: Future[tuple[list[Any], float]] | None = None  # the fitted pages and the seconds they took
    prompt: dict[str, torch.Tensor] | None = None
    fitted: list[Any] = field(default_factory=list)
    preprocess_s: float = 0.0
    generate_s: float = 0.0
    box: Box | None = None


@dataclass
class _Row:
    waiting: _Waiting
    slot: int
    tokens_in: int
    vision_tokens: int
    started: float
    produced: int = 1
    tokens: list[int] = field(default_factory=list)  # new tokens so far, the first one from the prefill
    checked: int = 0  # how many of them were looked at for a stop token
    given: int = 0  # how many of them were given to ``on_tokens``


@dataclass
class Finished:
    """A job that ended this iteration: its key and its ``EngineResult`` or the exception it failed with."""

    key: Any
    outcome: Any
    started: float | None = None  # time.time() its prefill began, None if it never started


@dataclass
class Stats:
    """Where a running batch's time went (seconds) and how full its steps were."""

    pages_wait_s: float = 0.0  # waiting for pages when nothing else could run
    process_s: float = 0.0  # the processor (text template, image tensors)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    row_steps: int = 0  # the sum over steps of the rows in use

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in vars(self).items()}


class Continuous:
    """The running batch of one engine: ``add`` jobs at any time, call ``step`` until ``busy`` is False,
    then ``close``. ``priority`` 0 is most urgent; jobs at ``urgent_priority`` or lower may take the
    slots kept for urgent jobs."""

    def __init__(self, engine: Any, box: Box, prefill_tokens: int = PREFILL_TOKENS, urgent_priority: int = 0,
                 on_tokens: Callable[[Any, list[int]], None] | None = None) -> None:
        self.engine = engine
        self.on_tokens = on_tokens
        self.decoder = engine.slots
        self.box = box
        self.prefill_tokens = prefill_tokens
        self.urgent_priority = urgent_priority
        self.reserved = reserved_slots(self.decoder.max_batch)
        self.waiting: list[_Waiting] = []
        self.rows: dict[int, _Row] = {}
        self.stats = Stats()
        self._order = itertools.count()
        self._page_threads: ThreadPoolExecutor | None = None

    def add(self, key: Any, job: Any, priority: int = 0, deadline: float | None = None) -> None:
        """Queue ``job`` (an ``EngineJob``); ``deadline`` is ``time.monotonic()``. Its pages are decoded
        and fitted from now on, in a thread."""
        if self._page_threads is None:
            self._page_threads = ThreadPoolExecutor(PAGE_THREADS, thread_name_prefix="glyphq-pages")
        if not callable(job.images):
            for image in job.images:  # PIL loads lazily, and one image may be shared by several jobs' threads
                image.load()
        waiting = _Waiting(key, job, priority, next(self._order), deadline)
        waiting.pages = self._page_threads.submit(self._fit_pages, job, self.box)
        self.waiting.append(waiting)

    def close(self) -> None:
        """Stop the page threads (after the jobs in hand have ended)."""
        if self._page_threads is not None:
            self._page_threads.shutdown(wait=True, cancel_futures=True)
            self._page_threads = None

    def in_hand(self) -> list[Any]:
        """The keys of the jobs in hand: waiting, then decoding."""
        return [w.key for w in self.waiting] + [row.waiting.key for row in self.rows.values()]

    def cancel(self, key: Any) -> bool:
        """Drop the job added as ``key``, waiting or decoding, between two steps: its slot is free for the
        next admission and the other rows decode on. False if it is not in hand (it ended already)."""
        for waiting in self.waiting:
            if waiting.key is key:
                self.waiting.remove(waiting)
                if waiting.pages is not None:
                    waiting.pages.cancel()  # a page thread that already runs it finishes, unread
                return True
        slot = next((slot for slot, row in self.rows.items() if row.waiting.key is key), None)
        if slot is None:
            return False
        del self.rows[slot]
        self.decoder.release(slot)
        return True

    @property
    def busy(self) -> bool:
        return self.held > 0

    @property
    def held(self) -> int:
        """Jobs added and not yet ended: decoding or waiting."""
        return len(self.rows) + len(self.waiting)

    @property
    def free_slots(self) -> int:
        return self.decoder.max_batch - len(self.rows)

    def room_for(self, priority: int) -> int:
        """How many more jobs of ``priority`` the next iteration could start, after the waiting ones."""
        urgent = sum(w.priority <= self.urgent_priority for w in self.waiting)
        normal = len(self.waiting) - urgent
        unkept = max(0, self.free_slots - self.reserved)  # the free slots any job may take
        if priority <= self.urgent_priority:
            return self.free_slots - urgent - min(normal, unkept)
        return unkept - normal - max(0, urgent - (self.free_slots - unkept))

    def step(self) -> list[Finished]:
        """One iteration: admit, decode a chunk, end rows. Returns the jobs that ended."""
        finished = self._admit()
        if self.rows:
            finished += self._decode()
        return finished

    def run(self) -> list[Finished]:
        """Step until every job has ended, then ``close``; every result, in the order the jobs ended."""
        done: list[Finished] = []
        try:
            while self.busy:
                done += self.step()
        finally:
            self.close()
        return done

    # -- admission ------------------------------------------------------------------------------

    def _admit(self) -> list[Finished]:
        """Choose the waiting jobs to start now, most urgent first, and prefill them."""
        failed: list[Finished] = []
        chosen: list[_Waiting] = []
        tokens = 0
        self._wait_for_pages()
        self.waiting.sort(key=lambda w: (w.priority, w.order))
        pending = 0  # more urgent jobs whose pages are still being decoded: they keep a slot each
        for waiting in list(self.waiting):
            free = self.free_slots if waiting.priority <= self.urgent_priority else self.free_slots - self.reserved
            if len(chosen) + pending >= free:
                break
            if waiting.prompt is None and waiting.pages is not None and not waiting.pages.done():
                pending += 1  # the next iteration looks again
                continue
            try:
                self._prepare(waiting)
            except Exception as exc:  # a bad image or prompt fails its own job only
                self.waiting.remove(waiting)
                failed.append(Finished(waiting.key, _as_failure(exc), time.time()))
                continue
            assert waiting.prompt is not None
            length = waiting.prompt["input_ids"].shape[1]
            if chosen and tokens + length > self.prefill_tokens:
                break
            self.waiting.remove(waiting)
            chosen.append(waiting)
            tokens += length
        if chosen:
            failed += self._start(chosen)
        return failed

    def _wait_for_pages(self) -> None:
        """With no row decoding, wait until some waiting job's pages are ready (rather than spin)."""
        if self.rows:
            return
        pending = [w.pages for w in self.waiting if w.prompt is None and w.pages is not None]
        if pending and not any(future.done() for future in pending):
            started = time.perf_counter()
            wait(pending, return_when=FIRST_COMPLETED)
            self.stats.pages_wait_s += time.perf_counter() - started

    def _fit_pages(self, job: Any, box: Box) -> tuple[list[Any], float]:
        """In a page thread: the job's pages decoded and fitted into ``box``, and the seconds it took."""
        started = time.perf_counter()
        fitted = [fit_image(image, box, self.engine.min_side) for image in job.pages()]
        return fitted, time.perf_counter() - started

    def _prepare(self, waiting: _Waiting) -> None:
        if waiting.prompt is not None:
            return
        job = waiting.job
        if waiting.box is not None or waiting.pages is None:  # a retry in a smaller box fits again, here
            waiting.fitted, fit_s = self._fit_pages(job, waiting.box or self.box)
        else:
            waiting.fitted, fit_s = waiting.pages.result()
        waiting.preprocess_s += fit_s
        started = time.perf_counter()
        waiting.prompt = self.engine.process(job, waiting.fitted)
        elapsed = time.perf_counter() - started
        waiting.preprocess_s += elapsed
        self.stats.process_s += elapsed
        total = waiting.prompt["input_ids"].shape[1] + job.max_new_tokens
        if not self.decoder.fits(total):
            raise ModelError(f"the prompt ({waiting.prompt['input_ids'].shape[1]} tokens) and max_new_tokens "
                             f"({job.max_new_tokens}) do not fit GLYPHQ_DECODE_MAX_TOKENS={self.decoder.max_tokens}")

    def _start(self, chosen: list[_Waiting]) -> list[Finished]:
        """Prefill ``chosen`` in length groups; a group that fails is retried job by job."""
        failed: list[Finished] = []
        lengths = [w.prompt["input_ids"].shape[1] for w in chosen]  # type: ignore[index]
        for group in prefill_groups(lengths):
            failed += self._start_group([chosen[i] for i in group])
        return failed

    def _start_group(self, group: list[_Waiting]) -> list[Finished]:
        free = [slot for slot in range(self.decoder.max_batch) if slot not in self.rows][:len(group)]
        now, started = time.time(), time.perf_counter()
        try:
            budgets = [w.job.thinking_budget if self.engine.reasoning else None for w in group]
            first = self.decoder.admit([Admission(slot, w.prompt or {}, budget)
                                        for slot, w, budget in zip(free, group, budgets, strict=True)])
        except Exception as exc:
            for slot in free:
                self.decoder.release(slot)
            return self._retry(group, exc, now)
        prefill_s = time.perf_counter() - started
        self.stats.prefill_s += prefill_s
        for slot, waiting in zip(free, group, strict=True):
            prompt = waiting.prompt
            assert prompt is not None
            ids = prompt["input_ids"]
            vision = int((ids == self.engine.image_token_id).sum()) if self.engine.image_token_id is not None else 0
            waiting.preprocess_s += prefill_s / len(group)
            self.rows[slot] = _Row(waiting, slot, int(ids.shape[1]), vision, now, tokens=[first[group.index(waiting)]])
            waiting.prompt = None  # the cache holds it now
        return []

    def _retry(self, group: list[_Waiting], exc: BaseException, now: float) -> list[Finished]:
        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if isinstance(exc, torch.AcceleratorError):  # the device broke, not the job: every later job would fail too
            raise DeviceFailed(f"the device failed in a prefill: {message}") from exc
        traceback.clear_frames(exc.__traceback__)
        del exc
        self.engine.cleanup()
        if len(group) > 1:
            log.warning("a prefill of %d jobs failed (%s); prefilling each alone", len(group), message)
            return [f for waiting in group for f in self._start_group([waiting])]
        (waiting,) = group
        if out_of_memory and waiting.box is None:
            waiting.box, waiting.prompt = smaller_box(self.box), None
            log.warning("CUDA out of memory in a prefill; retrying with box %sx%s", *waiting.box)
            try:
                self._prepare(waiting)
            except Exception as again:
                return [Finished(waiting.key, _as_failure(again), now)]
            return self._start_group([waiting])
        log.warning("the model failed on a job: %s", message)
        return [Finished(waiting.key, ModelError(f"the model failed on this job: {message}"), now)]

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self) -> list[Finished]:
        rows, active = max(self.rows) + 1, len(self.rows)
        steps = min([CHECK_EVERY] + [row.waiting.job.max_new_tokens - row.produced for row in self.rows.values()])
        started = time.perf_counter()
        if steps > 0:
            length = max(row.tokens_in + row.produced for row in self.rows.values()) + steps
            self.decoder.decode(rows, length, steps)
            latest = self.decoder.latest(rows, steps)
            for row in self.rows.values():
                row.tokens += latest[row.slot]
                row.produced += steps
            self.stats.steps += steps
            self.stats.row_steps += steps * active
        elapsed = time.perf_counter() - started
        self.stats.decode_s += elapsed
        share = elapsed / len(self.rows)
        now = time.monotonic()
        finished: list[Finished] = []
        for slot, row in list(self.rows.items()):
            row.waiting.generate_s += share
            ids = row.tokens[:row.produced]
            stop = next((i for i in range(row.checked, len(ids)) if ids[i] in self.engine.eos_ids), None)
            row.checked = len(ids)  # tokens of earlier chunks were looked at then
            if self.on_tokens is not None:
                end = len(ids) if stop is None else stop
                self.on_tokens(row.waiting.key, ids[row.given:end])
                row.given = end
            deadline = row.waiting.deadline
            if stop is None and row.produced < row.waiting.job.max_new_tokens:
                if deadline is None or now < deadline:
                    continue
                outcome: Any = DeadlinePassed(f"still answering after {row.produced} new tokens at its time limit")
            else:
                outcome = self._result(row, ids[:stop] if stop is not None else ids, stop is not None, active)
            del self.rows[slot]
            self.decoder.release(slot)
            finished.append(Finished(row.waiting.key, outcome, row.started))
        return finished

    def _result(self, row: _Row, ids: list[int], stopped: bool, active: int) -> Any:
        from glyphq.worker.engine import EngineResult

        engine, job = self.engine, row.waiting.job
        text = engine.processor.batch_decode([ids], skip_special_tokens=engine.reasoning is None)[0]
        split = reasoning.parse(text) if engine.reasoning is not None else reasoning.Parsed(text.strip(), None)
        return EngineResult(
            answer=split.answer, reasoning=split.reasoning, finish_reason="stop" if stopped else "length",
            thinking_tokens=reasoning.thinking_tokens(ids, engine.reasoning),
            thinking_budget_hit=reasoning.budget_cut_in(ids, job.thinking_budget, engine.reasoning),
            tokens_in=row.tokens_in, tokens_out=len(ids), vision_tokens=row.vision_tokens,
            image_sizes_used=[image.size for image in row.waiting.fitted],
            preprocess_s=row.waiting.preprocess_s, generate_s=row.waiting.generate_s,
            batch_size=active, token_ids=ids,
        )


def _as_failure(exc: BaseException) -> BaseException:
    from glyphq.producer.errors import GlyphqError

    traceback.clear_frames(exc.__traceback__)
    if isinstance(exc, GlyphqError):
        return exc
    return ModelError(f"the model failed on this job: {type(exc).__name__}: {exc}")
