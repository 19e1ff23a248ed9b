"""``glyphq health``: is the queue being served? Broker, a live worker on the queue, and its model.

Three checks, in order; a failed one skips the rest:

1. ``broker``: Redis at ``GLYPHQ_BROKER_URL`` answers PING, and its ``maxmemory-policy`` cannot evict
   glyphq's keys (``noeviction``, unless ``GLYPHQ_ALLOW_EVICTION=on``).
2. ``worker``: at least one worker consuming the queue answers a ping over Celery's control channel.
3. ``model``: for queue ``gpu`` (or a worker's own ``gpu.<name>``), at least one of those workers reports
   its model loaded (the ``glyphq`` section of ``celery inspect stats``). Queue ``render`` loads no model;
   the check is skipped.

The ``worker`` check also lists each answering worker's ``/metrics`` port (``metrics_ports``; null
when it serves none), from the same stats.

Every wait is bounded: the control connection retries at most once, each round of replies waits at most
``timeout`` seconds, and the whole Celery part runs under a hard deadline, so a broker that vanishes
mid-check cannot make the command hang (Celery's own connection retry is unbounded in this app,
``broker_connection_max_retries = None``, which suits a worker and not a health probe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import RedisError

from glyphq.celeryconfig import GPU_QUEUE, Settings, is_gpu_queue
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer.store import SAFE_POLICY, Store, broker_location, memory_info

DEFAULT_TIMEOUT_S = 3.0


@dataclass
class HealthReport:
    """The outcome of :func:`check_health`. ``ok`` is True only when every check that applies passed.

    ``checks`` maps ``broker``, ``worker`` and ``model`` to dicts with ``ok`` (True, False, or None when
    the check was skipped) and details; ``error`` names the first failed check in words.
    """

    queue: str
    checks: dict[str, dict[str, Any]]
    error: str | None = None
    elapsed_s: float = 0.0
    workers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.get("ok") is not False for c in self.checks.values())

    @property
    def broker_unreachable(self) -> bool:
        """True when Redis did not answer at all (as opposed to answering with a problem)."""
        return self.checks["broker"].get("reachable") is False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as ``glyphq health`` prints it."""
        return {"ok": self.ok, "queue": self.queue, "checks": self.checks, "error": self.error,
                "elapsed_s": round(self.elapsed_s, 3)}


def _skipped(why: str) -> dict[str, Any]:
    return {"ok": None, "skipped": why}


def check_health(queue: str = GPU_QUEUE, timeout: float = DEFAULT_TIMEOUT_S, node: str | None = None,
                 broker_only: bool = False, settings: Settings | None = None) -> HealthReport:
    """Check that ``queue`` is being served; see the module docstring for the three checks.

    ``timeout`` bounds each round of worker replies (the healthy path takes about ``timeout`` seconds,
    as the first broadcast waits for every worker to answer; with ``node`` it returns as soon as that
    worker answers). ``node`` (a Celery node name such as ``gpu0@host``) restricts the worker and
    model checks to that one worker. ``broker_only`` checks the broker alone (for Flower's container).
    """
    cfg = settings or default_settings
    start = time.monotonic()
    checks: dict[str, dict[str, Any]] = {
        "broker": _skipped("not run"), "worker": _skipped("not run"), "model": _skipped("not run"),
    }
    report = HealthReport(queue=queue, checks=checks)

    # (a) the broker answers PING, within the timeout even if Redis accepts connections and then hangs.
    where = broker_location(cfg.broker_url)
    finished, _, exc = _bounded(lambda: Store(cfg).redis.ping(), timeout + 2.0)
    if not finished or exc is not None:
        why = f"no answer to PING within {timeout + 2.0:.0f} s" if not finished else f"{type(exc).__name__}: {exc}"
        checks["broker"] = {"ok": False, "reachable": False, "url": where, "detail": why}
        checks["worker"] = _skipped("broker unreachable")
        checks["model"] = _skipped("broker unreachable")
        report.error = f"broker: cannot reach Redis at {where}: {why}"
        report.elapsed_s = time.monotonic() - start
        return report
    checks["broker"] = {"ok": True, "url": where, **_memory_check(cfg)}
    if checks["broker"]["ok"] is False:
        report.error = f"broker: {checks['broker']['detail']}"
        checks["worker"] = checks["model"] = _skipped("broker check failed")
        report.elapsed_s = time.monotonic() - start
        return report
    if broker_only:
        checks["worker"] = checks["model"] = _skipped("--broker-only")
        report.elapsed_s = time.monotonic() - start
        return report

    # (b) and (c) over Celery's control channel: three rounds of replies at most, under a hard deadline.
    deadline = 3 * timeout + 10.0
    finished, value, exc = _bounded(lambda: _check_workers(cfg, queue, timeout, node), deadline)
    if not finished:
        checks["worker"] = {"ok": False, "detail": f"no answer over the control channel within {deadline:.0f} s"}
        checks["model"] = _skipped("worker check failed")
        report.error = f"worker: the control channel did not answer within {deadline:.0f} s"
    elif exc is not None:
        checks["worker"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        checks["model"] = _skipped("worker check failed")
        report.error = f"worker: control channel error: {type(exc).__name__}: {exc}"
    else:
        checks["worker"], checks["model"], report.error, report.workers = value
    report.elapsed_s = time.monotonic() - start
    return report


def _memory_check(cfg: Settings) -> dict[str, Any]:
    """Redis's memory use and eviction policy; not ok if the policy may evict glyphq's keys."""
    try:
        info = memory_info(Store(cfg).redis)
    except RedisError as exc:
        return {"maxmemory_policy": None, "detail": f"cannot read INFO memory: {exc}"}
    if info is None:
        return {"maxmemory_policy": None, "detail": "INFO not allowed: cannot check the maxmemory-policy"}
    found: dict[str, Any] = {"maxmemory_policy": info.policy, "used_memory": info.used, "maxmemory": info.limit}
    if info.evicts and cfg.allow_eviction != "on":
        found.update(ok=False, detail=f"Redis's maxmemory-policy is {info.policy}, which can delete queued jobs "
                                      f"and results; set it to {SAFE_POLICY} (or GLYPHQ_ALLOW_EVICTION=on)")
    return found


def _bounded(fn: Callable[[], Any], seconds: float) -> tuple[bool, Any, BaseException | None]:
    """Run ``fn`` in a daemon thread for at most ``seconds``: (finished, its value, the exception it raised).

    A call still blocked after ``seconds`` (a hung socket, a connection retry loop) is abandoned; being a
    daemon thread, it cannot keep the process from exiting.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller, never raised in the thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="glyphq-health", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False, None, None
    return True, outcome.get("value"), outcome.get("error")


#: Celery apps for brokers other than the process's own, by URL (see ``_control_app``).
_other_apps: dict[str, Any] = {}


def _control_app(cfg: Settings) -> Any:
    """The Celery app whose control channel reaches ``cfg``'s broker.

    That is ``tasks.app`` when ``cfg`` names its broker. For another broker it is an app of its own
    (made once per URL): a control command is published through the app's producer pool, which a
    connection passed to ``inspect`` does not change.
    """
    from glyphq.tasks.app import app

    if cfg.broker_url == app.conf.broker_url and cfg.sentinel_master == _settings_master(app):
        return app
    other = _other_apps.get(cfg.broker_url)
    if other is None:
        from celery import Celery

        other = Celery("glyphq", set_as_current=False)
        other.config_from_object("glyphq.celeryconfig")
        transport = dict(other.conf.broker_transport_options or {})
        transport.pop("master_name", None)
        transport.pop("sentinel_kwargs", None)
        if cfg.sentinel_master:
            transport["master_name"] = cfg.sentinel_master
            if cfg.sentinel_password:
                transport["sentinel_kwargs"] = {"password": cfg.sentinel_password}
        other.conf.update(broker_url=cfg.broker_url, result_backend=cfg.result_backend,
                          broker_transport_options=transport)
        _other_apps[cfg.broker_url] = other
    return other


def _settings_master(app: Any) -> str:
    """The Sentinel master name in ``app``'s broker transport options ("" when there is none)."""
    return str((app.conf.broker_transport_options or {}).get("master_name") or "")


def _control_connection(app: Any, timeout: float) -> Any:
    """A broker connection for control commands that gives up after one retry instead of retrying forever."""
    return app.connection_for_write(
        connect_timeout=timeout,
        transport_options={
            "max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 1,
            "socket_connect_timeout": timeout, "socket_timeout": timeout + 5,
        },
    )


def _check_workers(cfg: Settings, queue: str, timeout: float, node: str | None
                   ) -> tuple[dict[str, Any], dict[str, Any], str | None, list[str]]:
    """(worker check, model check, error or None, names of the answering workers on ``queue``)."""
    app = _control_app(cfg)
    destination = [node] if node else None
    with _control_connection(app, timeout) as conn:
        def inspect(dest: list[str] | None) -> Any:
            return app.control.inspect(destination=dest, timeout=timeout, connection=conn)

        active = inspect(destination).active_queues() or {}
        consuming = sorted(name for name, queues in active.items()
                           if any(isinstance(q, dict) and q.get("name") == queue for q in queues or []))
        if not consuming:
            others = {name: sorted(str(q.get("name")) for q in queues or [] if isinstance(q, dict))
                      for name, queues in active.items()}
            detail = f"no worker consumes queue {queue!r}" + (f" (only {node} was asked)" if node else "")
            return ({"ok": False, "detail": detail, "workers_seen": others},
                    _skipped("worker check failed"), f"worker: {detail}", [])

        pongs = inspect(consuming).ping() or {}
        answering = sorted(name for name in consuming if isinstance(pongs.get(name), dict)
                           and pongs[name].get("ok") == "pong")
        if not answering:
            detail = f"workers on queue {queue!r} did not answer ping within {timeout} s: {', '.join(consuming)}"
            return ({"ok": False, "detail": detail, "consuming": consuming},
                    _skipped("worker check failed"), f"worker: {detail}", [])
        stats = inspect(answering).stats() or {}
        sections = {name: (stats.get(name) or {}).get("glyphq") for name in answering}
        worker_check = {"ok": True, "workers": answering,
                        "metrics_ports": {name: s.get("metrics_port") if isinstance(s, dict) else None
                                          for name, s in sections.items()}}

        if not is_gpu_queue(queue):  # the model check applies to ``gpu`` and ``gpu.<name>`` only
            return worker_check, _skipped(f"queue {queue!r} loads no model"), None, answering

        models: dict[str, Any] = {}
        for name in answering:
            section = sections[name]
            if isinstance(section, dict):
                models[name] = {k: section.get(k) for k in
                                ("model", "model_loaded", "device", "gpu", "pool", "task_index", "recycles")}
            else:  # a worker without glyphq's stats section cannot say its model is loaded
                models[name] = {"model_loaded": False, "detail": "no glyphq section in its stats"}
        loaded = sorted(name for name, m in models.items() if m.get("model_loaded") is True)
        if loaded:
            return worker_check, {"ok": True, "loaded_on": loaded, "workers": models}, None, answering
        detail = f"no worker on queue {queue!r} has its model loaded"
        return (worker_check, {"ok": False, "detail": detail, "workers": models}, f"model: {detail}", answering)
