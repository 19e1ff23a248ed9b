"""Worker lifecycle hooks: prepare the parent, load the model in each child, count jobs, release blobs.

The handlers import ``worker`` lazily, so importing ``tasks`` from a web backend never pulls in torch.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, signals
from redis.exceptions import RedisError

from glyphq.celeryconfig import ANSWER_PAGES_TASK, ANSWER_TASK, GPU_QUEUE, RENDER_TASK, is_gpu_queue, settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.store import SAFE_POLICY, Store, is_blob_key, memory_info, settings_client
from glyphq.producer.validation import check_identifier
from glyphq.tasks import channel
from glyphq.tasks.app import app

log = logging.getLogger(__name__)

#: Exit status of a worker that stopped because a child could not load its model.
MODEL_LOAD_FAILED_EXIT = 3


@signals.worker_init.connect
def _fix_kombu(**_: Any) -> None:
    """Only in a worker, never in a producer that imports ``tasks``: see ``tasks.private``."""
    from glyphq.tasks import private

    private.fix_kombu_close()


@signals.celeryd_after_setup.connect
def _prepare_parent(instance: Any = None, **_: Any) -> None:
    """In the worker's main process, before the pool forks: the shared status page, the metrics
    server, and on a GPU worker torch and transformers imported once, without touching CUDA.

    ``celeryd_after_setup`` comes after ``-Q`` and logging are set up and before the pool forks.
    """
    from glyphq.worker import metrics, status

    refuse_evicting_redis()
    status.create()
    channel.create()
    metrics.serve(settings)
    queues = set(instance.app.amqp.queues.consume_from) if instance is not None else {GPU_QUEUE}
    if any(is_gpu_queue(queue) for queue in queues):  # ``gpu``, or a worker's own ``gpu.<name>``
        from glyphq.worker import runtime

        runtime.preload_parent()
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
    from glyphq.tasks import scheduler

    scheduler.drain()


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, as it stops: let another worker export the queue depth, and when
    a child could not load the model, exit with ``MODEL_LOAD_FAILED_EXIT`` so that a supervisor sees a
    failure (the child stops the worker with SIGTERM, whose warm shutdown would exit 0).

    ``sender`` is the ``WorkController``; ``celery worker`` exits with its ``exitcode`` once it stopped.
    """
    from glyphq.worker import metrics, status

    metrics.stop()
    failure = status.read().get("model_error")
    if failure and sender is not None:
        log.critical("stopping with exit code %d: the model could not be loaded (%s)", MODEL_LOAD_FAILED_EXIT,
                     failure)
        sender.exitcode = MODEL_LOAD_FAILED_EXIT


@signals.worker_process_init.connect
def _load_in_child(**_: Any) -> None:
    """In each new child: load the model once (CUDA is first touched here, after the fork)."""
    from glyphq.worker import runtime

    if runtime.serves_gpu():
        runtime.init_child()


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
    _release(*finished_blobs(name, task_id, args or (), kwargs or {}, state))


@signals.task_revoked.connect
def _release_expired(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    """A job whose deadline passed never runs: count it and drop its hold on its blobs."""
    if request is None:
        return
    from glyphq.worker import metrics

    name = getattr(sender, "name", None) or getattr(request, "task", None)
    metrics.job_finished(str(name), "expired" if expired else "revoked")
    kwargs = request.kwargs or {}
    _release(*finished_blobs(name, request.id, request.args or (), kwargs, "FAILURE"))
    owner = render_owner(request.id, kwargs) if name == RENDER_TASK else None
    if owner is not None:
        # The answer step of the chain is never sent: give the document job its final state here.
        app.backend.mark_as_revoked(owner, reason="expired" if expired else "revoked")


def release_finished(name: str | None, task_id: str, args: Any, kwargs: dict[str, Any], state: str) -> None:
    """Drop a finished job's hold on its blobs (``tasks.serve`` calls it once the outcome is stored)."""
    _release(*finished_blobs(name, task_id, args, kwargs, state))


def _release(owner: str, keys: list[str]) -> None:
    store = Store(settings)
    for key in keys:
        try:
            store.release_blob(key, owner)
        except RedisError:
            log.warning("could not release blob %s of job %s; it expires on its own", key, owner)


def finished_blobs(name: str | None, task_id: str, args: Any, kwargs: dict[str, Any], state: str
                   ) -> tuple[str, list[str]]:
    """(job id, blob keys) that a finished task no longer needs; a render that succeeded hands its on.

    The keys come from the message, so none is trusted: if any named key is not a blob key, none is
    released. ``Store.release_blob`` then deletes a blob only if this job holds a reference to it.
    """
    job = _dict(kwargs.get("job"))
    owner, keys = task_id, []
    if name == ANSWER_TASK:
        keys = _list(job.get("image_keys"))
    elif name == ANSWER_PAGES_TASK:
        text_key = job.get("text_key")
        keys = [*_list(_dict(args[0] if args else None).get("page_keys")), *([text_key] if text_key else [])]
    elif name == RENDER_TASK and state == "FAILURE":
        owner = render_owner(task_id, kwargs) or ""
        keys = [_dict(kwargs.get("request")).get("text_key")] if owner else []
    if not all(is_blob_key(key) for key in keys):
        log.warning("job %s names keys that are not blobs; releasing none of them", task_id)
        return owner, []
    return owner, keys


def render_owner(task_id: str, kwargs: dict[str, Any]) -> str | None:
    """The document job a render task works for: its ``job_id`` argument, if the task is that job's
    render step (id ``<job id>.render``), else None."""
    job_id = kwargs.get("job_id")
    try:
        check_identifier("job_id", job_id)
    except InvalidJob:
        return None
    return job_id if isinstance(job_id, str) and task_id == f"{job_id}.render" else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
