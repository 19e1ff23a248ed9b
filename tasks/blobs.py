"""Dropping a finished job's hold on its blobs: in the worker's main process (Celery's signals) and in the
engine child (``tasks.serve``, once a job's outcome is stored). No torch here."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from glyphq.celeryconfig import ANSWER_PAGES_TASK, ANSWER_TASK, RENDER_TASK, settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.store import Store, is_blob_key
from glyphq.producer.validation import check_identifier

log = logging.getLogger(__name__)


def release_finished(name: str | None, task_id: str, args: Any, kwargs: dict[str, Any], state: str) -> None:
    """Drop a finished job's hold on its blobs (``tasks.serve`` calls it once the outcome is stored)."""
    release(*finished_blobs(name, task_id, args, kwargs, state))


def release(owner: str, keys: list[str]) -> None:
    """Drop ``owner``'s hold on each of ``keys`` (a blob is deleted when no job holds it any more)."""
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
