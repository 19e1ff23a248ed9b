"""Worker lifecycle hooks: prepare the main process, run the GPU worker's engine child, count jobs, release blobs.

The handlers import ``worker`` lazily, so importing ``tasks`` from a web backend never pulls in torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps, signals
from redis.exceptions import RedisError

from glyphq.celeryconfig import ANSWER_PAGES_TASK, ANSWER_TASK, GPU_QUEUE, RENDER_TASK, is_gpu_queue, settings
from glyphq.producer.store import SAFE_POLICY, memory_info, settings_client
from glyphq.tasks import intake, private
from glyphq.tasks.app import app
from glyphq.tasks.blobs import finished_blobs, release, render_owner

log = logging.getLogger(__name__)

#: Exit status of a worker that stopped because a child could not load its model.
MODEL_LOAD_FAILED_EXIT = 3


#: The tasks a GPU worker answers; any other message on its queues is refused (``tasks.intake``).
GPU_TASKS = (ANSWER_TASK, ANSWER_PAGES_TASK)


def serves_gpu(worker: Any) -> bool:
    """Whether ``worker`` (a ``WorkController``) consumes ``gpu`` or a worker's own ``gpu.<name>``."""
    queues = set(worker.app.amqp.queues.consume_from) if worker is not None else {GPU_QUEUE}
    return any(is_gpu_queue(queue) for queue in queues)


#: The exit status of a GPU worker told to consume a queue of CPU tasks too.
EXIT_MIXED_QUEUES = 5


@signals.worker_init.connect
def _prepare_worker(sender: Any = None, **_: Any) -> None:
    """Only in a worker, never in a producer that imports ``tasks``: see ``tasks.private``. A GPU worker runs
    no task in Celery's pool (its engine child answers them), so it runs the solo pool, and refuses any
    message for a task it does not answer rather than run it in its main process."""
    private.fix_kombu_close()
    if sender is None or not serves_gpu(sender):
        return
    other = sorted(queue for queue in sender.app.amqp.queues.consume_from if not is_gpu_queue(queue))
    if other:
        log.critical("a GPU worker answers glyphq.answer and glyphq.answer_pages only; it was asked to consume "
                     "%s too. Run a render worker for those (-Q render). Not starting.", ", ".join(other))
        raise SystemExit(EXIT_MIXED_QUEUES)
    private.use_solo_pool(sender)
    intake.refuse_tasks_but(sender.app, GPU_TASKS)


@signals.celeryd_after_setup.connect
def _prepare_parent(instance: Any = None, **_: Any) -> None:
    """In the worker's main process, before its steps start (a GPU worker's engine child among them): the
    metrics server, and on a GPU worker torch and transformers imported once, without touching CUDA.

    ``celeryd_after_setup`` comes after ``-Q`` and logging are set up and before the worker's steps start.
    """
    from glyphq.worker import metrics

    refuse_evicting_redis()
    metrics.serve(settings)
    if serves_gpu(instance):
        from glyphq.worker import runtime

        start = time.perf_counter()
        runtime.preload_modules()
        log.info("preloaded torch and transformers in %.1f s (CUDA untouched)", time.perf_counter() - start)
        _reserve(instance)


#: The exit status of a worker that refuses to start on a Redis that may evict glyphq's keys.
EXIT_EVICTING_REDIS = 4


def refuse_evicting_redis() -> None:
    """Stop the worker before it consumes anything if Redis may evict keys when it is full.

    Evicted messages, blobs and id claims vanish without an error: jobs would be lost or run twice.
    ``GLYPHQ_ALLOW_EVICTION=on`` turns the refusal into a warning at every start.
    """
    try:
        info = memory_info(settings_client(settings))
    except RedisError as exc:  # Redis not up yet: the worker's own connection retry waits for it
        log.warning("could not read Redis's maxmemory-policy at start: %s", exc)
        return
    if info is None:
        log.warning("Redis does not allow INFO; cannot check that its maxmemory-policy is %s", SAFE_POLICY)
        return
    if not info.evicts:
        return
    problem = (f"Redis's maxmemory-policy is {info.policy}: when Redis is full it deletes keys, and with them "
               f"queued jobs, images and results. Set maxmemory-policy {SAFE_POLICY}")
    if settings.allow_eviction == "on":
        log.warning("%s (running anyway: GLYPHQ_ALLOW_EVICTION=on)", problem)
        return
    log.critical("%s, or GLYPHQ_ALLOW_EVICTION=on to run anyway. Not starting.", problem)
    raise SystemExit(EXIT_EVICTING_REDIS)


def _reserve(worker: Any) -> None:
    """Let a GPU worker reserve ``reserved_jobs(GLYPHQ_MAX_BATCH)`` messages (see ``tasks.scheduler``).

    The child runs up to ``GLYPHQ_MAX_BATCH`` jobs at once; as many more wait in the worker, so a
    freed slot is filled at once, without a round trip to Redis. Celery's own prefetch counts
    messages per child (``worker_prefetch_multiplier``), so with one child it is set to that number.
    The consumer exists by now but has not set its prefetch (QoS) yet. A render worker keeps Celery's
    prefetch of one per child, so long renders spread over the render workers.
    """
    from glyphq.tasks.scheduler import reserved_jobs

    consumer = getattr(worker, "consumer", None)
    if consumer is None:
        return
    consumer.prefetch_multiplier = reserved_jobs(settings.max_batch)
    consumer.initial_prefetch_count = max(1, int(worker.concurrency or 1)) * consumer.prefetch_multiplier


@signals.worker_shutting_down.connect
def _drain(**_: Any) -> None:
    """In the worker's main process, as a shutdown begins: the GPU child starts no new job."""
    from glyphq.tasks import gpu

    current = gpu.current()
    if current is not None:
        current.drain()


class EngineStep(bootsteps.StartStopStep):
    """A GPU worker's engine child, as one of the worker's bootsteps: started with the worker (the model
    loads while the consumer connects), drained on a warm shutdown before the broker connection closes (the
    jobs it runs end and are acknowledged), killed on a cold one. See ``tasks.scheduler``."""

    requires = ("celery.worker.components:Hub",)

    def include_if(self, w: Any) -> bool:
        return serves_gpu(w)

    def start(self, w: Any) -> None:
        from glyphq.tasks import gpu

        if w.hub is None:
            raise RuntimeError("a GPU worker needs Celery's event loop (a Redis broker)")
        gpu.create(w.hub)

    def register_with_event_loop(self, w: Any, hub: Any) -> None:
        """Celery calls this each time its consumer (re)starts its event loop, after a lost connection
        emptied it."""
        from glyphq.tasks import gpu

        current = gpu.current()
        if current is not None:
            current.rewatch()

    def stop(self, w: Any) -> None:
        from glyphq.tasks import gpu

        current = gpu.current()
        if current is not None:
            current.finish()

    def terminate(self, w: Any) -> None:
        from glyphq.tasks import gpu

        current = gpu.current()
        if current is not None:
            current.drain()
            current.kill_all()


app.steps["worker"].add(EngineStep)


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, as it stops: let another worker export the queue depth, and when
    a child could not load the model, exit with ``MODEL_LOAD_FAILED_EXIT`` so that a supervisor sees a
    failure (the scheduler stops the worker with SIGTERM, whose warm shutdown would exit 0).

    ``sender`` is the ``WorkController``; ``celery worker`` exits with its ``exitcode`` once it stopped.
    """
    from glyphq.worker import metrics, status

    metrics.stop()
    failure = status.read().get("model_error")
    if failure and sender is not None:
        log.critical("stopping with exit code %d: the model could not be loaded (%s)", MODEL_LOAD_FAILED_EXIT,
                     failure)
        sender.exitcode = MODEL_LOAD_FAILED_EXIT


class GlyphqStats(bootsteps.StartStopStep):
    """Adds a ``glyphq`` section to ``celery inspect stats``, and so to Flower's worker page.

    It holds what the current child published: model, device, GPU memory allocated, reserved and
    peak, its KV cache pool (tokens, bytes, blocks, blocks used and free, preemptions, whether a
    successor fits beside it), the child's task index, and recycles so far; and the port of this worker's ``/metrics``.
    """

    def info(self, worker: Any) -> dict[str, Any]:
        from glyphq.worker import metrics, status

        current = status.read()
        children = int(current.get("children", 0))
        return {"glyphq": {
            "queues": sorted(worker.app.amqp.queues.consume_from),
            "model": current.get("model"),
            "model_loaded": bool(current.get("model_loaded")),
            "device": current.get("device"),
            "device_name": current.get("device_name"),
            "gpu": current.get("gpu"),
            "pool": current.get("pool"),
            "child_pid": current.get("pid"),
            "task_index": current.get("task_index"),
            "recycles": max(0, children - 1),
            "recycles_by_reason": current.get("recycles_by_reason") or {},
            "metrics_port": metrics.port(),
        }}


app.steps["worker"].add(GlyphqStats)


@signals.task_postrun.connect
def _release_blobs(sender: Any = None, task_id: str | None = None, args: Any = None, kwargs: Any = None,
                   state: str | None = None, **_: Any) -> None:
    """Once a job's result is stored, drop its hold on its blobs (deleted when no other job holds them)."""
    if state not in ("SUCCESS", "FAILURE") or not task_id:
        return
    from glyphq.worker import metrics

    name = getattr(sender, "name", None)
    metrics.job_finished(str(name), state)
    release(*finished_blobs(name, task_id, args or (), kwargs or {}, state))


@signals.task_revoked.connect
def _release_expired(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    """A job whose deadline passed never runs: count it and drop its hold on its blobs."""
    if request is None:
        return
    from glyphq.worker import metrics

    name = getattr(sender, "name", None) or getattr(request, "task", None)
    metrics.job_finished(str(name), "expired" if expired else "revoked")
    kwargs = request.kwargs or {}
    release(*finished_blobs(name, request.id, request.args or (), kwargs, "FAILURE"))
    owner = render_owner(request.id, kwargs) if name == RENDER_TASK else None
    if owner is not None:
        # The answer step of the chain is never sent: give the document job its final state here.
        app.backend.mark_as_revoked(owner, reason="expired" if expired else "revoked")
