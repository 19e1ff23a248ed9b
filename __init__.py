"""glyphq: image + question jobs on a Redis queue, answered by a vision-language model on one GPU per worker.

The producer side is ``glyphq.producer`` (``submit``, ``Job``, the errors), the Celery app is
``glyphq.tasks`` (``celery -A glyphq.tasks worker``), and the model side is ``glyphq.worker``.
"""
