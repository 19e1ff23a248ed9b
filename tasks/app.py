"""The Celery app. Every setting comes from ``celeryconfig``."""

from celery import Celery

from tasks import broker_fix

broker_fix.apply()

app = Celery("glyphq")
app.config_from_object("celeryconfig")
