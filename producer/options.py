"""The options every job takes, image and document jobs alike, checked in one place.

``submit`` and ``submit_document`` call :func:`check_job_options` before anything touches Redis; a
refusal raises ``InvalidJob`` naming the field and the limit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from glyphq.celeryconfig import GPU_QUEUE, PRIORITY_LEVELS, Settings
from glyphq.producer.validation import (
    check_deadline,
    check_identifier,
    check_max_new_tokens,
    check_priority,
    check_question,
    check_queue,
    check_thinking_budget,
)


@dataclass(frozen=True)
class JobOptions:
    """A job's checked options, with the defaults filled in from the settings."""

    question: str
    max_new_tokens: int
    thinking_budget: int
    priority: int  # glyphq's own scale: 0 (lowest) .. 9 (most urgent)
    session: str | None
    job_id: str
    expires: datetime | None  # when a job not yet started must no longer run (from ``deadline``)
    queue: str = GPU_QUEUE  # the GPU queue the job is answered from: ``gpu`` or one worker's ``gpu.<name>``
    cache_scope: str | None = None  # whose jobs may share what the worker keeps of pages read before

    @property
    def celery_priority(self) -> int:
        """The priority as sent to Celery: Redis serves the lowest number first."""
        return celery_priority(self.priority)


def check_job_options(question: object, *, max_new_tokens: object, thinking_budget: object, priority: object,
                      session: object, job_id: object, deadline: object, settings: Settings,
                      queue: object = None, cache_scope: object = None) -> JobOptions:
    """Check the options shared by every kind of job; a new job id is drawn when ``job_id`` is None."""
    checked_question = check_question(question, settings)
    tokens = check_max_new_tokens(max_new_tokens, settings)
    return JobOptions(
        question=checked_question,
        max_new_tokens=tokens,
        thinking_budget=check_thinking_budget(thinking_budget, tokens, settings),
        priority=check_priority(priority, settings),
        session=check_identifier("session", session),
        job_id=check_identifier("job_id", job_id) or uuid.uuid4().hex,
        expires=expiry(check_deadline(deadline)),
        queue=check_queue(queue),
        cache_scope=check_identifier("cache_scope", cache_scope),
    )


def expiry(deadline: float | None) -> datetime | None:
    """The absolute time by which a job must start; absolute, so a chain's later task keeps it."""
    return None if deadline is None else datetime.now(timezone.utc) + timedelta(seconds=deadline)


def celery_priority(priority: int) -> int:
    """Redis serves the lowest number first, so glyphq's 9 (most urgent) is sent as 0."""
    return PRIORITY_LEVELS - 1 - priority
