"""Worker lifecycle hooks: pre-import in the parent, load the model in each child, release blobs.

The handlers import ``worker`` lazily, so importing ``tasks`` from a web backend never pulls in torch.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from redis.exceptions import RedisError

from celeryconfig import settings
from producer.schema import ANSWER_TASK
from producer.store import Store

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"


@signals.worker_init.connect
def _preload_in_parent(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: import torch and transformers once, without touching CUDA."""
    queues = set(sender.app.amqp.queues.consume_from) if sender is not None else {GPU_QUEUE}
    if GPU_QUEUE not in queues:
        return
    from worker import runtime

    runtime.preload_parent()


@signals.worker_process_init.connect
def _load_in_child(**_: Any) -> None:
    """In each new child: load the model once (CUDA is first touched here, after the fork)."""
    from worker import runtime

    if runtime.serves_gpu():
        runtime.init_child()


@signals.task_postrun.connect
def _release_blob(sender: Any = None, task_id: str | None = None, kwargs: Any = None, state: str | None = None,
                  **_: Any) -> None:
    """Once the result is stored, drop this job's hold on its image blob."""
    if getattr(sender, "name", None) != ANSWER_TASK or state not in ("SUCCESS", "FAILURE"):
        return
    job = (kwargs or {}).get("job")
    if isinstance(job, dict) and isinstance(job.get("image_key"), str) and task_id:
        try:
            Store(settings).release_blob(job["image_key"], task_id)
        except RedisError:
            log.warning("could not release blob %s of job %s; it expires on its own", job["image_key"], task_id)
