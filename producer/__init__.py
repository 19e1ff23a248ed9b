"""glyphq's producer side: enqueue image + question jobs and read their results. Needs no torch."""

from producer.documents import submit_document
from producer.errors import (
    BrokerFull,
    BrokerUnavailable,
    GlyphqError,
    InvalidJob,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    QueueFull,
)
from producer.images import check_image
from producer.submit import Job, submit

__all__ = [
    "submit",
    "submit_document",
    "Job",
    "check_image",
    "GlyphqError",
    "InvalidJob",
    "BrokerUnavailable",
    "BrokerFull",
    "QueueFull",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobTimeout",
]
