"""Iteration-level scheduling over a :class:`worker.paged.PagedDecoder`: jobs join and leave between steps.

Each :meth:`Continuous.step` is one scheduling iteration: decide, then do, then update.

1. Decide (``worker.schedule.schedule``, from plain figures): which rows to preempt when the KV
   cache's free blocks cannot hold the decoding rows' next tokens, which waiting jobs to admit (most
   urgent, then oldest, while a row is free and the free blocks hold the job's prompt and a first
   stretch of its answer; the last ``reserved_slots(max_batch)`` free rows take only jobs of
   ``urgent_priority`` or more urgent, so such a job never waits for a long row to end; one that finds
   the blocks short takes them from less urgent rows, which are preempted), which prompt
   chunks the step carries (``GLYPHQ_PREFILL_CHUNK`` tokens at most), and how many decode steps run.
   A job's pages are decoded and fitted to the box by a few threads from the moment it is added
   (``PAGE_THREADS``), so that CPU work never holds up the rows decoding; only the processor runs here.
2. Do: preempt (the row's blocks go back at once; the job waits again and later runs from its prompt,
   writing the same tokens: decoding is greedy and its rules start again with it), admit (the vision
   tower runs on the job's pages), then one step: a mixed step of the prompt chunks and one token of
   every decoding row, or ``CHECK_EVERY`` decode steps (fewer when a row's ``max_new_tokens`` is near).
3. Update: rows that wrote a stop token, reached their ``max_new_tokens`` or passed their deadline end;
   their blocks are free for the next iteration, and the results are returned at once.

Pages read once: each page's content key is computed in its page thread (``worker.prefix``), and a
job's prompt is keyed block by block when it is prepared. A job whose prompt begins with blocks the
decoder keeps (an earlier question about the same pages) shares them and prefills only the rest; the
vision tower runs only on the pages it still needs that the encoder cache lacks. A job whose next
block another row is prefilling waits until that block is kept (``worker.schedule``), so questions
about one document submitted together pay for its pages once.

A job whose start or prompt chunk fails is retried alone, and then fails only its own job, unless the
device itself failed (a CUDA error): that raises ``DeviceFailed`` out of :meth:`Continuous.step`, as a
failing decode step does, since no row could go on.

With ``on_tokens`` set, each decode chunk ends with one call per row: ``on_tokens(key, ids)`` with the
ids the row wrote in it (its stop token left out), for streaming its text (``worker.streaming``). A
preempted job writes the same tokens again when it runs again; they are given once.

Between two iterations :meth:`Continuous.cancel` drops one job (a revoke): its row ends unanswered
and frees its blocks as a finished one does.

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

from glyphq.worker import admission, reasoning
from glyphq.worker.blocks import BLOCK_TOKENS
from glyphq.worker.decode import CHECK_EVERY
from glyphq.worker.errors import DeviceFailed, ModelError, WorkerError
from glyphq.worker.images import Box, fit_image, smaller_box
from glyphq.worker.prefix import page_key
from glyphq.worker.schedule import Candidate, Plan, RowState, schedule

log = logging.getLogger(__name__)

#: Threads that decode and fit waiting jobs' pages (PIL releases the GIL while it decodes and resizes).
PAGE_THREADS = 4
#: One row in this many is kept for urgent jobs (none below 16 rows).
URGENT_SHARE = 16
#: New tokens a job's blocks must hold beyond its prompt to be admitted: its first decode steps.
FIRST_STRETCH = CHECK_EVERY
#: Pages whose processor output (their pixels, on the device: ~6 MB an A4 page, ~11 MB a 1280x720 one
#: for Glyph) waiting jobs may hold at once; past it, less urgent jobs are prepared once these start.
PREPARED_PAGES = 64


def reserved_slots(max_batch: int) -> int:
    """Rows kept free for urgent jobs in a running batch of ``max_batch`` rows."""
    return max_batch // URGENT_SHARE


class DeadlinePassed(WorkerError):
    """Raised when a job was still decoding at its deadline (``GLYPHQ_SOFT_TIME_LIMIT``)."""


@dataclass(eq=False)
class _Waiting:
    key: Any
    job: Any  # worker.engine.EngineJob
    priority: int
    order: int
    deadline: float | None
    pages: Future[tuple[list[Any], list[bytes] | None, float]] | None = None  # fitted pages, keys, seconds
    prompt: dict[str, torch.Tensor] | None = None
    fitted: list[Any] = field(default_factory=list)
    page_keys: list[bytes] | None = None  # the fitted pages' content keys (None: the caches are off)
    keys: list[bytes] = field(default_factory=list)  # the keys of the prompt's full blocks
    preprocess_s: float = 0.0
    generate_s: float = 0.0
    box: Box | None = None
    started: float | None = None  # time.time() it was first admitted
    given: int = 0  # new tokens given to ``on_tokens`` (kept over a preemption, which writes them again)


@dataclass(eq=False)
class _Row:
    waiting: _Waiting
    slot: int  # the decoder's row
    tokens_in: int
    vision_tokens: int
    started: float
    prefilled: int = 0  # prompt tokens in the cache
    shared: int = 0  # of them, tokens in shared blocks when it started
    encoder_hits: int = 0  # pages whose vision features came from the encoder cache
    produced: int = 0  # new tokens so far
    tokens: list[int] = field(default_factory=list)
    checked: int = 0  # how many of them were looked at for a stop token

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.tokens_in


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
    prefill_s: float = 0.0  # the vision tower and the steps with prompt chunks
    decode_s: float = 0.0
    steps: int = 0
    row_steps: int = 0  # the sum over steps of the rows decoding
    preemptions: int = 0  # rows preempted when the KV cache ran out of blocks (run again later)

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in vars(self).items()}


class Continuous:
    """The running batch of one engine: ``add`` jobs at any time, call ``step`` until ``busy`` is False,
    then ``close``. ``priority`` 0 is most urgent; jobs at ``urgent_priority`` or lower may take the
    rows kept for urgent jobs."""

    def __init__(self, engine: Any, box: Box, prefill_chunk: int | None = None, urgent_priority: int = 0,
                 on_tokens: Callable[[Any, list[int]], None] | None = None) -> None:
        self.engine = engine
        self.on_tokens = on_tokens
        self.decoder = engine.slots
        self.box = box
        self.prefill_chunk = prefill_chunk or engine.prefill_chunk
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
        """Drop the job added as ``key``, waiting or decoding, between two steps: its blocks are free for
        the next admission and the other rows decode on. False if it is not in hand (it ended already)."""
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
        """Rows that could start now (``GLYPHQ_MAX_BATCH`` less the rows in the batch)."""
        return self.decoder.max_batch - len(self.rows)

    def snapshot(self) -> admission.Rows:
        """The batch as the next admission sees it (``worker.admission``): free and kept rows, waiting jobs."""
        urgent = sum(w.priority <= self.urgent_priority for w in self.waiting)
        return admission.Rows(free=self.free_slots, reserved=self.reserved, waiting_urgent=urgent,
                              waiting_normal=len(self.waiting) - urgent, urgent_priority=self.urgent_priority,
                              busy=self.busy)

    def room_for(self, priority: int) -> int:
        """How many more jobs of ``priority`` the next iteration could start, after the waiting ones."""
        return admission.room_for(self.snapshot(), priority)

    def step(self) -> list[Finished]:
        """One iteration: decide, preempt and admit, run one step, end rows. Returns the jobs that ended."""
        finished = self._prepare_waiting()
        plan = self._plan()
        self._preempt(plan.preempt)
        finished += self._admit(plan.admit)
        chunks = [(slot, start, end) for waiting, start, end in plan.chunks
                  if (slot := self._slot_of(waiting)) is not None]
        if chunks:
            finished += self._prefill(chunks)
        elif plan.steps and any(row.decoding for row in self.rows.values()):
            self._decode(plan.steps)
        return finished + self._end_rows()

    def run(self) -> list[Finished]:
        """Step until every job has ended, then ``close``; every result, in the order the jobs ended."""
        done: list[Finished] = []
        try:
            while self.busy:
                done += self.step()
        finally:
            self.close()
        return done

    # -- deciding -------------------------------------------------------------------------------

    def _prepare_waiting(self) -> list[Finished]:
        """Run the processor for the waiting jobs that could start now, most urgent first, whose pages
        are ready, until they hold ``PREPARED_PAGES`` pages; a job whose pages or prompt fail ends here."""
        failed: list[Finished] = []
        self._wait_for_pages()
        self.waiting.sort(key=lambda w: (w.priority, w.order))
        held = sum(len(w.fitted) for w in self.waiting if w.prompt is not None)
        for waiting in list(self.waiting[:self.free_slots]):
            if waiting.prompt is not None:
                continue
            if held >= PREPARED_PAGES or (waiting.pages is not None and not waiting.pages.done()):
                continue
            try:
                self._prepare(waiting)
                held += len(waiting.fitted)
            except Exception as exc:  # a bad image or prompt fails its own job only
                self.waiting.remove(waiting)
                failed.append(Finished(waiting.key, _as_failure(exc), time.time()))
        return failed

    def _plan(self) -> Plan:
        rows = [RowState(row.waiting, row.waiting.priority, row.waiting.order, self._cached(row), row.tokens_in,
                         self.decoder.blocks_of(slot), row.waiting.job.max_new_tokens - row.produced, row.decoding,
                         self.decoder.tables[slot].frees())
                for slot, row in self.rows.items()]
        computing = {key for row in self.rows.values() if not row.decoding
                     for key in row.waiting.keys[row.prefilled // BLOCK_TOKENS:]}
        candidates = [self._candidate(w) for w in self.waiting[:self.free_slots]]
        return schedule(rows, candidates, self.decoder.free_blocks, self.decoder.max_batch, self.reserved,
                        self.urgent_priority, self.prefill_chunk, CHECK_EVERY, FIRST_STRETCH, computing)

    def _candidate(self, waiting: _Waiting) -> Candidate:
        """A waiting job as the plan sees it: its prompt, and the kept blocks it would share now."""
        if waiting.prompt is None:
            return Candidate(waiting, waiting.priority, waiting.order, 0, ready=False)
        length = _prompt_len(waiting)
        shared, shared_free = self.decoder.matching(waiting.keys, length)
        usable = self.decoder.shareable(waiting.keys, length)
        needs = usable[shared] if shared < len(usable) else None
        return Candidate(waiting, waiting.priority, waiting.order, length, cached=shared * BLOCK_TOKENS,
                         shared_free=shared_free, needs=needs)

    def _wait_for_pages(self) -> None:
        """With no row in the batch, wait until some waiting job's pages are ready (rather than spin)."""
        if self.rows:
            return
        pending = [w.pages for w in self.waiting if w.prompt is None and w.pages is not None]
        if pending and not any(future.done() for future in pending):
            started = time.perf_counter()
            wait(pending, return_when=FIRST_COMPLETED)
            self.stats.pages_wait_s += time.perf_counter() - started

    def _fit_pages(self, job: Any, box: Box) -> tuple[list[Any], list[bytes] | None, float]:
        """In a page thread: the job's pages decoded and fitted into ``box``, their content keys (None
        when the decoder keeps nothing), and the seconds it took."""
        started = time.perf_counter()
        fitted = [fit_image(image, box, self.engine.min_side) for image in job.pages()]
        keys = None
        if self._caches:
            sources = job.sources if job.sources is not None and len(job.sources) == len(fitted) else None
            keys = [page_key(image, sources[i] if sources else None, job.cache_scope) for i, image in enumerate(fitted)]
        return fitted, keys, time.perf_counter() - started

    @property
    def _caches(self) -> bool:
        return bool(self.decoder.prefix_cache or self.decoder.encoder_cache.max_bytes)

    def _prepare(self, waiting: _Waiting) -> None:
        if waiting.prompt is not None:
            return
        job = waiting.job
        fit_s = 0.0
        if waiting.box is not None or waiting.pages is None:  # a retry in a smaller box fits again, here
            waiting.fitted, waiting.page_keys, fit_s = self._fit_pages(job, waiting.box or self.box)
        elif not waiting.fitted:  # a job that runs again after a preemption keeps its fitted pages
            waiting.fitted, waiting.page_keys, fit_s = waiting.pages.result()
        waiting.preprocess_s += fit_s
        started = time.perf_counter()
        waiting.prompt = self.engine.process(job, waiting.fitted)
        waiting.keys = self.decoder.prompt_keys(waiting.prompt, waiting.page_keys, job.cache_scope)
        elapsed = time.perf_counter() - started
        waiting.preprocess_s += elapsed
        self.stats.process_s += elapsed
        prompt = _prompt_len(waiting)
        total = prompt + job.max_new_tokens
        if total > self.decoder.max_tokens:
            raise ModelError(f"the prompt ({prompt} tokens) and max_new_tokens ({job.max_new_tokens}) do not fit "
                             f"GLYPHQ_DECODE_MAX_TOKENS={self.decoder.max_tokens}")
        if not self.decoder.fits(total):
            raise ModelError(f"the prompt ({prompt} tokens) and max_new_tokens ({job.max_new_tokens}) do not fit "
                             f"the KV cache pool of {self.decoder.pool_tokens} tokens (GLYPHQ_KV_CACHE_TOKENS)")

    # -- doing ----------------------------------------------------------------------------------

    def _slot_of(self, waiting: _Waiting) -> int | None:
        return next((slot for slot, row in self.rows.items() if row.waiting is waiting), None)

    def _preempt(self, victims: list[_Waiting]) -> None:
        """Free the rows of ``victims``: each waits again, from its prompt, keeping its place in line."""
        for waiting in victims:
            slot = self._slot_of(waiting)
            assert slot is not None
            row = self.rows.pop(slot)
            self.decoder.preempt(slot)
            self.waiting.append(waiting)
            self.stats.preemptions += 1
            log.info("KV cache full: preempted a job of priority %d after %d new tokens; it runs again later",
                     waiting.priority, row.produced)

    def _admit(self, admitted: list[_Waiting]) -> list[Finished]:
        """Start each admitted job in a free row: the kept blocks it shares (all of them first, so that
        no admission evicts what a later one shares), then its own blocks and its pages through the
        vision tower."""
        failed: list[Finished] = []
        free = sorted(set(range(self.decoder.max_batch)) - set(self.rows))
        starts = [(waiting, slot, self.decoder.share(slot, waiting.keys, _prompt_len(waiting)))
                  for waiting, slot in zip(admitted, free, strict=False)]
        for waiting, slot, shared in starts:
            now, started = time.time(), time.perf_counter()
            prompt = waiting.prompt
            assert prompt is not None
            length = _prompt_len(waiting)
            if not self.decoder.reserve(slot, length + FIRST_STRETCH):
                self.decoder.release(slot)  # it waits: the next plan sees the pool as it is now
                log.warning("the KV cache pool lacked the blocks a job was admitted with; it waits")
                continue
            try:
                budget = waiting.job.thinking_budget if self.engine.reasoning else None
                self.decoder.start(slot, prompt, budget, waiting.page_keys, waiting.keys, shared)
            except Exception as exc:
                self.decoder.release(slot)
                failed += self._failed_start(waiting, exc, now)
                continue
            self.waiting.remove(waiting)
            # Its pixels went through the vision tower: a 40-page document's are ~0.2 GB on the device, too
            # much to keep beside every row. Should it be preempted, its pages are processed again.
            waiting.prompt = None
            elapsed = time.perf_counter() - started
            self.stats.prefill_s += elapsed
            waiting.preprocess_s += elapsed
            waiting.started = waiting.started or now
            ids = prompt["input_ids"]
            vision = int((ids == self.engine.image_token_id).sum()) if self.engine.image_token_id is not None else 0
            self.rows[slot] = _Row(waiting, slot, length, vision, waiting.started, prefilled=shared, shared=shared,
                                   encoder_hits=self.decoder.encoder_hits_of(slot))
        return failed

    def _failed_start(self, waiting: _Waiting, exc: BaseException, now: float) -> list[Finished]:
        """A job that could not start: out of memory, it waits again in a smaller box once; else it fails."""
        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
        message = _message(exc)
        if isinstance(exc, torch.AcceleratorError):  # the device broke, not the job: every later job would fail too
            raise DeviceFailed(f"the device failed in a prefill: {message}") from exc
        traceback.clear_frames(exc.__traceback__)
        del exc
        self.engine.cleanup()
        if out_of_memory and waiting.box is None:
            waiting.box, waiting.prompt = smaller_box(self.box), None
            log.warning("CUDA out of memory in a prefill; retrying with box %sx%s", *waiting.box)
            return []
        self.waiting.remove(waiting)
        log.warning("the model failed on a job: %s", message)
        return [Finished(waiting.key, ModelError(f"the model failed on this job: {message}"), now)]

    def _prefill(self, chunks: list[tuple[int, int, int]]) -> list[Finished]:
        """One mixed step: the prompt chunks and a token of every decoding row. A step that fails is
        retried chunk by chunk without the decoding rows; a chunk that fails alone fails its job."""
        decoding = self._grown(1)
        started = time.perf_counter()
        failed: list[Finished] = []
        try:
            finishing = self.decoder.prefill(chunks)
        except Exception as exc:
            if isinstance(exc, torch.AcceleratorError):
                raise DeviceFailed(f"the device failed in a prefill: {_message(exc)}") from exc
            message = _message(exc)
            traceback.clear_frames(exc.__traceback__)
            del exc
            self.engine.cleanup()
            log.warning("a step with %d prompt chunk(s) failed (%s); prefilling each alone", len(chunks), message)
            decoding, finishing = [], []
            for chunk in chunks:
                try:
                    finishing += self.decoder.prefill([chunk], decode=False)
                except Exception as again:
                    if isinstance(again, torch.AcceleratorError):
                        raise DeviceFailed(f"the device failed in a prefill: {_message(again)}") from again
                    row = self.rows.pop(chunk[0])
                    self.decoder.release(chunk[0])
                    failed.append(Finished(row.waiting.key, ModelError(
                        f"the model failed on this job: {_message(again)}"), row.started))
        elapsed = time.perf_counter() - started
        self.stats.prefill_s += elapsed
        self.stats.steps += 1
        self.stats.row_steps += len(decoding)
        share = elapsed / max(1, len(self.rows))
        for slot, _, end in chunks:
            if slot in self.rows:
                self.rows[slot].prefilled = end
                self.rows[slot].waiting.preprocess_s += share
        for slot in decoding:
            self.rows[slot].waiting.generate_s += share
        self._collect(decoding + finishing, 1)
        return failed

    def _decode(self, steps: int) -> None:
        decoding = self._grown(steps)
        if not decoding:
            return
        rows = max(decoding) + 1
        length = max(self._cached(self.rows[slot]) for slot in decoding) + steps
        started = time.perf_counter()
        self.decoder.decode(rows, length, steps)
        self._collect(decoding, steps)
        elapsed = time.perf_counter() - started
        self.stats.decode_s += elapsed
        self.stats.steps += steps
        self.stats.row_steps += steps * len(decoding)
        for slot in decoding:
            self.rows[slot].waiting.generate_s += elapsed / len(decoding)

    def _grown(self, steps: int) -> list[int]:
        """The decoding rows, each with blocks for ``steps`` more tokens. The plan counts for that, but a
        row it preempted may have held kept blocks that a job admitted after it then shared, so the free
        blocks can fall short of the plan's count: a row that cannot grow then is preempted, most urgent
        rows served first, and runs again later."""
        grown: list[int] = []
        for slot, row in sorted(self.rows.items(), key=lambda item: (item[1].waiting.priority, item[1].waiting.order)):
            if not row.decoding:
                continue
            if self.decoder.reserve(slot, self._cached(row) + steps):
                grown.append(slot)
            else:
                self._preempt([row.waiting])
        return sorted(grown)

    def _collect(self, slots: list[int], steps: int) -> None:
        """Each of ``slots`` wrote ``steps`` new tokens: read them (one small copy)."""
        if not slots:
            return
        latest = self.decoder.latest(max(slots) + 1, steps)
        for slot in slots:
            row = self.rows[slot]
            row.tokens += latest[slot]
            row.produced += steps

    @staticmethod
    def _cached(row: _Row) -> int:
        """Tokens of ``row`` in the cache: its prompt's, then all new ones but the last (written next step)."""
        return row.prefilled + max(0, row.produced - 1)

    # -- updating -------------------------------------------------------------------------------

    def _end_rows(self) -> list[Finished]:
        """End the rows that wrote a stop token, reached their ``max_new_tokens`` or passed their deadline."""
        now = time.monotonic()
        active = len(self.rows)
        finished: list[Finished] = []
        for slot, row in list(self.rows.items()):
            ids = row.tokens[:row.produced]
            stop = next((i for i in range(row.checked, len(ids)) if ids[i] in self.engine.eos_ids), None)
            row.checked = len(ids)  # tokens of earlier steps were looked at then
            self._give(row.waiting, ids if stop is None else ids[:stop])
            deadline = row.waiting.deadline
            if stop is None and (not row.decoding or row.produced < row.waiting.job.max_new_tokens):
                if deadline is None or now < deadline:
                    continue
                outcome: Any = DeadlinePassed(f"still answering after {row.produced} new tokens at its time limit")
            else:
                outcome = self._result(row, ids[:stop] if stop is not None else ids, stop is not None, active)
            del self.rows[slot]
            self.decoder.release(slot)
            finished.append(Finished(row.waiting.key, outcome, row.started))
        return finished

    def _give(self, waiting: _Waiting, ids: list[int]) -> None:
        """Hand ``on_tokens`` the ids of this job it has not had yet."""
        if self.on_tokens is not None and len(ids) > waiting.given:
            self.on_tokens(waiting.key, ids[waiting.given:])
            waiting.given = len(ids)

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
            batch_size=active, token_ids=ids, encoder_cached_pages=row.encoder_hits, prefix_cached_tokens=row.shared,
        )


def _prompt_len(waiting: _Waiting) -> int:
    assert waiting.prompt is not None
    return int(waiting.prompt["input_ids"].shape[1])


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _as_failure(exc: BaseException) -> BaseException:
    from glyphq.producer.errors import GlyphqError

    traceback.clear_frames(exc.__traceback__)
    if isinstance(exc, GlyphqError):
        return exc
    return ModelError(f"the model failed on this job: {type(exc).__name__}: {exc}")
