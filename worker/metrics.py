"""Prometheus metrics of a worker, served by its main process and surviving child recycling.

Children write their samples with prometheus-client's multiprocess mode into a folder that the main
process makes before forking; the main process serves the sum of all of them, dead children's
included, plus the queue depths it reads from Redis at scrape time. Call ``serve`` in the main
process before this module's metrics are used anywhere.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from celeryconfig import Settings

log = logging.getLogger(__name__)

QUEUES = ("gpu", "render")

_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def serve(settings: Settings) -> None:
    """In the worker's main process: prepare multiprocess mode and serve ``/metrics`` on the port."""
    directory = settings.metrics_dir or tempfile.mkdtemp(prefix="glyphq-metrics-")
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):  # a previous worker's samples are not ours
        os.remove(stale)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus-client picks its value store when first imported, and Celery's worker imports it
    # before this runs: pick again, so the metrics children create go to the shared folder.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    if not settings.metrics_port:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(QueueDepthCollector(settings))
    try:
        start_http_server(settings.metrics_port, registry=registry)
    except OSError as exc:
        log.warning("cannot serve metrics on port %s: %s", settings.metrics_port, exc)
        return
    log.info("serving Prometheus metrics on :%s/metrics", settings.metrics_port)


class QueueDepthCollector:
    """``glyphq_queue_depth{queue}``: messages waiting, summed over Redis's priority sub-queues."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from producer.store import queue_depths

        family = GaugeMetricFamily("glyphq_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        try:
            for queue, depth in queue_depths(self.settings, QUEUES).items():
                family.add_metric([queue], depth)
        except Exception as exc:  # a scrape must not fail because Redis is briefly away
            log.warning("queue depth unavailable: %s", exc)
        yield family


def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "jobs": Counter("glyphq_jobs", "Jobs finished, by task and final state", ["task", "state"]),
        "queue_wait": Histogram("glyphq_queue_wait_seconds", "From submit to the start of the job",
                                buckets=_TIME_BUCKETS),
        "preprocess": Histogram("glyphq_preprocess_seconds", "Blob fetch, decode, fit, template and processor",
                                buckets=_TIME_BUCKETS),
        "generate": Histogram("glyphq_generate_seconds", "Generation and decoding", buckets=_TIME_BUCKETS),
        "tokens": Counter("glyphq_generated_tokens", "Tokens generated"),
        "allocated": Gauge("glyphq_gpu_memory_allocated_bytes", "GPU memory allocated after the last job's cleanup",
                           multiprocess_mode="mostrecent"),
        "reserved": Gauge("glyphq_gpu_memory_reserved_bytes", "GPU memory reserved after the last job's cleanup",
                          multiprocess_mode="mostrecent"),
        "recycles": Counter("glyphq_recycles", "Worker children replaced, by reason", ["reason"]),
        "batch_size": Histogram("glyphq_batch_size", "Jobs answered together in one generate",
                                buckets=_BATCH_BUCKETS),
    }


_registry: dict[str, Any] | None = None


def metric(name: str) -> Any:
    """One of this module's metrics, created on first use (after ``serve`` set multiprocess mode)."""
    global _registry
    if _registry is None:
        _registry = _metrics()
    return _registry[name]


def job_finished(task: str, state: str) -> None:
    """Count a job that reached its final state."""
    metric("jobs").labels(task=task, state=state.lower()).inc()


def job_answered(result: dict[str, Any]) -> None:
    """Record the timings and tokens of an answered job."""
    timings = result["timings"]
    metric("queue_wait").observe(timings["queue_s"])
    metric("preprocess").observe(timings["preprocess_s"])
    metric("generate").observe(timings["generate_s"])
    metric("tokens").inc(result["tokens_out"])


def batch_answered(size: int) -> None:
    """Record how many jobs one batched generate answered."""
    metric("batch_size").observe(size)


def gpu_memory(allocated_bytes: float, reserved_bytes: float) -> None:
    """Set the GPU memory gauges."""
    metric("allocated").set(allocated_bytes)
    metric("reserved").set(reserved_bytes)


def recycled(reason: str) -> None:
    """Count a child replacement: ``tasks``, ``rss`` or ``gpu``."""
    metric("recycles").labels(reason=reason).inc()
