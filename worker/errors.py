"""Runtime failures in the worker. All derive from ``producer.errors.GlyphqError``.

This module imports no torch, so a producer can rebuild these exceptions from a stored result.
"""

from glyphq.producer.errors import BlobMissing, GlyphqError

# BlobMissing is raised by producer.store
__all__ = ["WorkerError", "ModelError", "DeviceFailed", "PoisonJob", "NoRoomToTakeOver", "BlobMissing"]


class WorkerError(GlyphqError):
    """Raised when the worker could not answer a job for a reason other than bad input."""


class ModelError(WorkerError):
    """Raised when the model failed to load or to generate (CUDA out of memory twice, for example)."""


class DeviceFailed(WorkerError):
    """Raised when the device failed under a running batch (a CUDA error), not because of one job.

    The worker child cannot trust its device afterwards: it leaves, and the jobs it held are answered
    by its successor (see ``tasks.serve``).
    """


class PoisonJob(WorkerError):
    """Raised when a job's worker child died on each of its allowed deliveries, so it is not run again."""


class NoRoomToTakeOver(WorkerError):
    """Raised when a successor child's full KV cache does not fit once it has waited for its predecessor."""
