"""Celery app, task names and worker hooks. ``celery -A glyphq.tasks worker`` starts a GPU worker.

From a checkout, ``celery -A tasks worker`` works too: these imports name the package in full, so they
load the one app of ``glyphq.tasks`` whichever name this module was imported under.
"""

from glyphq.tasks import answer, signals  # noqa: F401  (registers the task and the hooks)
from glyphq.tasks.app import app

__all__ = ["app"]
