"""Real parts for the tests: a redis-server per session, the tiny model, and celery worker subprocesses.

The session's redis-server starts in ``pytest_configure``, before any test module imports
``celeryconfig``, so the settings the tests import point at it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process on a free port, which a test may stop and start again."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise RuntimeError("redis-server is not on PATH; `make test` installs it")
        self.proc = subprocess.Popen(
            [redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


_session_redis: RedisServer | None = None
_session_dir: tempfile.TemporaryDirectory[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _session_redis, _session_dir
    _session_dir = tempfile.TemporaryDirectory(prefix="glyphq-test-")
    _session_redis = RedisServer(Path(_session_dir.name))
    _session_redis.start()
    os.environ["GLYPHQ_BROKER_URL"] = _session_redis.url
    os.environ.pop("GLYPHQ_RESULT_BACKEND", None)
    # The tiny random models rarely end a turn: keep the answers of jobs that set no max_new_tokens
    # short (the default, 8,192, is sized for Glyph's reasoning). Tests of the defaults read Settings.from_env({}).
    os.environ.setdefault("GLYPHQ_DEFAULT_MAX_NEW_TOKENS", "256")
    # A row (prompt and new tokens) is at most this many: the tiny models' prompts are short.
    os.environ.setdefault("GLYPHQ_DECODE_MAX_TOKENS", "4096")
    # One torch thread in every worker the tests start: on a shared CPU, spinning OpenMP threads make
    # each decode step of the tiny model twenty times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    reap_stopped_workers()
    if _session_redis is not None:
        _session_redis.stop()
    if _session_dir is not None:
        _session_dir.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the session's redis-server."""
    assert _session_redis is not None
    return _session_redis.url


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def glm4v_in_memory():
    """A toy GLM-4.1V (2 layers, 64 wide), made in memory with seed 0: image token 120, image start and end
    122 and 123, a 2x2 merge of patches. Its image processor needs torchvision, so tests make its pixels
    and grids themselves."""
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    torch.manual_seed(0)
    config = Glm4vConfig(
        text_config={"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64},
        image_token_id=120, video_token_id=121, image_start_token_id=122, image_end_token_id=123,
        video_start_token_id=124, video_end_token_id=125)
    return Glm4vForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA model, built once per session with ``python -m glyphq.worker.tiny``."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "glyphq.worker.tiny", str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def endless_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model with no end-of-sequence token, so a job always runs ``max_new_tokens`` steps."""
    import json

    out = tmp_path_factory.mktemp("endless-model")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = None
    gen_path.write_text(json.dumps(gen))
    return out


class WorkerProcess:
    """A real ``celery -A glyphq.tasks worker`` subprocess (prefork, concurrency 1) and its log."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str | None = None,
                 concurrency: int | None = None) -> None:
        # The host part spelled out (what Celery's %h gives), so that a health check can name this worker.
        self.name = f"w{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.env = env
        self.log_path = log_path
        cmd = [sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker", "-l", "info", "-n", self.name,
               "--without-mingle", "--without-gossip"]
        if queues:
            cmd += ["-Q", queues]
        if concurrency:
            cmd += ["-c", str(concurrency)]
        from glyphq.celeryconfig import is_gpu_queue

        gpu_queues = ["gpu"] if queues is None else [q for q in queues.split(",") if is_gpu_queue(q)]
        self.loads_model = bool(gpu_queues)
        #: The queue whose health says this worker is ready: its first GPU queue (model loaded) if it serves one.
        self.queue = gpu_queues[0] if gpu_queues else str(queues).split(",")[0]
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, timeout: float = 0.5):
        """``glyphq health --queue Q --node <this worker>`` against this worker's own broker, in process."""
        from glyphq.celeryconfig import Settings
        from glyphq.producer.health import check_health

        return check_health(self.queue, timeout=timeout, node=self.name, settings=Settings.from_env(self.env))

    def ready(self) -> bool:
        """True once the worker's own health says so: it consumes its queue, answers a ping over the
        control channel and, on the GPU queue, reports its model loaded (``inspect stats``)."""
        return self.proc.poll() is None and self.health().ok

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until :meth:`ready`; raise with the end of the log if the worker exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # A short probe: a worker not yet listening misses the broadcast and the probe waits it out,
            # while one that listens answers within milliseconds.
            if self.proc.poll() is None and self.health(timeout=READY_PROBE_S).ok:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout} s ({self.health().error}):\n{self.log()[-3000:]}")

    def children(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the worker and its children); SIGKILL whatever is left after 20 s."""
        self._terminate()
        self._finish()

    def stop_soon(self) -> None:
        """Stop the worker without waiting for the end of its main process.

        Returns ``STOP_GRACE_S`` after SIGTERM, once its children are gone. Its shutdown stops the
        consumer first (Celery stops the consumer before the pool), within milliseconds of the signal,
        so by then it can no longer take a job or answer a health check. The main process takes seconds
        more to exit (billiard's pool, then the interpreter with torch winding down); that end is waited
        for in a thread, and by ``reap_stopped_workers`` at the end of the session.
        """
        children = self.children()
        self._terminate()
        start = time.monotonic()
        time.sleep(STOP_GRACE_S)  # the signal handler's shutdown closes the consumer within milliseconds
        while self.proc.poll() is None and time.monotonic() < start + 20 and any(_alive(pid) for pid in children):
            time.sleep(0.05)
        thread = threading.Thread(target=self._finish, name=f"stop-{self.name}", daemon=True)
        thread.start()
        _stopping.append(thread)

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def _finish(self) -> None:
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any child left behind
        self._log.close()


#: Seconds each readiness probe of ``wait_ready`` waits for the worker's replies.
READY_PROBE_S = 0.25
#: Seconds ``stop_soon`` waits at least after SIGTERM, for the worker to close its broker consumer.
STOP_GRACE_S = 0.5
#: Threads finishing the stop of workers that ``stop_soon`` left to end on their own.
_stopping: list[threading.Thread] = []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap_stopped_workers() -> None:
    """Wait for every worker that ``stop_soon`` stopped to have exited."""
    while _stopping:
        _stopping.pop().join(60)


def _worker_starter(log_dir: Path, tiny_model: Path, redis_url: str, started: list[WorkerProcess]):
    """``start(wait=True, queues=None, concurrency=None, **settings)``: a worker with extra ``GLYPHQ_*``
    settings, appended to ``started`` (whoever owns the list stops them)."""

    def start(wait: bool = True, queues: str | None = None, concurrency: int | None = None,
              **settings: str | int) -> WorkerProcess:
        env = {**os.environ, "GLYPHQ_BROKER_URL": redis_url, "GLYPHQ_MODEL": str(tiny_model),
               "GLYPHQ_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"}
        env.update({f"GLYPHQ_{k.upper()}": str(v) for k, v in settings.items()})
        worker = WorkerProcess(env, log_dir / f"worker-{len(started)}.log", queues, concurrency)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    return start


@pytest.fixture
def start_worker(tmp_path: Path, tiny_model: Path, redis_url: str) -> Iterator:
    """Start worker subprocesses with extra ``GLYPHQ_*`` settings; all are stopped after the test."""
    started: list[WorkerProcess] = []
    yield _worker_starter(tmp_path, tiny_model, redis_url, started)
    for worker in started:
        worker.stop_soon()


@pytest.fixture(scope="class")
def start_class_worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_url: str) -> Iterator:
    """``start_worker`` for the tests of a class: the workers it starts are shared by them, stopped after them.

    A test that starts one with the settings an earlier test of its class used gets that same worker
    back, so a class pays for each kind of worker once. The tests must not depend on what the workers
    did before them (the child's count of jobs, its counters), and a class keeps them together, so the
    workers never run during a test elsewhere in the module that needs the queue left alone.
    """
    started: list[WorkerProcess] = []
    start = _worker_starter(tmp_path_factory.mktemp("class-workers"), tiny_model, redis_url, started)
    by_settings: dict[tuple, WorkerProcess] = {}

    def start_shared(wait: bool = True, queues: str | None = None, concurrency: int | None = None,
                     **settings: str | int) -> WorkerProcess:
        key = (queues, concurrency, tuple(sorted((k, str(v)) for k, v in settings.items())))
        worker = by_settings.get(key)
        if worker is None or worker.proc.poll() is not None:
            worker = by_settings[key] = start(wait, queues, concurrency, **settings)
        elif wait:
            worker.wait_ready()
        return worker

    try:
        yield start_shared
    finally:
        for worker in started:
            worker.stop_soon()


@pytest.fixture(scope="class")
def class_worker(start_class_worker) -> WorkerProcess:
    """One GPU worker at the default settings, shared by the tests of a class (``start_class_worker``).

    For tests that only need some worker to answer their jobs: each costs no worker start of its own.
    """
    return start_class_worker()


def png_bytes(size: tuple[int, int] = (640, 480), color: str = "white", seed: int = 0) -> bytes:
    """A small PNG with a little structure, so different seeds give different answers."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    for i in range(8):
        x = (seed * 37 + i * 53) % size[0]
        y = (seed * 91 + i * 29) % size[1]
        draw.rectangle([x, y, x + 40, y + 20], fill=(i * 30 % 256, seed * 50 % 256, 120))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def queued_messages(client, queue: str = "gpu") -> list[bytes]:
    """Every message waiting on ``queue``, over all its Redis priority sub-queues."""
    messages: list[bytes] = []
    names = {f"glyphq:{queue}".encode()} | {f"glyphq:{queue}:{p}".encode() for p in range(1, 10)}
    for key in sorted(client.keys(f"glyphq:{queue}*")):
        if key in names and client.type(key) == b"list":  # not ``gpu.a``'s when asked for ``gpu``'s
            messages.extend(client.lrange(key, 0, -1))
    return messages


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(interval)
    return True


def raw_job(image_key: str, size: tuple[int, int] = (1, 1), **fields: object) -> dict:
    """A ``glyphq.answer`` message built by hand, as a producer that skips ``submit`` would send it."""
    from glyphq.producer.schema import JobMessage

    message = JobMessage(image_keys=(image_key,), image_sizes=(size,), image_bytes=1, question="q",
                         max_new_tokens=4, session=None, submitted_at=time.time()).to_dict()
    message.update(fields)
    return message
