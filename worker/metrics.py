"""Prometheus metrics of a worker, served by its main process and surviving child recycling.

Children write their samples with prometheus-client's multiprocess mode into a folder that the main
process makes before forking; the main process serves the sum of all of them, dead children's
included. Call ``serve`` in the main process before this module's metrics are used anywhere.

- Each worker serves on the first free port from ``GLYPHQ_METRICS_PORT`` (up to ``PORT_RANGE`` ports
  on), so several workers on one host never clash; ``port()`` says which (``inspect stats`` shows it).
- Every family exists from the start, at zero for every known label value, so dashboards and alerts
  see a series before the first job, recycle or failure.
- ``glyphq_queue_depth`` is read from Redis at scrape time by one worker only: the one holding a
  short lease in Redis (taken at scrape, renewed at each scrape, released at shutdown), so a
  ``sum()`` over workers counts each waiting job once.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import tempfile
from collections.abc import Iterable
from typing import Any

from glyphq.celeryconfig import ANSWER_PAGES_TASK, ANSWER_TASK, GPU_QUEUE, RENDER_QUEUE, RENDER_TASK, Settings

log = logging.getLogger(__name__)

QUEUES = (GPU_QUEUE, RENDER_QUEUE)
#: Label values every worker exports from the start (at zero until they happen).
TASKS = (ANSWER_TASK, ANSWER_PAGES_TASK, RENDER_TASK)
JOB_STATES = ("success", "failure", "expired", "revoked")
RECYCLE_REASONS = ("tasks", "rss", "gpu")
#: Ports tried from ``GLYPHQ_METRICS_PORT`` on; the first one free is this worker's.
PORT_RANGE = 16
#: Redis key naming the worker that exports the queue depth, and how long its lease lasts unrenewed
#: (longer than Prometheus's default scrape interval of one minute).
QUEUE_DEPTH_LEASE_KEY = "glyphq:metrics:queue-depth-exporter"
QUEUE_DEPTH_LEASE_S = 120

_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_port: int | None = None
_queue_depth: QueueDepthCollector | None = None


def serve(settings: Settings) -> int | None:
    """In the worker's main process: prepare multiprocess mode, create every family at zero, and serve
    ``/metrics`` on ``GLYPHQ_METRICS_HOST`` (localhost by default), at the first free port from
    ``GLYPHQ_METRICS_PORT``. Returns that port, or None when metrics are off (port 0) or no port in the
    range is free."""
    global _port, _queue_depth
    if not settings.metrics_port:
        _use_directory(settings.metrics_dir or tempfile.mkdtemp(prefix="glyphq-metrics-"))
        return None
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    private_dir = "" if settings.metrics_dir else tempfile.mkdtemp(prefix="glyphq-metrics-")
    last = min(65535, settings.metrics_port + PORT_RANGE - 1)
    for port in range(settings.metrics_port, last + 1):
        # A shared GLYPHQ_METRICS_DIR gets one folder per port: each worker sums its own children only.
        directory = private_dir or os.path.join(settings.metrics_dir, f"port-{port}")
        os.makedirs(directory, exist_ok=True)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        collector = QueueDepthCollector(settings, owner=f"{socket.gethostname()}:{port}:{os.getpid()}")
        registry.register(collector)
        try:
            start_http_server(port, addr=settings.metrics_host, registry=registry)
        except OSError as exc:
            log.debug("metrics port %s is taken: %s", port, exc)
            continue
        _use_directory(directory)
        _port, _queue_depth = port, collector
        log.info("serving Prometheus metrics on %s:%s/metrics", settings.metrics_host, port)
        return port
    log.warning("no free metrics port from %s to %s (GLYPHQ_METRICS_PORT); metrics are not served",
                settings.metrics_port, last)
    _use_directory(private_dir or tempfile.mkdtemp(prefix="glyphq-metrics-"))
    return None


def _use_directory(directory: str) -> None:
    """Make ``directory`` the multiprocess folder of this worker and its children, and create every family."""
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):  # a previous worker's samples are not ours
        os.remove(stale)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus-client picks its value store when first imported, and Celery's worker imports it
    # before this runs: pick again, so the metrics children create go to the shared folder.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    _create_families()


def _create_families() -> None:
    """Create every metric and every known label value at zero; children inherit them and count on."""
    for task in TASKS:
        for state in JOB_STATES:
            metric("jobs").labels(task=task, state=state)
    for reason in RECYCLE_REASONS:
        metric("recycles").labels(reason=reason)
    for name in ("queue_wait", "preprocess", "generate", "tokens", "batch_size", "preemptions"):
        metric(name)
    gpu_memory(0, 0)
    kv_pool(0, 0, 0, 0)
    for cache in ("prefix", "encoder"):
        page_cache(cache, 0, {})
        for event in ("hit", "miss", "eviction"):
            metric("cache_events").labels(cache=cache, event=event)


def port() -> int | None:
    """The port this worker serves ``/metrics`` on (None: not served)."""
    return _port


def stop() -> None:
    """At worker shutdown: hand the queue-depth lease back, so another worker exports it at once."""
    if _queue_depth is not None:
        _queue_depth.release()


class QueueDepthCollector:
    """``glyphq_queue_depth{queue}``: messages waiting, summed over Redis's priority sub-queues.

    Only the worker holding the lease in Redis exports it; the others leave the family out.
    """

    def __init__(self, settings: Settings, owner: str) -> None:
        self.settings = settings
        self.owner = owner
        self._redis: Any = None

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from glyphq.producer.store import queue_depths

        try:
            if not self._hold_lease():
                return
            depths = queue_depths(self.settings, QUEUES)
        except Exception as exc:  # a scrape must not fail because Redis is briefly away
            log.warning("queue depth unavailable: %s", exc)
            return
        family = GaugeMetricFamily("glyphq_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        for queue in QUEUES:
            family.add_metric([queue], depths.get(queue, 0))
        yield family

    def _client(self) -> Any:
        if self._redis is None:
            from glyphq.producer.store import settings_client

            self._redis = settings_client(self.settings)
        return self._redis

    def _hold_lease(self) -> bool:
        """Take the lease if it is free, renew it if it is ours; False while another worker holds it."""
        client = self._client()
        if client.set(QUEUE_DEPTH_LEASE_KEY, self.owner, nx=True, ex=QUEUE_DEPTH_LEASE_S):
            return True
        if client.get(QUEUE_DEPTH_LEASE_KEY) == self.owner.encode():
            client.expire(QUEUE_DEPTH_LEASE_KEY, QUEUE_DEPTH_LEASE_S)
            return True
        return False

    def release(self) -> None:
        """Delete the lease if this worker holds it."""
        try:
            client = self._client()
            if client.get(QUEUE_DEPTH_LEASE_KEY) == self.owner.encode():
                client.delete(QUEUE_DEPTH_LEASE_KEY)
        except Exception as exc:  # it expires on its own
            log.warning("could not release the queue-depth lease: %s", exc)


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
        "batch_size": Histogram("glyphq_batch_size", "Rows decoding when a job ended",
                                buckets=_BATCH_BUCKETS),
        "pool_tokens": Gauge("glyphq_kv_pool_tokens", "Tokens the KV cache pool of the current child holds",
                             multiprocess_mode="mostrecent"),
        "pool_used": Gauge("glyphq_kv_pool_blocks_used", "KV cache blocks rows hold, at the last reading",
                           multiprocess_mode="mostrecent"),
        "pool_free": Gauge("glyphq_kv_pool_blocks_free", "KV cache blocks free, at the last reading",
                           multiprocess_mode="mostrecent"),
        "preemptions": Counter("glyphq_kv_preemptions", "Rows preempted when the KV cache pool ran out of blocks "
                               "(each runs again later)"),
        "cache_events": Counter("glyphq_page_cache_events", "Look-ups of the caches of pages read before: prefix "
                                "(KV cache blocks) and encoder (pages' vision features), by cache and event "
                                "(hit, miss, eviction)", ["cache", "event"]),
        "cache_size": Gauge("glyphq_page_cache_size", "What the current child keeps: prefix in KV cache blocks, "
                            "encoder in bytes", ["cache"], multiprocess_mode="mostrecent"),
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
    """Record how many rows were decoding when a job ended (its ``worker.batch_size``)."""
    metric("batch_size").observe(size)


def gpu_memory(allocated_bytes: float, reserved_bytes: float) -> None:
    """Set the GPU memory gauges."""
    metric("allocated").set(allocated_bytes)
    metric("reserved").set(reserved_bytes)


def kv_pool(tokens: int, blocks_used: int, blocks_free: int, new_preemptions: int) -> None:
    """Set the KV cache pool gauges of the current child, and count its preemptions since the last call."""
    metric("pool_tokens").set(tokens)
    metric("pool_used").set(blocks_used)
    metric("pool_free").set(blocks_free)
    if new_preemptions > 0:
        metric("preemptions").inc(new_preemptions)


def page_cache(cache: str, size: int, events: dict[str, int]) -> None:
    """Set one cache's size (``prefix`` in blocks, ``encoder`` in bytes) and count its new ``events``
    (``hit``, ``miss``, ``eviction``: how many of each since the last call)."""
    metric("cache_size").labels(cache=cache).set(size)
    for event, count in events.items():
        if count > 0:
            metric("cache_events").labels(cache=cache, event=event).inc(count)


def recycled(reason: str) -> None:
    """Count a child replacement: ``tasks``, ``rss`` or ``gpu``."""
    metric("recycles").labels(reason=reason).inc()
