"""Per-process state of a GPU worker: preload in the parent, one engine per child, one job at a time.

``tasks`` calls into this module; it is the only worker module that knows about jobs and Redis.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
import traceback
from typing import Any

from celeryconfig import settings
from producer.images import decode_checked_image
from producer.schema import JobMessage
from producer.store import Store
from worker import metrics, recycle, status
from worker.errors import PoisonJob

log = logging.getLogger(__name__)

_serves_gpu = False
_engine: Any = None  # worker.engine.Engine, imported lazily so the parent never loads a model
_task_index = 0


def preload_parent() -> None:
    """Import torch and transformers in the worker's main process so each child starts warm.

    CUDA is not touched here: a child forked from a process with a CUDA context cannot use CUDA.
    """
    global _serves_gpu
    _serves_gpu = True
    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from worker import engine  # noqa: F401  (pulls in the Auto classes)

    log.info("preloaded torch and transformers in %.1f s (CUDA untouched)", time.perf_counter() - start)


def serves_gpu() -> bool:
    """True in a worker whose main process called ``preload_parent`` (it consumes the ``gpu`` queue)."""
    return _serves_gpu


def init_child() -> None:
    """Load the model in a fresh child. If it cannot load, stop the whole worker: the jobs stay queued."""
    global _engine, _task_index
    from worker import engine

    recycle.install()
    _task_index = 0
    start = time.perf_counter()
    try:
        _engine = engine.load(settings)
    except Exception:
        log.critical("model %r failed to load; stopping the worker, queued jobs stay queued", settings.model,
                     exc_info=True)
        os.kill(os.getppid(), signal.SIGTERM)
        raise
    # Everything alive now lives as long as the child; keep it out of every later collection.
    gc.collect()
    gc.freeze()
    previous = status.read()
    status.publish(pid=os.getpid(), model=settings.model, model_loaded=True, device=str(_engine.device),
                   device_name=_device_name(_engine.device), task_index=0,
                   children=int(previous.get("children", 0)) + 1, gpu=_gpu_section(_engine.device))
    log.info("model ready: %s on %s as %s, loaded in %.1f s", settings.model, _engine.device, _engine.dtype,
             time.perf_counter() - start)


def _loaded_engine() -> Any:
    if _engine is None:
        init_child()
    return _engine


def answer(raw_job: object, job_id: str) -> dict[str, Any]:
    """Answer one ``glyphq.answer`` job and return its result dict. Cleans up whatever happens."""
    global _task_index
    _task_index += 1
    try:
        return _answer(raw_job, job_id)
    finally:
        status.publish(task_index=_task_index, last_job_at=time.time())
        if _task_index >= settings.max_tasks_per_child:  # billiard replaces the child after this job
            recycle.request("tasks", f"{_task_index} jobs (GLYPHQ_MAX_TASKS_PER_CHILD)")


def _answer(raw_job: object, job_id: str) -> dict[str, Any]:
    from worker import memory

    started = time.time()
    store = Store(settings)
    runs = store.count_run(job_id)
    if runs > settings.max_deliveries:
        raise PoisonJob(
            f"job {job_id} was delivered {runs} times and the worker child died during each of the "
            f"previous {runs - 1} runs (GLYPHQ_MAX_DELIVERIES={settings.max_deliveries}); not running it again"
        )
    job = JobMessage.from_dict(raw_job, settings)
    eng = _loaded_engine()
    memory.reset_peak(eng.device)
    try:
        result, history, text_tokens, fetch_s = _answer_one(eng, store, job)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # let the cleanup below free what those frames hold
        raise
    finally:
        cleanup_s = eng.cleanup()
        gpu = memory.gpu_stats(eng.device)
        _record_gpu_memory(eng.device, gpu)

    if job.session:
        store.append_turn(job.session, job.question, result.answer)
    status.publish(gpu=_gpu_section(eng.device))
    single = len(job.image_keys) == 1 and job.text_key is None
    output: dict[str, Any] = {
        "job_id": job_id,
        "answer": result.answer,
        "model": settings.model,
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        "vision_tokens": result.vision_tokens,
        "image_size": list(job.image_sizes[0]) if single else [list(s) for s in job.image_sizes],
        "image_size_used": (list(result.image_sizes_used[0]) if single
                            else [list(s) for s in result.image_sizes_used]),
        "timings": {
            "queue_s": round(max(0.0, started - job.submitted_at), 4),
            "preprocess_s": round(fetch_s + result.preprocess_s, 4),
            "generate_s": round(result.generate_s, 4),
            "cleanup_s": round(cleanup_s, 4),
        },
        "gpu": gpu,
        "worker": {"pid": os.getpid(), "task_index": _task_index},
        "session": {"id": job.session, "turns_used": len(history)} if job.session else None,
    }
    if job.text_key is not None:
        output["timings"]["render_s"] = job.render_s
        output["pages"] = len(job.image_keys)
        output["text_tokens"] = text_tokens
        output["compression"] = (round(text_tokens / result.vision_tokens, 2)
                                 if text_tokens is not None and result.vision_tokens else None)
    metrics.job_answered(output)
    return output


def _answer_one(eng: Any, store: Store, job: JobMessage) -> tuple[Any, list[dict[str, str]], int | None, float]:
    """Fetch the job's images, history and text, and answer it.

    Returns (result, history, text tokens or None, fetch seconds). Everything the job touched lives
    in this frame, so it is unreferenced once this returns.
    """
    from worker.engine import EngineJob, answer_within_memory

    start = time.perf_counter()
    images = [decode_checked_image(store.require_blob(key), settings) for key in job.image_keys]
    history = store.session_turns(job.session, settings.history_turns) if job.session else []
    text_tokens = None
    if job.text_key is not None:
        text_tokens = eng.count_text_tokens(store.require_blob(job.text_key).decode("utf-8"))
    fetch_s = time.perf_counter() - start
    engine_job = EngineJob(images=images, question=job.question, max_new_tokens=job.max_new_tokens, history=history)
    (result,) = answer_within_memory(eng, [engine_job], settings.max_image_size)
    return result, history, text_tokens, fetch_s


def _record_gpu_memory(device: Any, gpu: dict[str, float] | None) -> None:
    """After cleanup: set the GPU memory gauges, and ask for a recycle when the GPU guard is crossed."""
    from worker import memory

    if gpu is not None:
        metrics.gpu_memory(memory.allocated_bytes(device), gpu["reserved_mb"] * memory.MB)
    limit = memory.gpu_guard_limit_mb(device, settings.gpu_guard_mb)
    if gpu is not None and limit is not None and gpu["reserved_mb"] > limit:
        recycle.request("gpu", f"GPU reserved {gpu['reserved_mb']:.0f} MB after cleanup > guard {limit:.0f} MB")


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _gpu_section(device: Any) -> dict[str, float] | None:
    """Allocated, reserved and peak GPU memory in MB, for the worker status; None on CPU."""
    from worker import memory

    stats = memory.gpu_stats(device)
    if stats is None:
        return None
    return {"allocated_mb": round(memory.allocated_bytes(device) / memory.MB, 1), **stats}
