"""Runtime failures in the worker. All derive from ``producer.errors.GlyphqError``.

This module imports no torch, so a producer can rebuild these exceptions from a stored result.
"""

from producer.errors import GlyphqError


class WorkerError(GlyphqError):
    """Raised when the worker could not answer a job for a reason other than bad input."""


class ModelError(WorkerError):
    """Raised when the model failed to load or to generate (CUDA out of memory twice, for example)."""


class BlobMissing(WorkerError):
    """Raised when a job's image blob has expired or was never stored."""


class PoisonJob(WorkerError):
    """Raised when a job's worker child died on each of its allowed deliveries, so it is not run again."""
