"""One engine child's life, and each job's steps around the engine.

:class:`Runtime` is what a GPU worker's engine child is: it loads the model (a successor first warms up
beside its predecessor, then takes over its KV cache), fetches and checks each job, answers it through
the engine, tidies up, and says when the child should be replaced (``GLYPHQ_MAX_MEMORY_PER_CHILD_MB``,
the GPU guard). The main process counts the jobs a child is handed (``GLYPHQ_MAX_TASKS_PER_CHILD``).

``tasks`` calls into this module; it is the only worker module that knows about jobs and Redis. It
imports nothing from ``tasks``.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from glyphq.celeryconfig import Settings, settings
from glyphq.producer.images import decode_checked_image
from glyphq.producer.schema import JobMessage, check_task_id, document_text
from glyphq.producer.store import Store, blob_sha256
from glyphq.worker import metrics, status
from glyphq.worker.blocks import BLOCK_TOKENS
from glyphq.worker.errors import ModelError, NoRoomToTakeOver, PoisonJob

log = logging.getLogger(__name__)

#: How long a session's turn lock outlives the hard time limit (``GLYPHQ_TIME_LIMIT``): the main process
#: kills a child whose job passes that limit within ``tasks.scheduler.WATCH_S``.
SESSION_LOCK_MARGIN_S = 60
#: Seconds (at most a tenth of the limit) a successor keeps in hand before ``GLYPHQ_MODEL_LOAD_TIMEOUT``,
#: after which the main process would kill it.
ALIVE_MARGIN_S = 10
#: Seconds a successor may spend, once its predecessor has left, capturing the predecessor's most used
#: decode steps on the full cache (the rest are captured when first used). The queue waits meanwhile.
TAKE_OVER_CAPTURE_S = 0.3
#: Seconds a successor retries its full cache while an exited predecessor's GPU memory is released.
FULL_CACHE_WAIT_S = 5.0
HANDOVER_POLL_S = 0.005
#: What a cache's events are called in ``/metrics``, and the figures of ``pool_section`` that count them.
_EVENTS = {"hit": "hits", "miss": "misses", "eviction": "evictions"}


#: What the worker's main process imports for every child (``preload_modules``): transformers, its Auto
#: classes (``worker.engine``) and the static-decoding attention (``worker.decode``).
PRELOADED_MODULES = ("transformers", "glyphq.worker.decode", "glyphq.worker.engine")


def preload_modules() -> None:
    """Import what every child needs, without touching CUDA (the worker's main process does, once).

    Not torch's compiler: importing inductor in the parent leaves its children unable to use CUDA
    ("Cannot re-initialize CUDA in forked subprocess"), so each child imports it (about 2 s).
    """
    for name in PRELOADED_MODULES:
        importlib.import_module(name)


@dataclass
class Fetched:
    """A job whose message checked out and whose blobs are fetched, ready to be answered."""

    job_id: str
    job: JobMessage
    images: Callable[[], list[Any]]  # decodes the pages (worker.engine.EngineJob.images)
    text_tokens: int | None
    fetch_s: float
    task_index: int


class Runtime:
    """One engine child's life: load, warm, take over, answer, tidy, leave.

    ``on_recycle(reason, detail)`` is called once when a memory guard asks for this child's
    replacement (``rss`` or ``gpu``); from then on :attr:`leaving` names the reason.
    """

    def __init__(self, config: Settings = settings,
                 on_recycle: Callable[[str, str], None] | None = None) -> None:
        self.settings = config
        self.on_recycle = on_recycle
        self.engine: Any = None  # worker.engine.Engine, imported lazily so the parent never loads a model
        self.task_index = 0
        self.leaving: str | None = None
        self.last_gpu: dict[str, float] | None = None
        self._published_buckets: list[list[int]] = []
        self._counted: dict[str, int] = {}  # what this child has added to /metrics' counters so far

    # -- load, warm, take over ------------------------------------------------------------------

    def load(self, predecessor: int | None = None, buckets: Sequence[tuple[int, int]] = ()) -> None:
        """Load the model. Raises what failed (the child reports it and the worker stops).

        A successor (``predecessor`` still answers) loads with a provisional KV cache, warms up on it
        with the predecessor's decode ``buckets``, waits for the predecessor to leave, and then takes
        its full cache (raises ``NoRoomToTakeOver`` when that does not fit).
        """
        from glyphq.worker import engine, memory

        start = time.perf_counter()
        self.engine = engine.load(self.settings, defer_cache=predecessor is not None)
        if self.engine.slots is None:
            raise ModelError("GLYPHQ_DECODE=generate is for answering in process; a worker decodes over "
                             "the paged KV cache (GLYPHQ_DECODE=auto)")
        load_s = time.perf_counter() - start
        warmed = self._warm_up_for(predecessor, buckets) if predecessor is not None else ""
        # Everything alive now lives as long as the child; keep it out of every later collection.
        gc.collect()
        gc.freeze()
        if predecessor is not None:
            limit_s = self.settings.model_load_timeout_s
            waited_s = _wait_for(predecessor, deadline=start + limit_s - min(ALIVE_MARGIN_S, limit_s / 10))
            log.info("taking over from child %d: %s, then waited %.1f s for it to leave", predecessor, warmed,
                     waited_s)
            self._take_over_from(predecessor, buckets, until=start + limit_s - 1)
        self.engine.cleanup()
        # The GPU guard's baseline: what this child holds loaded and warmed, and its encoder cache once full.
        decoder = getattr(self.engine, "decoder", None)
        memory.set_baseline(self.engine.device, decoder.encoder_cache.max_bytes if decoder is not None else 0)
        self.last_gpu = memory.gpu_stats(self.engine.device)  # the first results' reading, until the first tidy
        status.publish(pid=os.getpid(), model=self.settings.model, model_loaded=True, device=str(self.engine.device),
                       device_name=_device_name(self.engine.device), task_index=0,
                       gpu=_gpu_section(self.engine.device), pool=self._count_pool())
        log.info("model ready: %s on %s as %s, loaded in %.1f s", self.settings.model, self.engine.device,
                 self.engine.dtype, load_s)

    def _warm_up_for(self, predecessor: int, buckets: Sequence[tuple[int, int]]) -> str:
        """In a successor, while the predecessor still answers: on the provisional cache, capture (and so
        compile) the decode steps of batch 1 and 2 at each cache length the predecessor used, then answer a
        small warm-up batch. Returns what it did, for the log."""
        from glyphq.worker.decode import MIN_CACHE_LEN
        from glyphq.worker.paged import PROVISIONAL_ROWS

        started = time.perf_counter()
        decoder = getattr(self.engine, "decoder", None)
        lengths = sorted({length for _, length in buckets}) or [MIN_CACHE_LEN]
        # Batch 2 first: dynamo specialises batch 1 apart, and every step of a busy queue has more rows.
        shapes = [(rows, length) for length in lengths for rows in range(PROVISIONAL_ROWS, 0, -1)]
        warmed = 0
        try:
            for rows, length in shapes:
                if decoder is None or not _alive(predecessor):  # jobs are waiting: compiled when first used
                    break
                warmed += decoder.warm(rows, length)
        except Exception:  # e.g. out of memory beside the predecessor: compiled when first used instead
            log.warning("compiling the decode steps failed", exc_info=True)
            self.engine.cleanup()
        done = f"{warmed} decode step(s) captured on a provisional cache"
        if _alive(predecessor):  # else jobs are waiting: they warm this child up as well
            try:
                self.engine.warm_up(self.settings.max_image_size)
                done += " and a warm-up batch answered"
            except Exception:  # the first real batch pays for it, as without a hand-over
                log.warning("the warm-up batch failed", exc_info=True)
                self.engine.cleanup()
        return f"{done} in {time.perf_counter() - started:.1f} s"

    def _take_over_from(self, predecessor: int, buckets: Sequence[tuple[int, int]], until: float) -> None:
        """In a successor whose wait ended: take the full KV cache, then capture the predecessor's most
        used decode steps on it within ``TAKE_OVER_CAPTURE_S``. This is the part of a recycle the queue
        waits for, and the log says how long it took.

        Raises ``NoRoomToTakeOver`` if the full cache does not fit (the predecessor still runs at the end
        of the wait, or its memory is not given back by ``until``): the predecessor, or the plain
        replacement the main process starts once it has left, carries on.
        """
        started = time.perf_counter()
        decoder = getattr(self.engine, "decoder", None)
        if decoder is None or not decoder.provisional:
            return
        gone = not _alive(predecessor)
        retry_until = min(started + FULL_CACHE_WAIT_S, until) if gone else started
        while not decoder.allocate():
            if time.perf_counter() >= retry_until:
                raise NoRoomToTakeOver(f"the full KV cache ({decoder.pool_bytes() / 1e9:.1f} GB) does not fit "
                                       f"{'after' if gone else 'beside'} child {predecessor}")
            time.sleep(HANDOVER_POLL_S)
        allocated_s = time.perf_counter() - started
        captured = 0
        try:
            for rows, length in buckets:
                if time.perf_counter() - started >= TAKE_OVER_CAPTURE_S:
                    break
                captured += decoder.warm(rows, length)
        except Exception:  # each step is captured when first used instead
            log.warning("capturing the decode steps on the full cache failed", exc_info=True)
            self.engine.cleanup()
        log.info("full cache allocated and %d decode step(s) captured in %.2f s %s child %d%s (allocation %.2f s)",
                 captured, time.perf_counter() - started, "after" if gone else "beside", predecessor,
                 " left" if gone else ", which still runs", allocated_s)

    # -- one job --------------------------------------------------------------------------------

    def fetch(self, job_id: str, raw_job: object) -> Fetched:
        """Count the job as this child's next (its task index) and one more run of it (the poison guard),
        check its message and fetch its images and text. Raises what fails the job."""
        self.task_index += 1
        if self.task_index == 1:  # the end of a recycle as an operator sees it: this child is answering now
            log.info("first generate of this child starts")
        return _fetch(self.engine, Store(self.settings), self.settings, job_id, raw_job, self.task_index)

    def history(self, fetched: Fetched) -> list[dict[str, str]]:
        """The earlier turns of the job's session (read when the job starts, after the turn before it ended),
        or, without a session, the turns its message carries."""
        session = fetched.job.session
        if session:
            return Store(self.settings).session_turns(session, self.settings.history_turns)
        return [dict(turn) for turn in fetched.job.history]

    @staticmethod
    def engine_job(fetched: Fetched, turns: list[dict[str, str]]) -> Any:
        """The ``EngineJob`` of a fetched job."""
        from glyphq.worker.engine import EngineJob

        job = fetched.job
        return EngineJob(images=fetched.images, question=job.question, max_new_tokens=job.max_new_tokens,
                         history=turns, thinking_budget=job.thinking_budget or None, document=job.text_key is not None,
                         sources=[blob_sha256(key) for key in job.image_keys], cache_scope=job.cache_scope)

    def record_turn(self, fetched: Fetched, result: Any) -> None:
        """Append an answered job's turn to its session."""
        if fetched.job.session:
            Store(self.settings).append_turn(fetched.job.session, fetched.job.question, result.answer)

    def output(self, fetched: Fetched, result: Any, turns: list[dict[str, str]], started: float) -> dict[str, Any]:
        """The result dict of an answered job (see README, "Results")."""
        return _output(fetched, result, turns, started, 0.0, self.last_gpu, self.settings)

    def after_job(self) -> None:
        """After each job ended: publish the task count, and check ``GLYPHQ_MAX_MEMORY_PER_CHILD_MB``."""
        status.publish(task_index=self.task_index, last_job_at=time.time())
        limit_kb = self.settings.max_memory_per_child_mb * 1024
        rss_kb = current_rss_kb()
        if limit_kb and rss_kb > limit_kb:
            self.request_recycle("rss", f"resident memory {rss_kb // 1024} MB > "
                                        f"GLYPHQ_MAX_MEMORY_PER_CHILD_MB={limit_kb // 1024}")

    def request_recycle(self, reason: str, detail: str) -> None:
        """Replace this child: it starts no new job and leaves once the ones it runs have ended."""
        if self.leaving is not None:
            return
        self.leaving = reason
        log.info("replacing this worker child after the jobs it runs (%s): %s", reason, detail)
        if self.on_recycle is not None:
            self.on_recycle(reason, detail)

    def successor_fits(self) -> bool:
        """Whether this child's successor may load beside it now: no memory guard asked for its replacement
        (a second child beside one over its memory limit would add to it; it is replaced once it has
        left), and the GPU has room. Always True on the CPU."""
        from glyphq.worker import memory
        from glyphq.worker.paged import PROVISIONAL_TOKENS

        decoder = getattr(self.engine, "decoder", None)
        if self.leaving is not None or decoder is None or not decoder.successor_fits:
            return False
        return memory.room_for_a_successor(self.engine.device, decoder.pool_bytes(),
                                           decoder.pool_bytes(min(PROVISIONAL_TOKENS, decoder.pool_tokens)))

    def buckets_in_use(self) -> list[tuple[int, int]]:
        """The decode steps this child ran more than once, most used first: what its successor warms."""
        decoder = getattr(self.engine, "decoder", None)
        return [] if decoder is None else [(int(rows), int(length)) for rows, length in decoder.buckets_in_use()]

    # -- tidy -----------------------------------------------------------------------------------

    def tidy(self, idle: bool = True) -> float:
        """Free what the running batch no longer uses, read GPU memory (the ``gpu`` of the results that
        follow), check the GPU guard, and publish GPU memory and the KV cache pool's use. The child calls
        it once nothing is running (``idle``: the peak measurement starts again), and every
        ``tasks.serve.TIDY_S`` seconds while its batch runs. Returns the seconds the cleanup took."""
        from glyphq.worker import memory

        eng = self.engine
        cleanup_s = float(eng.cleanup())
        gpu = memory.gpu_stats(eng.device)
        self.last_gpu = gpu
        if gpu is not None:
            metrics.gpu_memory(memory.allocated_bytes(eng.device), gpu["reserved_mb"] * memory.MB)
        limit = memory.gpu_guard_limit_mb(eng.device, self.settings.gpu_guard_mb)
        if gpu is not None and limit is not None and gpu["reserved_mb"] > limit:
            self.request_recycle("gpu", f"GPU reserved {gpu['reserved_mb']:.0f} MB after cleanup > guard "
                                        f"{limit:.0f} MB")
        status.publish(gpu=_gpu_section(eng.device), pool=self._count_pool())
        buckets = [list(shape) for shape in self.buckets_in_use()]
        if buckets != self._published_buckets:
            self._published_buckets = buckets
            status.publish(decode_buckets=buckets)
        if idle:  # a busy child keeps its peak since it last went idle: a successor must fit beside that
            memory.reset_peak(eng.device)
        return cleanup_s

    def _count_pool(self) -> dict[str, Any] | None:
        """The pool's figures (``pool_section``), set in ``/metrics`` too, for the worker status."""
        pool = pool_section(self.engine)
        if pool is not None:
            metrics.kv_pool(pool["tokens"], pool["blocks_used"], pool["blocks_free"],
                            self._since_counted("preemptions", pool["preemptions"]))
            for cache, size in (("prefix", pool["prefix"]["blocks"]), ("encoder", pool["encoder"]["bytes"])):
                events = {event: self._since_counted(f"{cache}.{event}", pool[cache][field])
                          for event, field in _EVENTS.items()}
                metrics.page_cache(cache, size, events)
        return pool

    def _since_counted(self, name: str, total: int) -> int:
        """How much ``total`` (a count since this child started) has grown since it was last counted."""
        grown = total - self._counted.get(name, 0)
        self._counted[name] = total
        return grown


def pool_section(eng: Any) -> dict[str, Any] | None:
    """The KV cache pool's figures, for the worker status (Flower, ``glyphq health``) and ``/metrics``:
    its tokens, bytes and blocks, blocks in use and free (kept blocks no row holds count as free), rows
    preempted so far in this child, whether a successor fits beside it, and its two caches of pages
    read before: ``prefix`` (kept blocks, and the blocks shared, looked up in vain and evicted so far)
    and ``encoder`` (pages and bytes kept, hits, misses and evictions). None without a paged decoder."""
    decoder = getattr(eng, "decoder", None)
    if decoder is None:
        return None
    kept = decoder.pool.kept_blocks
    return {"tokens": decoder.pool_tokens, "bytes": decoder.pool_bytes(decoder.pool_tokens),
            "blocks": decoder.pool.capacity, "blocks_used": decoder.pool.used, "blocks_free": decoder.pool.free,
            "preemptions": decoder.preemptions, "successor_fits": decoder.successor_fits,
            "prefix": {"enabled": decoder.prefix_cache, "blocks": kept, "tokens": kept * BLOCK_TOKENS,
                       "hits": decoder.prefix_hits, "misses": decoder.prefix_misses,
                       "evictions": decoder.pool.evictions},
            "encoder": decoder.encoder_cache.figures()}


# -- Redis-side steps shared by every child -------------------------------------------------------

def earlier_runs(job_id: str) -> int:
    """How many times a worker has started ``job_id`` (``glyphq:runs:<id>``)."""
    return Store(settings).runs(job_id)


def lock_session(session: str, job_id: str) -> str:
    """Take ``session``'s turn lock for ``job_id`` before its turn starts, unless another turn holds it;
    the id of the job holding it now (``job_id`` once taken).

    The lock expires ``SESSION_LOCK_MARGIN_S`` after the hard time limit, which no turn outlives, so
    the lock of a child that died frees itself.
    """
    return Store(settings).lock_session(session, job_id, settings.time_limit_s + SESSION_LOCK_MARGIN_S)


def unlock_session(session: str, job_id: str) -> None:
    """Release ``session``'s turn lock once ``job_id``'s turn has ended (and was recorded, if answered)."""
    Store(settings).unlock_session(session, job_id)


def current_rss_kb() -> int:
    """This process's resident memory now, in kB (not the peak: loading a model peaks far above what a
    child holds afterwards, and a peak-based guard would replace the child after every job)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:  # no /proc
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# -- a job answered in process ---------------------------------------------------------------------

class _InProcess:
    runtime: Runtime | None = None


def answer_alone(raw_job: object, job_id: str) -> dict[str, Any]:
    """Answer one job outside a worker's running batch (a task body called directly, e.g. eagerly)."""
    if _InProcess.runtime is None:
        from glyphq.worker import engine

        life = Runtime()
        life.engine = engine.load(settings)
        _InProcess.runtime = life
    life = _InProcess.runtime
    fetched = life.fetch(job_id, raw_job)
    turns = life.history(fetched)
    started = time.time()
    (result,) = life.engine.answer([life.engine_job(fetched, turns)], settings.max_image_size)
    life.record_turn(fetched, result)
    life.tidy()
    life.after_job()
    return life.output(fetched, result, turns, started)


# -- helpers --------------------------------------------------------------------------------------

def _wait_for(predecessor: int, deadline: float) -> float:
    """In a successor: wait until the predecessor has left; return the seconds waited. Past ``deadline``
    (an idle queue keeps it alive) stop waiting: it takes its full cache beside the predecessor, if that
    fits, and the predecessor is handed no more jobs."""
    started = time.perf_counter()
    while _alive(predecessor):
        if time.perf_counter() > deadline:
            log.warning("child %d is still running; this child takes jobs too until it leaves", predecessor)
            break
        time.sleep(HANDOVER_POLL_S)
    return time.perf_counter() - started


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has left: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: a zombie counts as alive until the parent reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def _fetch(eng: Any, store: Store, config: Settings, job_id: str, raw_job: object, task_index: int) -> Fetched:
    """Check the job (poison guard, message) and fetch its images and text; raise what fails it."""
    check_task_id(job_id)
    runs = store.count_run(job_id)
    if runs > config.max_deliveries:
        raise PoisonJob(
            f"job {job_id} was delivered {runs} times and the worker child died during each of the "
            f"previous {runs - 1} runs (GLYPHQ_MAX_DELIVERIES={config.max_deliveries}); not running it again"
        )
    job = JobMessage.from_dict(raw_job, config)
    start = time.perf_counter()
    blobs = [store.require_blob("image_keys", key, config.max_image_bytes) for key in job.image_keys]

    def images() -> list[Any]:  # decoded (and checked) in the running batch's page threads
        return [decode_checked_image(blob, config) for blob in blobs]

    text_tokens = None
    if job.text_key is not None:
        text_tokens = eng.count_text_tokens(document_text(store, job.text_key, config))
    return Fetched(job_id, job, images, text_tokens, time.perf_counter() - start, task_index)


def _output(fetched: Fetched, result: Any, history: list[dict[str, str]], started: float, cleanup_s: float,
            gpu: dict[str, float] | None, config: Settings) -> dict[str, Any]:
    """The result dict of one answered job (see README, "Results")."""
    job = fetched.job
    single = len(job.image_keys) == 1 and job.text_key is None
    output: dict[str, Any] = {
        "job_id": fetched.job_id,
        "answer": result.answer,
        "reasoning": result.reasoning,
        "finish_reason": result.finish_reason,
        "thinking_tokens": result.thinking_tokens,
        "thinking_budget_hit": result.thinking_budget_hit,
        "model": config.model,
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        "vision_tokens": result.vision_tokens,
        "image_size": list(job.image_sizes[0]) if single else [list(s) for s in job.image_sizes],
        "image_size_used": (list(result.image_sizes_used[0]) if single
                            else [list(s) for s in result.image_sizes_used]),
        "timings": {
            "queue_s": round(max(0.0, started - job.submitted_at), 4),
            "preprocess_s": round(fetched.fetch_s + result.preprocess_s, 4),
            "generate_s": round(result.generate_s, 4),
            "cleanup_s": round(cleanup_s, 4),
            "encoder_cached_pages": result.encoder_cached_pages,
            "prefix_cached_tokens": result.prefix_cached_tokens,
        },
        "gpu": gpu,
        "worker": {"pid": os.getpid(), "task_index": fetched.task_index, "batch_size": result.batch_size},
        "session": {"id": job.session, "turns_used": len(history)} if job.session else None,
    }
    if job.text_key is not None:
        output["timings"]["render_s"] = job.render_s
        output["pages"] = len(job.image_keys)
        output["text_tokens"] = fetched.text_tokens
        output["compression"] = (round(fetched.text_tokens / result.vision_tokens, 2)
                                 if fetched.text_tokens is not None and result.vision_tokens else None)
    return output


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _gpu_section(device: Any) -> dict[str, float] | None:
    """Allocated, reserved and peak GPU memory in MB, for the worker status; None on CPU."""
    from glyphq.worker import memory

    stats = memory.gpu_stats(device)
    if stats is None:
        return None
    return {"allocated_mb": round(memory.allocated_bytes(device) / memory.MB, 1), **stats}
