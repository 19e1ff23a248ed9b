"""glyphq's producer side: enqueue image + question jobs and read their results. Needs no torch."""

from glyphq.producer.documents import submit_document
from glyphq.producer.errors import (
    BatchUsageError,
    BlobCorrupt,
    BlobMissing,
    BrokerEvicts,
    BrokerFull,
    BrokerUnavailable,
    GlyphqError,
    InvalidJob,
    InvalidRenderConfig,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    QueueFull,
    SettingsError,
)
from glyphq.producer.images import check_image
from glyphq.producer.submit import Job, submit

__all__ = [
    "submit",
    "submit_document",
    "Job",
    "check_image",
    "GlyphqError",
    "InvalidJob",
    "InvalidRenderConfig",
    "BrokerUnavailable",
    "BrokerFull",
    "BrokerEvicts",
    "QueueFull",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobTimeout",
    "BlobMissing",
    "BlobCorrupt",
    "BatchUsageError",
    "SettingsError",
]
