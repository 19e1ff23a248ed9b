"""docker-compose.yml cannot run here (no Docker engine), so its structure is checked instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services(compose):
    assert {"redis", "worker", "flower"} <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], f"{name}: undeclared volume {volume}"


def test_redis_persists_and_has_healthcheck(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command  # a full Redis refuses jobs, never drops queued ones
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_worker_has_gpu_hf_cache_and_model_from_env(compose):
    worker = compose["services"]["worker"]
    assert worker["command"][:4] == ["celery", "-A", "tasks", "worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = worker["environment"]
    assert env["GLYPHQ_MODEL"].startswith("${GLYPHQ_MODEL")
    assert env["GLYPHQ_BROKER_URL"] == "redis://redis:6379/0"
    cache = env["HF_HOME"]
    assert any(v.split(":")[1] == cache for v in worker["volumes"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_render_worker_consumes_the_render_queue(compose):
    command = compose["services"]["render"]["command"]
    assert command[:4] == ["celery", "-A", "tasks", "worker"]
    assert command[command.index("-Q") + 1] == "render"
    assert "deploy" not in compose["services"]["render"], "the render worker needs no GPU"


def test_flower_requires_basic_auth_from_env(compose):
    flower = compose["services"]["flower"]
    assert flower["command"][:4] == ["celery", "-A", "tasks", "flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_BASIC_AUTH:?"), "compose must refuse to start Flower without auth"
    assert "--persistent=True" in flower["command"]


def test_dockerfile_installs_worker_and_flower():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "'.[worker,render,flower]'" in dockerfile
    assert "USER glyphq" in dockerfile


def _healthcheck_args(service: dict) -> list[str]:
    """The arguments of the ``glyphq health`` call in a service's healthcheck (compose's $$ unescaped)."""
    import shlex

    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    words = shlex.split(test[1].replace("$$", "$"))
    start = words.index("glyphq")
    assert words[start + 1] == "health"
    return words[start + 1:]


def test_second_gpu_worker_is_the_first_on_gpu_1(compose):
    services = compose["services"]
    first, second = services["worker"], services["worker-gpu1"]
    devices = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in (first, second)]
    assert devices == [["0"], ["1"]]
    nodes = [s["command"][s["command"].index("-n") + 1] for s in (first, second)]
    assert nodes == ["gpu0@%h", "gpu1@%h"]

    def normalized(service: dict) -> dict:
        copy = yaml.safe_load(yaml.safe_dump(service))
        copy["command"][copy["command"].index("-n") + 1] = "NODE"
        copy["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = ["GPU"]
        copy["healthcheck"]["test"] = ["NODE"]
        return copy

    assert normalized(first) == normalized(second), "worker-gpu1 should differ from worker only in GPU and name"


def test_healthchecks_run_glyphq_health_for_each_node(compose):
    from producer.cli import build_parser

    services = compose["services"]
    for name, queue, node in [("worker", "gpu", "gpu0@$HOSTNAME"), ("worker-gpu1", "gpu", "gpu1@$HOSTNAME"),
                              ("render", "render", "render@$HOSTNAME")]:
        args = build_parser().parse_args(_healthcheck_args(services[name]))
        assert (args.command, args.queue, args.node) == ("health", queue, node), name
        command = services[name]["command"]
        assert command[command.index("-n") + 1] == node.replace("$HOSTNAME", "%h"), name
    flower = build_parser().parse_args(_healthcheck_args(services["flower"]))
    assert flower.command == "health" and flower.broker_only
    assert "/healthcheck" in services["flower"]["healthcheck"]["test"][1]
    assert services["worker"]["healthcheck"]["start_period"] in ("900s", "15m")
