"""Per-process state of a GPU worker: preload in the parent, one engine per child, jobs answered in batches.

``tasks`` calls into this module; it is the only worker module that knows about jobs and Redis.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from glyphq.celeryconfig import settings
from glyphq.producer.errors import GlyphqError
from glyphq.producer.images import decode_checked_image
from glyphq.producer.schema import JobMessage, check_task_id, document_text
from glyphq.producer.store import Store
from glyphq.worker import metrics, recycle, status
from glyphq.worker.errors import ModelError, PoisonJob

log = logging.getLogger(__name__)

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
    """True in a worker whose main process called ``preload_parent`` (it consumes the ``gpu`` queue)."""
    return _serves_gpu


def init_child() -> None:
    """Load the model in a fresh child. If it cannot load, stop the whole worker: the jobs stay queued.

    A successor (started while its predecessor still answers, see ``tasks.handover``) also captures
    the decode steps its predecessor used, and returns (so billiard reports it ready) only once the
    predecessor has left. Until then it takes no job, so one child answers at a time.
    """
    global _engine, _task_index
    from glyphq.worker import engine

    recycle.install()
    _task_index = 0
    start = time.perf_counter()
    predecessor = handover_from
    try:
        _engine = engine.load(settings)
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
    previous = status.read()
    status.publish(pid=os.getpid(), model=settings.model, model_loaded=True, device=str(_engine.device),
                   device_name=_device_name(_engine.device), task_index=0,
                   children=int(previous.get("children", 0)) + 1, gpu=_gpu_section(_engine.device))
    log.info("model ready: %s on %s as %s, loaded in %.1f s", settings.model, _engine.device, _engine.dtype, load_s)


#: Seconds (at most a tenth of the limit) a successor keeps in hand before ``GLYPHQ_MODEL_LOAD_TIMEOUT``,
#: after which Celery would kill it.
ALIVE_MARGIN_S = 10


def _warm_up_for(predecessor: int) -> str:
    """In a successor, while the predecessor still answers: capture (and compile) the decode steps it
    used, most used first, then answer a small warm-up batch. Returns what it did, for the log."""
    started = time.perf_counter()
    decoder = getattr(_engine, "decoder", None)
    warmed = 0
    for rows, length in status.read().get("decode_buckets") or []:
        if decoder is None or not _alive(predecessor):
            break
        warmed += decoder.warm(int(rows), int(length))
    done = f"{warmed} decode step(s) captured"
    if _alive(predecessor):  # else jobs are waiting: they warm this child up as well
        try:
            _engine.warm_up(settings.max_image_size)
            done += " and a warm-up batch answered"
        except Exception:  # the first real batch pays for it, as without a hand-over
            log.warning("the warm-up batch failed", exc_info=True)
            _engine.cleanup()
    return f"{done} in {time.perf_counter() - started:.1f} s"


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
    images: list[Any]
    text_tokens: int | None
    fetch_s: float
    task_index: int


_prepared: dict[str, Any] = {}  # job id -> result dict or the exception it fails with


def prepare(jobs: list[tuple[str, object]]) -> None:
    """Answer ``(job id, job message)`` pairs together; ``answer`` then hands out each job's outcome."""
    _prepared.update(answer_batch(jobs))


def forget_prepared() -> None:
    """Drop outcomes no task picked up (a job Celery skipped, e.g. a duplicate)."""
    _prepared.clear()


def room() -> int:
    """How many more jobs this child answers before it is replaced (0 once a recycle is requested)."""
    return 0 if recycle.requested() else max(0, settings.max_tasks_per_child - _task_index)


def room_for_a_successor() -> bool:
    """Whether a successor could load beside this child now (GPU memory; always True on the CPU)."""
    from glyphq.worker import memory

    return _engine is not None and memory.room_for_a_successor(_engine.device)


def answer(raw_job: object, job_id: str) -> dict[str, Any]:
    """The result dict of one job: prepared with its batch, or answered alone. Raises its failure."""
    outcome = _prepared.pop(job_id) if job_id in _prepared else answer_batch([(job_id, raw_job)])[job_id]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[no-any-return]


def answer_batch(jobs: list[tuple[str, object]]) -> dict[str, Any]:
    """Answer several jobs with as few batched generates as possible.

    Returns each job id's result dict, or the exception that job fails with: a bad message or image,
    a missing blob or a model error fails its own job only. Jobs of one session run in turn, so each
    sees the turns before it. Cleans up once for the batch, whatever happens; then asks for a recycle
    once this child has answered ``GLYPHQ_MAX_TASKS_PER_CHILD`` jobs.
    """
    from glyphq.worker import memory

    global _task_index
    started = time.time()
    store = Store(settings)
    eng = _loaded_engine()
    outcomes: dict[str, Any] = {}
    ready: list[_Fetched] = []
    for job_id, raw_job in jobs:
        _task_index += 1
        try:
            ready.append(_fetch(eng, store, job_id, raw_job))
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)
            outcomes[job_id] = exc
    memory.reset_peak(eng.device)
    if ready and ready[0].task_index == 1:
        # The end of a recycle as an operator sees it: this child is answering now.
        log.info("first generate of this child starts (%d job(s))", len(ready))
    answered: list[tuple[_Fetched, Any, list[dict[str, str]]]] = []
    try:
        for turn in _session_turns(ready):
            histories = [store.session_turns(f.job.session, settings.history_turns) if f.job.session else []
                         for f in turn]
            results = _answer_isolated(eng, turn, histories)
            for fetched, result, history in zip(turn, results, histories, strict=True):
                if fetched.job.session and not isinstance(result, BaseException):
                    store.append_turn(fetched.job.session, fetched.job.question, result.answer)
                answered.append((fetched, result, history))
            if turn:
                metrics.batch_answered(len(turn))
    finally:
        cleanup_s = eng.cleanup()
        gpu = memory.gpu_stats(eng.device)
        _record_gpu_memory(eng.device, gpu)
        status.publish(task_index=_task_index, last_job_at=time.time(), gpu=_gpu_section(eng.device))
        _publish_decode_buckets(eng)
        if _task_index >= settings.max_tasks_per_child:  # billiard replaces the child after this batch
            recycle.request("tasks", f"{_task_index} jobs (GLYPHQ_MAX_TASKS_PER_CHILD)")
    for fetched, result, history in answered:
        if isinstance(result, BaseException):
            outcomes[fetched.job_id] = result
            continue
        output = _output(fetched, result, history, started, cleanup_s / max(1, len(answered)), gpu)
        metrics.job_answered(output)
        outcomes[fetched.job_id] = output
    return outcomes


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
    images = [decode_checked_image(store.require_blob("image_keys", key, settings.max_image_bytes), settings)
              for key in job.image_keys]
    text_tokens = None
    if job.text_key is not None:
        text_tokens = eng.count_text_tokens(document_text(store, job.text_key, settings))
    return _Fetched(job_id, job, images, text_tokens, time.perf_counter() - start, _task_index)


def _session_turns(ready: list[_Fetched]) -> list[list[_Fetched]]:
    """Split a batch so that no two jobs of one session share a generate: the n-th job of each session
    goes in the n-th group (jobs without a session all go in the first)."""
    groups: list[list[_Fetched]] = [[]]
    seen: dict[str, int] = {}
    for fetched in ready:
        session = fetched.job.session
        index = seen.get(session, -1) + 1 if session else 0
        if session:
            seen[session] = index
        while len(groups) <= index:
            groups.append([])
        groups[index].append(fetched)
    return [group for group in groups if group]


def _answer_isolated(eng: Any, batch: list[_Fetched], histories: list[list[dict[str, str]]]) -> list[Any]:
    """Answer ``batch`` in one generate. If that fails, answer each job alone, so a job that breaks
    the batch fails by itself. A time limit fails every job it interrupted."""
    from glyphq.worker.engine import EngineJob, answer_within_memory

    engine_jobs = [EngineJob(images=f.images, question=f.job.question, max_new_tokens=f.job.max_new_tokens,
                             history=history, thinking_budget=f.job.thinking_budget or None,
                             document=f.job.text_key is not None)
                   for f, history in zip(batch, histories, strict=True)]
    try:
        return list(answer_within_memory(eng, engine_jobs, settings.max_image_size))
    except SoftTimeLimitExceeded as exc:
        traceback.clear_frames(exc.__traceback__)
        return [exc] * len(batch)
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        if len(batch) == 1:
            if isinstance(exc, GlyphqError):
                return [exc]
            log.warning("the model failed on job %s", batch[0].job_id, exc_info=exc)
            return [ModelError(f"the model failed on this job: {type(exc).__name__}: {exc}")]
        log.warning("a batch of %d jobs failed (%s); answering each job alone", len(batch), exc)
    eng.cleanup()
    return [result for i in range(len(batch)) for result in _answer_isolated(eng, batch[i:i + 1], histories[i:i + 1])]


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
