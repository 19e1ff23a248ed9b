"""Exceptions raised by glyphq. ``GlyphqError`` is the root of every one of them.

``GlyphqError`` and ``SettingsError`` are defined in ``celeryconfig`` (standard library only), which
raises ``SettingsError`` for a bad ``GLYPHQ_*`` value; they are the same classes here.
"""

from __future__ import annotations

from glyphq.celeryconfig import GlyphqError, SettingsError

__all__ = ["GlyphqError", "SettingsError", "InvalidJob", "BrokerUnavailable", "BrokerFull", "QueueFull",
           "JobExpired", "JobLost", "BlobMissing", "BlobCorrupt", "JobFailed", "InvalidRenderConfig",
           "BatchUsageError", "JobTimeout", "BrokerEvicts"]


class InvalidJob(GlyphqError, ValueError):
    """Raised when a job is refused: the message names the field and the limit it broke."""

    def __init__(self, field: str, problem: str) -> None:
        # Both go into args, so Celery's JSON result backend rebuilds the exception on the producer side.
        super().__init__(field, problem)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


class BrokerUnavailable(GlyphqError):
    """Raised when Redis cannot be reached, so the job was not enqueued."""


class BrokerFull(GlyphqError):
    """Raised when Redis is at its memory limit (or within ``GLYPHQ_REDIS_RESERVE_PCT`` of it), so the job
    was not enqueued; the room left is kept for the workers that drain the queue."""


class BrokerEvicts(GlyphqError):
    """Raised when Redis's ``maxmemory-policy`` may evict keys, so no worker starts on it; nothing was enqueued."""


class QueueFull(GlyphqError):
    """Raised when the queue already holds ``GLYPHQ_MAX_QUEUE`` jobs, so the new job was not enqueued."""


class JobExpired(GlyphqError):
    """Raised by ``Job.result`` when the job's deadline passed before it started; it never ran."""


class JobLost(GlyphqError):
    """Raised by ``Job.result`` when Redis holds no record of the job: never submitted, expired, or lost
    with Redis's data. It will never finish; submit it again."""


class BlobMissing(GlyphqError):
    """Raised when a job's blob (an image, a page or a document's text) has expired or was never stored."""


class BlobCorrupt(GlyphqError):
    """Raised when a blob's bytes do not hash to the sha256 in its key; the worker deletes the bad bytes."""


class JobFailed(GlyphqError):
    """Raised by ``Job.result`` when the worker failed the job; ``error_type`` names the worker's error."""

    def __init__(self, job_id: str, error_type: str, message: str) -> None:
        self.job_id = job_id
        self.error_type = error_type
        self.message = message
        super().__init__(f"job {job_id} failed: {error_type}: {message}")


class InvalidRenderConfig(GlyphqError, ValueError):
    """Raised when a render config has an unknown key or a bad value; the message names it."""


class BatchUsageError(GlyphqError):
    """Raised when a batch run cannot start: a missing input file, an output that is the input, a bad window."""


class JobTimeout(GlyphqError, TimeoutError):
    """Raised by ``Job.result`` when the job has not finished within the given timeout."""


class RequestRefused(GlyphqError):
    """Raised by the HTTP gateway when a request is refused before it becomes a job (no or a wrong API key,
    a body over its limit, a model the workers do not serve, an unknown job); carries the HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class ServeUsageError(GlyphqError):
    """Raised when ``glyphq serve`` cannot start: for one, it would listen beyond localhost without API keys."""


class MissingExtra(GlyphqError):
    """Raised when a command needs an optional extra (``glyphq[render]``, ...) that is not installed."""
