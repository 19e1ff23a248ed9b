"""A Redis Sentinel broker URL works end to end: Celery's queue and results, and glyphq's own keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import redis
from conftest import ROOT, RedisServer, WorkerProcess, free_port, png_bytes, wait_until


def _sentinel_answers(port: int) -> bool:
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        return client.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster") is not None
    except (OSError, redis.RedisError):
        return False


def test_sentinel_broker_url_end_to_end(tmp_path, tiny_model):
    (tmp_path / "master").mkdir()
    master = RedisServer(tmp_path / "master")
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
    sentinel = subprocess.Popen([shutil.which("redis-server"), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    worker = None
    try:
        assert wait_until(lambda: _sentinel_answers(port), timeout=15), "sentinel did not start"
        env = {**os.environ, "GLYPHQ_BROKER_URL": f"sentinel://127.0.0.1:{port}/0",
               "GLYPHQ_SENTINEL_MASTER": "mymaster", "GLYPHQ_MODEL": str(tiny_model), "GLYPHQ_METRICS_PORT": "0"}
        env.pop("GLYPHQ_RESULT_BACKEND", None)
        worker = WorkerProcess(env, tmp_path / "worker.log")
        worker.wait_ready()
        image = tmp_path / "page.png"
        image.write_bytes(png_bytes(seed=5))
        out = subprocess.run([sys.executable, "-m", "glyphq.producer.cli", "submit", str(image), "Through Sentinel?",
                              "--wait", "--timeout", "90", "--max-new-tokens", "3"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["answer"]
        keys = {k.decode() for k in redis.Redis(port=master.port).keys("*")}
        assert f"glyphq:celery-task-meta-{result['job_id']}" in keys
        assert f"glyphq:job:{result['job_id']}" in keys and f"glyphq:runs:{result['job_id']}" in keys
    finally:
        if worker is not None:
            worker.stop()
        sentinel.kill()
        sentinel.wait(10)
        master.stop()


def test_sentinel_url_needs_a_master_name():
    import pytest

    from glyphq.celeryconfig import Settings, SettingsError

    with pytest.raises(SettingsError, match="GLYPHQ_SENTINEL_MASTER"):
        Settings.from_env({"GLYPHQ_BROKER_URL": "sentinel://127.0.0.1:26379/0"})
