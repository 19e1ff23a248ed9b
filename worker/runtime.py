"""Per-process state of a GPU worker: preload in the parent, one engine per child, each job's steps around the engine.

``tasks`` calls into this module; it is the only worker module that knows about jobs and Redis.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glyphq.celeryconfig import settings
from glyphq.producer.images import decode_checked_image
from glyphq.producer.schema import JobMessage, check_task_id, document_text
from glyphq.producer.store import Store, blob_sha256
from glyphq.worker import metrics, recycle, status
from glyphq.worker.blocks import BLOCK_TOKENS
from glyphq.worker.errors import ModelError, PoisonJob

log = logging.getLogger(__name__)

#: How long a session's turn lock outlives the hard time limit (``GLYPHQ_TIME_LIMIT``): the main process
#: kills a child whose job passes that limit within ``tasks.scheduler.WATCH_S``.
SESSION_LOCK_MARGIN_S = 60

_serves_gpu = False
_engine: Any = None  # worker.engine.Engine, imported lazily so the parent never loads a model
_task_index = 0
#: Set in the parent while it forks a successor (``tasks.handover``): the pid of the child it replaces.
handover_from: int | None = None
_published_buckets: list[list[int]] = []


def preload_parent() -> None:
    """Import torch and transformers in the worker's main process so each child starts warm.

    CUDA is not touched here: a child forked from a process with a CUDA context cannot use CUDA.
    """
    global _serves_gpu
    _serves_gpu = True
    start = time.perf_counter()
    preload_modules()
    log.info("preloaded torch and transformers in %.1f s (CUDA untouched)", time.perf_counter() - start)


def preload_modules() -> None:
    """Import what every child needs, without touching CUDA.

    Not torch's compiler: importing inductor in the parent leaves its children unable to use CUDA
    ("Cannot re-initialize CUDA in forked subprocess"), so each child imports it (about 2 s).
    """
    import transformers  # noqa: F401

    from glyphq.worker import decode, engine  # noqa: F401  (the Auto classes, the static-decoding attention)


def serves_gpu() -> bool:
    """True in a worker whose main process called ``preload_parent`` (it consumes ``gpu`` or a ``gpu.<name>``)."""
    return _serves_gpu


def init_child() -> None:
    """Load the model in a fresh child. If it cannot load, stop the whole worker: the jobs stay queued.

    A successor (started while its predecessor still answers, see ``tasks.handover``) loads the model
    with a provisional KV cache and warms up on it, and returns (so billiard reports it ready) only
    once the predecessor has left and it holds its full cache (``_take_over_from``). Until then it
    takes no job, so one child answers at a time.
    """
    global _engine, _task_index, _last_gpu
    from glyphq.worker import engine, memory

    recycle.install()
    _task_index = 0
    start = time.perf_counter()
    predecessor = handover_from
    try:
        _engine = engine.load(settings, defer_cache=predecessor is not None)
        if _engine.slots is None:
            raise ModelError("GLYPHQ_DECODE=generate is for answering in process; a worker decodes over "
                             "the paged KV cache (GLYPHQ_DECODE=auto)")
    except Exception as exc:
        log.critical("model %r failed to load; stopping the worker, queued jobs stay queued", settings.model,
                     exc_info=True)
        # The parent reads this as it stops, and exits non-zero (tasks.signals).
        status.publish(model_error=f"{settings.model}: {type(exc).__name__}: {exc}"[:2000])
        os.kill(os.getppid(), signal.SIGTERM)
        raise
    load_s = time.perf_counter() - start
    warmed = _warm_up_for(predecessor) if predecessor is not None else ""
    # Everything alive now lives as long as the child; keep it out of every later collection.
    gc.collect()
    gc.freeze()
    if predecessor is not None:
        limit_s = settings.model_load_timeout_s
        waited_s = _wait_for(predecessor, deadline=start + limit_s - min(ALIVE_MARGIN_S, limit_s / 10))
        log.info("taking over from child %d: %s, then waited %.1f s for it to leave", predecessor, warmed, waited_s)
        _take_over_from(predecessor, until=start + limit_s - 1)
    _engine.cleanup()
    # The GPU guard's baseline: what this child holds loaded and warmed, and its encoder cache once full.
    decoder = getattr(_engine, "decoder", None)
    memory.set_baseline(_engine.device, decoder.encoder_cache.max_bytes if decoder is not None else 0)
    _last_gpu = memory.gpu_stats(_engine.device)  # the first results' reading, until the first tidy
    previous = status.read()
    status.publish(pid=os.getpid(), model=settings.model, model_loaded=True, device=str(_engine.device),
                   device_name=_device_name(_engine.device), task_index=0,
                   children=int(previous.get("children", 0)) + 1, gpu=_gpu_section(_engine.device),
                   pool=_count_pool(_engine))
    log.info("model ready: %s on %s as %s, loaded in %.1f s", settings.model, _engine.device, _engine.dtype, load_s)


#: Seconds (at most a tenth of the limit) a successor keeps in hand before ``GLYPHQ_MODEL_LOAD_TIMEOUT``,
#: after which Celery would kill it.
ALIVE_MARGIN_S = 10


def _warm_up_for(predecessor: int) -> str:
    """In a successor, while the predecessor still answers: on the provisional cache, capture (and so
    compile) the decode steps of batch 1 and 2 at each cache length the predecessor used, then answer a
    small warm-up batch. Returns what it did, for the log."""
    from glyphq.worker.decode import MIN_CACHE_LEN
    from glyphq.worker.paged import PROVISIONAL_ROWS

    started = time.perf_counter()
    decoder = getattr(_engine, "decoder", None)
    lengths = sorted({length for _, length in _predecessor_buckets()}) or [MIN_CACHE_LEN]
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
        _engine.cleanup()
    done = f"{warmed} decode step(s) captured on a provisional cache"
    if _alive(predecessor):  # else jobs are waiting: they warm this child up as well
        try:
            _engine.warm_up(settings.max_image_size)
            done += " and a warm-up batch answered"
        except Exception:  # the first real batch pays for it, as without a hand-over
            log.warning("the warm-up batch failed", exc_info=True)
            _engine.cleanup()
    return f"{done} in {time.perf_counter() - started:.1f} s"


def _predecessor_buckets() -> list[tuple[int, int]]:
    """The decode buckets the predecessor ran more than once, most used first (``decode_buckets``)."""
    return [(int(rows), int(length)) for rows, length in status.read().get("decode_buckets") or []]


#: Seconds a successor may spend, once its predecessor has left, capturing the predecessor's most used
#: decode steps on the full cache (the rest are captured when first used). The queue waits meanwhile.
TAKE_OVER_CAPTURE_S = 0.3
#: Seconds a successor retries its full cache while an exited predecessor's GPU memory is released.
FULL_CACHE_WAIT_S = 5.0


def _take_over_from(predecessor: int, until: float) -> None:
    """In a successor whose wait ended: take the full KV cache, then capture the predecessor's most
    used decode steps on it within ``TAKE_OVER_CAPTURE_S``. This is the part of a recycle the queue
    waits for, and the log says how long it took.

    If the full cache does not fit (the predecessor still runs at the end of the wait, or its memory is
    not given back by ``until``), this child leaves: the predecessor, or billiard's plain replacement
    once no child is left, carries on.
    """
    started = time.perf_counter()
    decoder = getattr(_engine, "decoder", None)
    if decoder is None or not decoder.provisional:
        return
    gone = not _alive(predecessor)
    retry_until = min(started + FULL_CACHE_WAIT_S, until) if gone else started
    while not decoder.allocate():
        if time.perf_counter() >= retry_until:
            need_gb = decoder.pool_bytes() / 1e9
            log.warning("the full KV cache (%.1f GB) does not fit %s child %d; this child leaves", need_gb,
                        "after" if gone else "beside", predecessor)
            logging.shutdown()
            os._exit(0)
        time.sleep(HANDOVER_POLL_S)
    allocated_s = time.perf_counter() - started
    captured = 0
    try:
        for rows, length in _predecessor_buckets():
            if time.perf_counter() - started >= TAKE_OVER_CAPTURE_S:
                break
            captured += decoder.warm(rows, length)
    except Exception:  # each step is captured when first used instead
        log.warning("capturing the decode steps on the full cache failed", exc_info=True)
        _engine.cleanup()
    log.info("full cache allocated and %d decode step(s) captured in %.2f s %s child %d%s (allocation %.2f s)",
             captured, time.perf_counter() - started, "after" if gone else "beside", predecessor,
             " left" if gone else ", which still runs", allocated_s)


def _wait_for(predecessor: int, deadline: float) -> float:
    """In a successor: wait until the predecessor has left; return the seconds waited. Past ``deadline``
    (an idle queue keeps it alive) stop waiting: both take jobs until it leaves at its own count."""
    started = time.perf_counter()
    while _alive(predecessor):
        if time.perf_counter() > deadline:
            log.warning("child %d is still running; this child takes jobs too until it leaves", predecessor)
            break
        time.sleep(HANDOVER_POLL_S)
    return time.perf_counter() - started


HANDOVER_POLL_S = 0.005


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


def _loaded_engine() -> Any:
    if _engine is None:
        init_child()
    return _engine


@dataclass
class _Fetched:
    """A job whose message checked out and whose blobs are fetched, ready to be answered."""

    job_id: str
    job: JobMessage
    images: Callable[[], list[Any]]  # decodes the pages (worker.engine.EngineJob.images)
    text_tokens: int | None
    fetch_s: float
    task_index: int


def engine() -> Any:
    """This child's engine (``worker.engine.Engine``), loaded on first use."""
    return _loaded_engine()


def earlier_runs(job_id: str) -> int:
    """How many times a worker has started ``job_id`` (``glyphq:runs:<id>``)."""
    return Store(settings).runs(job_id)


def room() -> int:
    """How many more jobs this child answers before it is replaced (0 once a recycle is requested)."""
    return 0 if recycle.requested() else max(0, settings.max_tasks_per_child - _task_index)


def may_hand_over() -> bool:
    """Whether this child's successor may load beside it now: no memory guard asked for its replacement
    (a second child beside one over its memory limit would add to it; billiard replaces that one once
    it has left), and the GPU has room (``room_for_a_successor``). A child that has only started its
    last job (``GLYPHQ_MAX_TASKS_PER_CHILD``) may: its successor is due then."""
    return recycle.requested() in (None, "tasks") and room_for_a_successor()


def room_for_a_successor() -> bool:
    """Whether a successor could load beside this child now (GPU memory; always True on the CPU)."""
    from glyphq.worker import memory
    from glyphq.worker.paged import PROVISIONAL_TOKENS

    decoder = getattr(_engine, "decoder", None)
    if _engine is None or decoder is None or not decoder.successor_fits:  # the card has no room (logged at start)
        return False
    return memory.room_for_a_successor(_engine.device, decoder.pool_bytes(),
                                       decoder.pool_bytes(min(PROVISIONAL_TOKENS, decoder.pool_tokens)))


def fetch(eng: Any, job_id: str, raw_job: object) -> _Fetched:
    """Count the job as this child's next (its task index) and one more run of it (the poison guard),
    check its message and fetch its images and text. Raises what fails the job."""
    global _task_index
    _task_index += 1
    if _task_index == 1:  # the end of a recycle as an operator sees it: this child is answering now
        log.info("first generate of this child starts")
    return _fetch(eng, Store(settings), job_id, raw_job)


def history(fetched: _Fetched) -> list[dict[str, str]]:
    """The earlier turns of the job's session (read when the job starts, after the turn before it ended),
    or, without a session, the turns its message carries."""
    session = fetched.job.session
    if session:
        return Store(settings).session_turns(session, settings.history_turns)
    return [dict(turn) for turn in fetched.job.history]


def engine_job(fetched: _Fetched, turns: list[dict[str, str]]) -> Any:
    """The ``EngineJob`` of a fetched job."""
    from glyphq.worker.engine import EngineJob

    job = fetched.job
    return EngineJob(images=fetched.images, question=job.question, max_new_tokens=job.max_new_tokens, history=turns,
                     thinking_budget=job.thinking_budget or None, document=job.text_key is not None,
                     sources=[blob_sha256(key) for key in job.image_keys], cache_scope=job.cache_scope)


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


def record_turn(fetched: _Fetched, result: Any) -> None:
    """Append an answered job's turn to its session."""
    if fetched.job.session:
        Store(settings).append_turn(fetched.job.session, fetched.job.question, result.answer)


def output(fetched: _Fetched, result: Any, turns: list[dict[str, str]], started: float) -> dict[str, Any]:
    """The result dict of an answered job (see README, "Results")."""
    return _output(fetched, result, turns, started, 0.0, _last_gpu)


def after_job() -> None:
    """After each job ended: publish the task count; ask for a recycle at ``GLYPHQ_MAX_TASKS_PER_CHILD``."""
    status.publish(task_index=_task_index, last_job_at=time.time())
    recycle.check_memory()
    if _task_index >= settings.max_tasks_per_child:
        recycle.request("tasks", f"{_task_index} jobs (GLYPHQ_MAX_TASKS_PER_CHILD)")


_last_gpu: dict[str, float] | None = None


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


#: What this child has added to ``/metrics``' counters so far: preemptions, and each cache's events.
_counted: dict[str, int] = {}
#: A cache's events in ``/metrics`` and the figures of ``pool_section`` that count them.
_EVENTS = {"hit": "hits", "miss": "misses", "eviction": "evictions"}


def _since_counted(name: str, total: int) -> int:
    """How much ``total`` (a count since this child started) has grown since it was last counted."""
    grown = total - _counted.get(name, 0)
    _counted[name] = total
    return grown


def _count_pool(eng: Any) -> dict[str, Any] | None:
    """The pool's figures (``pool_section``), set in ``/metrics`` too, for the worker status."""
    pool = pool_section(eng)
    if pool is not None:
        metrics.kv_pool(pool["tokens"], pool["blocks_used"], pool["blocks_free"],
                        _since_counted("preemptions", pool["preemptions"]))
        for cache, size in (("prefix", pool["prefix"]["blocks"]), ("encoder", pool["encoder"]["bytes"])):
            events = {event: _since_counted(f"{cache}.{event}", pool[cache][field]) for event, field in _EVENTS.items()}
            metrics.page_cache(cache, size, events)
    return pool


def tidy(eng: Any, idle: bool = True) -> float:
    """Free what the running batch no longer uses, read GPU memory (the ``gpu`` of the results that
    follow), check the GPU guard, and publish GPU memory, the KV cache pool's use and the decode steps
    in use. The child calls it once nothing is
    running (``idle``: the peak measurement starts again), and every ``tasks.serve.TIDY_S`` seconds
    while its batch runs. Returns the seconds the cleanup took."""
    from glyphq.worker import memory

    global _last_gpu
    cleanup_s = float(eng.cleanup())
    gpu = memory.gpu_stats(eng.device)
    _last_gpu = gpu
    _record_gpu_memory(eng.device, gpu)
    status.publish(gpu=_gpu_section(eng.device), pool=_count_pool(eng))
    _publish_decode_buckets(eng)
    if idle:  # a busy child keeps its peak since it last went idle: a successor must fit beside that
        memory.reset_peak(eng.device)
    return cleanup_s


def answer_alone(raw_job: object, job_id: str) -> dict[str, Any]:
    """Answer one job outside the worker's running batch (a task body called directly, e.g. eagerly)."""
    eng = engine()
    fetched = fetch(eng, job_id, raw_job)
    turns = history(fetched)
    started = time.time()
    (result,) = eng.answer([engine_job(fetched, turns)], settings.max_image_size)
    record_turn(fetched, result)
    tidy(eng)
    after_job()
    return output(fetched, result, turns, started)


def _fetch(eng: Any, store: Store, job_id: str, raw_job: object) -> _Fetched:
    """Check the job (poison guard, message) and fetch its images and text; raise what fails it."""
    check_task_id(job_id)
    runs = store.count_run(job_id)
    if runs > settings.max_deliveries:
        raise PoisonJob(
            f"job {job_id} was delivered {runs} times and the worker child died during each of the "
            f"previous {runs - 1} runs (GLYPHQ_MAX_DELIVERIES={settings.max_deliveries}); not running it again"
        )
    job = JobMessage.from_dict(raw_job, settings)
    start = time.perf_counter()
    blobs = [store.require_blob("image_keys", key, settings.max_image_bytes) for key in job.image_keys]

    def images() -> list[Any]:  # decoded (and checked) in the running batch's page threads
        return [decode_checked_image(blob, settings) for blob in blobs]

    text_tokens = None
    if job.text_key is not None:
        text_tokens = eng.count_text_tokens(document_text(store, job.text_key, settings))
    return _Fetched(job_id, job, images, text_tokens, time.perf_counter() - start, _task_index)


def _output(fetched: _Fetched, result: Any, history: list[dict[str, str]], started: float, cleanup_s: float,
            gpu: dict[str, float] | None) -> dict[str, Any]:
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
        "model": settings.model,
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


def _record_gpu_memory(device: Any, gpu: dict[str, float] | None) -> None:
    """After cleanup: set the GPU memory gauges, and ask for a recycle when the GPU guard is crossed."""
    from glyphq.worker import memory

    if gpu is not None:
        metrics.gpu_memory(memory.allocated_bytes(device), gpu["reserved_mb"] * memory.MB)
    limit = memory.gpu_guard_limit_mb(device, settings.gpu_guard_mb)
    if gpu is not None and limit is not None and gpu["reserved_mb"] > limit:
        recycle.request("gpu", f"GPU reserved {gpu['reserved_mb']:.0f} MB after cleanup > guard {limit:.0f} MB")


def _publish_decode_buckets(eng: Any) -> None:
    """Tell a successor which decode steps to capture before it takes over (see ``buckets_in_use``)."""
    global _published_buckets
    decoder = getattr(eng, "decoder", None)
    if decoder is None:
        return
    buckets = [list(shape) for shape in decoder.buckets_in_use()]
    if buckets != _published_buckets:
        _published_buckets = buckets
        status.publish(decode_buckets=buckets)


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
