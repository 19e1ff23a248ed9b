"""Helpers for the fault-injection tests: their own redis-servers, a producer in a subprocess, polling."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from conftest import ROOT, WorkerProcess, free_port

HELPER = Path(__file__).resolve().with_name("producer_helper.py")


class FaultRedis:
    """A redis-server of one test's own, which the test may crash (SIGKILL) and start again on its port.

    Append-only persistence is on by default, with ``appendfsync everysec`` as in docker-compose.yml.
    ``options`` are more redis-server settings, e.g. ``{"maxmemory": "8mb"}``.
    """

    def __init__(self, directory: Path, appendonly: bool = True, password: str | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.options = options or {}
        self.port = free_port()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self._log = None

    def start(self, timeout: float = 20) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not on PATH; `make test` installs it")
        cmd = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory),
               "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        if self.password:
            cmd += ["--requirepass", self.password]
        for name, value in self.options.items():
            cmd += [f"--{name}", value]
        self._log = open(self.directory / "redis.log", "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError), self.client() as client:
                if client.ping():
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, crash: bool = True) -> None:
        """SIGKILL (a crash: only what the append-only file holds survives) or SIGTERM (clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=10,
                           socket_connect_timeout=5)


@contextlib.contextmanager
def ready_worker(broker_url: str, model: Path, log: Path, **settings: str | int) -> Iterator[WorkerProcess]:
    """A worker on ``broker_url`` with extra ``GLYPHQ_*`` settings, once its model is loaded; stopped at the end."""
    env = {**os.environ, "GLYPHQ_BROKER_URL": broker_url, "GLYPHQ_MODEL": str(model), "GLYPHQ_METRICS_PORT": "0",
           "PYTHONUNBUFFERED": "1", **{f"GLYPHQ_{k.upper()}": str(v) for k, v in settings.items()}}
    worker = WorkerProcess(env, log)
    try:
        worker.wait_ready(timeout=120)
        yield worker
    finally:
        worker.stop_soon()


class ProducerProcess:
    """``producer_helper.py`` in a subprocess with its own ``GLYPHQ_*`` environment (see its docstring)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._stderr = open(log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen([sys.executable, str(HELPER)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self._next(60)
        assert ready.get("ready"), ready
        self.log_path = log_path

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"producer helper gave no answer in {timeout} s") from None
        if line is None:
            raise AssertionError(f"producer helper exited: {self.log_path.read_text(errors='replace')[-3000:]}")
        return json.loads(line)

    def call(self, op: str, wait: float = 120, **fields: Any) -> dict[str, Any]:
        """Send one request; wait up to ``wait`` seconds for its reply."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._next(wait)

    def submit(self, **fields: Any) -> str:
        """Submit a job that must be accepted; return its id."""
        reply = self.call("submit", **fields)
        assert reply["ok"], reply
        return str(reply["job_id"])

    def result(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """The result of a job that must succeed within ``timeout``."""
        reply = self.call("result", wait=timeout + 30, job_id=job_id, timeout=timeout)
        assert reply["ok"], reply
        return dict(reply["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        self._reader.join(5)
        self._stderr.close()


def producer_env(**settings: str | int) -> dict[str, str]:
    """The test process's environment with ``GLYPHQ_<NAME>`` set from ``settings``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.update({f"GLYPHQ_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def runs(client: redis.Redis, job_id: str) -> int:
    """How many times a worker started ``job_id`` (``glyphq:runs:<id>``)."""
    return int(client.get(f"glyphq:runs:{job_id}") or 0)


def unacked_tags(client: redis.Redis) -> list[bytes]:
    """Delivery tags of messages a worker took but has not acknowledged (kombu's unacked hash)."""
    return list(client.hkeys("glyphq:unacked"))


def only_child(worker: Any, timeout: float = 60) -> int:
    """The pid of the worker's single pool child, once there is exactly one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = worker.children()
        if len(children) == 1:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError(f"worker has children {worker.children()}, expected exactly one")


def is_ready(worker: Any) -> bool:
    """True once the worker's own health check passes (``WorkerProcess.ready``)."""
    return bool(worker.ready())


def tail(worker: Any, chars: int = 4000) -> str:
    """The end of a worker's log, for assertion messages."""
    return str(worker.log()[-chars:])


#: The most ``max_new_tokens`` the endless-model tests allow: the tiny model's 4096 positions, less the prompt.
LONG_TOKENS = 4000
#: A job that must run to its end within a time limit: about 1 s on an idle 2-core machine, long enough
#: to be caught mid-run, yet far inside a 10 s limit even when the machine is busy (a busy shared machine
#: has made a 3,000-token job take 13 s).
RUN_TOKENS = 1000


def endless_worker_settings(model: Path, **settings: str | int) -> dict[str, str | int]:
    """``start_worker`` settings for the endless model with jobs of up to ``LONG_TOKENS`` tokens."""
    return {"model": str(model), "max_new_tokens_limit": LONG_TOKENS, **settings}


def long_settings():
    """Producer settings (the test process's own) that accept ``LONG_TOKENS``-token jobs."""
    from glyphq.celeryconfig import Settings

    return Settings.from_env({**os.environ, "GLYPHQ_MAX_NEW_TOKENS_LIMIT": str(LONG_TOKENS)})


def submit_long(seed: int, question: str = "A long answer, please", tokens: int = LONG_TOKENS):
    """Submit (from the test process, to the session's Redis) a job that generates ``tokens`` tokens."""
    from conftest import png_bytes

    from glyphq.producer import submit

    return submit(png_bytes((64, 48), seed=seed), question, max_new_tokens=tokens, settings=long_settings())


def submit_short(seed: int, question: str = "A short answer, please"):
    """Submit (from the test process, to the session's Redis) a four-token job."""
    from conftest import png_bytes

    from glyphq.producer import submit

    return submit(png_bytes((64, 48), seed=seed), question, max_new_tokens=4)


def task_id_of(raw: bytes) -> str | None:
    """The task id in a kombu message as stored in Redis (a queued message or an unacked entry)."""
    data = json.loads(raw)
    if isinstance(data, list):  # unacked entries are [message, exchange, routing_key]
        data = data[0]
    return data.get("headers", {}).get("id")


def pending_task_ids(client: redis.Redis) -> list[str | None]:
    """Ids of every task message still in Redis: queued on any ``gpu`` list, or taken and unacked."""
    from conftest import queued_messages

    return [task_id_of(m) for m in queued_messages(client)] + [task_id_of(v) for v in client.hvals("glyphq:unacked")]


def unacked_age(client: redis.Redis, task_id: str) -> float | None:
    """Seconds since a worker took the unacked message of ``task_id``; None if there is none."""
    for tag, raw in client.hgetall("glyphq:unacked").items():
        if task_id_of(raw) == task_id:
            score = client.zscore("glyphq:unacked_index", tag)
            return None if score is None else time.time() - float(score)
    return None


def kill_worker(worker: Any) -> None:
    """SIGKILL a worker's main process and its children (its whole process group), as a crash does."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(30)


def wait_started(client: redis.Redis, job: Any, timeout: float = 90) -> None:
    """Wait until a worker has started ``job`` (its runs counter is 1 and its state STARTED)."""
    from conftest import wait_until

    assert wait_until(lambda: runs(client, job.id) >= 1 and job.state == "STARTED", timeout), \
        f"job {job.id} never started (state {job.state}, runs {runs(client, job.id)})"


def rational_strip_offsets_tiff() -> bytes:
    """A 50-byte TIFF, found by fuzzing, whose StripOffsets tag is a SRATIONAL: Pillow's load() raises TypeError."""
    entries = [(256, 4, 1, 45), (257, 4, 1, 9), (273, 10, 1, 0)]  # width 45, height 9, StripOffsets (SRATIONAL)
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4


#: The third part of a Celery message body: no callbacks, errbacks, chain or chord.
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def publish_raw(body: object, headers: dict[str, Any], queue_name: str = "gpu") -> None:
    """Put a message on a glyphq queue as any process that can write to the Redis could."""
    from kombu import Producer

    from glyphq.tasks.app import app

    queue = app.amqp.queues[queue_name]
    with app.connection_for_write() as connection:
        Producer(connection).publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                                     headers=headers, serializer="json")
