"""Celery app, task names and worker hooks. ``celery -A tasks worker`` starts a GPU worker."""

from tasks import answer, signals  # noqa: F401  (registers the task and the hooks)
from tasks.app import app

__all__ = ["app"]
