"""Fixtures for the fault-injection tests: own redis-servers, subprocess producers, a clean queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.helpers import FaultRedis, ProducerProcess, producer_env


@pytest.fixture(autouse=True)
def _empty_session_queue(redis_client) -> None:
    """Start every fault test with no message queued or unacknowledged on the session's Redis.

    Other test modules share that Redis; a message one of them left behind would otherwise be
    consumed by this test's worker and muddle its counts.
    """
    keys = [k for k in redis_client.keys("glyphq:gpu*") + redis_client.keys("glyphq:render*")
            if redis_client.type(k) == b"list"]
    keys += redis_client.keys("glyphq:unacked*")
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator:
    """Start redis-servers of this test's own: ``fault_redis(appendonly=True, password=None, **options)``,
    where ``options`` are more redis-server settings (``maxmemory="8mb"``)."""
    servers: list[FaultRedis] = []

    def start(appendonly: bool = True, password: str | None = None, **options: str) -> FaultRedis:
        server = FaultRedis(tmp_path / f"redis-{len(servers)}", appendonly=appendonly, password=password,
                            options={name.replace("_", "-"): value for name, value in options.items()})
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def producer_process(tmp_path: Path) -> Iterator:
    """Start producers in subprocesses: ``producer_process(broker_url=..., **GLYPHQ_settings)``."""
    started: list[ProducerProcess] = []

    def start(**settings: str | int) -> ProducerProcess:
        producer = ProducerProcess(producer_env(**settings), tmp_path / f"producer-{len(started)}.log")
        started.append(producer)
        return producer

    yield start
    for producer in started:
        producer.stop()
