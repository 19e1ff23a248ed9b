"""The Celery app. Every setting comes from ``celeryconfig``."""

from celery import Celery

app = Celery("glyphq")
app.config_from_object("glyphq.celeryconfig")
