"""docker-compose.yml and the Dockerfile. There is no Docker engine here, and the base image cannot be
pulled, so nothing is built or started: a real compose implementation (``docker-compose config``,
Debian's package) validates the file, and the rest is checked from the files themselves.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GLYPHQ_SERVICES = ("worker", "worker-gpu1", "render", "flower", "gateway")


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
    assert worker["command"][:4] == ["celery", "-A", "glyphq.tasks", "worker"]
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
    assert command[:4] == ["celery", "-A", "glyphq.tasks", "worker"]
    assert command[command.index("-Q") + 1] == "render"
    assert "deploy" not in compose["services"]["render"], "the render worker needs no GPU"


def test_flower_alone_requires_basic_auth(compose, tmp_path):
    flower = compose["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] is None, "passed on from the caller's environment"
    for name, service in compose["services"].items():
        text = yaml.safe_dump(service)
        assert ":?" not in text, f"{name}: a required variable would block every compose command"
    # Flower's own command refuses to start without a login (run up to the check, never to Flower).
    assert flower["command"][:2] == ["sh", "-c"]
    script = flower["command"][2].replace("$$", "$")
    assert script.endswith("exec celery -A glyphq.tasks flower --port=5555 --persistent=True --db=/data/flower.db")
    for value in (None, ""):
        env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
        if value is not None:
            env["FLOWER_BASIC_AUTH"] = value
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30,
                              cwd=tmp_path)
        assert done.returncode == 78 and "set FLOWER_BASIC_AUTH=user:password" in done.stderr, done


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)")
def test_compose_config_accepts_the_file_with_and_without_flower_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "GLYPHQ_MODEL", "GLYPHQ_API_KEYS")}
    plain = subprocess.run([str(DOCKER_COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "config"], env=env,
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    resolved = yaml.safe_load(plain.stdout)
    assert set(resolved["services"]) == {"redis", *GLYPHQ_SERVICES}
    assert resolved["services"]["worker"]["environment"]["GLYPHQ_MODEL"] == "zai-org/Glyph"
    env["FLOWER_BASIC_AUTH"] = "admin:change-me"
    with_auth = subprocess.run([str(DOCKER_COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "config"], env=env,
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert with_auth.returncode == 0, with_auth.stderr
    assert yaml.safe_load(with_auth.stdout)["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == \
        "admin:change-me"


def test_one_image_for_every_glyphq_service(compose):
    for name in GLYPHQ_SERVICES:
        service = compose["services"][name]
        assert (service["image"], service["build"]) == ("glyphq:latest", "."), name


def _dockerfile_paths(verb: str) -> set[str]:
    """The absolute paths a ``mkdir -p`` or ``chown`` of the Dockerfile names."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pattern = r"mkdir -p ([^&\n]+)" if verb == "mkdir" else r"chown \S+ ([^&\n]+)"
    return {word for match in re.findall(pattern, text) for word in match.split() if word.startswith("/")}


def test_image_creates_and_owns_every_path_a_service_writes(compose):
    written = set()
    for name in GLYPHQ_SERVICES:
        service = compose["services"][name]
        written |= {volume.split(":")[1] for volume in service.get("volumes", [])}
        env = service.get("environment") or {}
        written |= {env[k] for k in ("HF_HOME", "GLYPHQ_COMPILE_CACHE_DIR", "GLYPHQ_METRICS_DIR") if k in env}
        for word in " ".join(service["command"]).split():
            if word.startswith("--db="):
                written.add(os.path.dirname(word.removeprefix("--db=")))
    assert {"/hf-cache", "/compile-cache", "/data"} <= written
    assert written <= _dockerfile_paths("mkdir"), written - _dockerfile_paths("mkdir")
    assert written <= _dockerfile_paths("chown"), written - _dockerfile_paths("chown")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.index("chown") < dockerfile.index("USER glyphq")


def _dockerignored(name: str) -> bool:
    """Whether ``.dockerignore`` keeps the top-level entry ``name`` out (Docker's rule: the last match wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if fnmatch.fnmatch(name, line.lstrip("!").rstrip("/")):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_image_copies():
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(line.split()[1:-1])
    assert {"pyproject.toml", "LICENSE", "__init__.py", "celeryconfig.py", "producer", "tasks", "worker"} <= copied
    assert not [name for name in copied if _dockerignored(name)]
    for name in (".venv", ".demo", ".git", "tests", "bench", "samples", "models"):
        assert _dockerignored(name), name


def test_dockerfile_installs_worker_flower_and_gateway():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "'.[worker,render,flower,gateway]'" in dockerfile
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
    from glyphq.producer.cli import build_parser

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


def test_gateway_listens_wide_with_keys_from_the_environment_and_a_health_probe(compose):
    from glyphq.producer.cli import build_parser

    gateway = compose["services"]["gateway"]
    args = build_parser().parse_args(gateway["command"][1:])
    assert gateway["command"][0] == "glyphq" and (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert gateway["environment"]["GLYPHQ_API_KEYS"] is None, "passed on from the caller's environment"
    assert gateway["ports"] == ["8000:8000"] and "deploy" not in gateway, "the gateway needs no GPU"
    test = gateway["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and "http://127.0.0.1:8000/health" in test[-1]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


ENGINE_SETTINGS = {"GLYPHQ_MAX_BATCH": "max_batch", "GLYPHQ_KV_CACHE_TOKENS": "kv_cache_tokens",
                   "GLYPHQ_GPU_MEMORY_UTILIZATION": "gpu_memory_utilization", "GLYPHQ_PREFILL_CHUNK": "prefill_chunk",
                   "GLYPHQ_GPU_GUARD_MB": "gpu_guard_mb", "GLYPHQ_PREFIX_CACHE": "prefix_cache"}


def test_gpu_workers_pass_the_engine_settings_through_with_the_codes_defaults(compose):
    from glyphq.celeryconfig import Settings

    defaults = Settings()
    for name in ("worker", "worker-gpu1"):
        env = compose["services"][name]["environment"]
        for variable, field in ENGINE_SETTINGS.items():
            match = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(env.get(variable)))
            assert match is not None and match.group(1) == variable, (name, variable, env.get(variable))
            assert type(getattr(defaults, field))(match.group(2)) == getattr(defaults, field), (name, variable)
