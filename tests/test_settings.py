"""Settings from GLYPHQ_* env, and the Celery configuration built from them."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from glyphq import celeryconfig
from glyphq.celeryconfig import Settings, SettingsError, parse_box

ROOT = Path(__file__).resolve().parents[1]


def test_defaults():
    s = Settings.from_env({})
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.result_backend == s.broker_url
    assert s.model == "zai-org/Glyph"
    assert s.max_image_size == (1280, 720)
    assert s.history_turns == 3
    assert s.recycle_overlap_s == 30
    assert s.visibility_timeout_s > s.time_limit_s > s.soft_time_limit_s


def test_result_backend_defaults_to_broker():
    s = Settings.from_env({"GLYPHQ_BROKER_URL": "rediss://:pw@redis.example:6380/1"})
    assert s.result_backend == "rediss://:pw@redis.example:6380/1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GLYPHQ_MAX_TASKS_PER_CHILD": "many"}, "GLYPHQ_MAX_TASKS_PER_CHILD='many': expected an integer"),
        ({"GLYPHQ_MAX_TASKS_PER_CHILD": "0"}, "must be at least 1"),
        ({"GLYPHQ_MAX_IMAGE_SIZE": "1280"}, "expected WIDTHxHEIGHT"),
        ({"GLYPHQ_TIME_LIMIT": "100", "GLYPHQ_VISIBILITY_TIMEOUT": "100"}, "must be longer than GLYPHQ_TIME_LIMIT"),
        ({"GLYPHQ_TIME_LIMIT": "100", "GLYPHQ_VISIBILITY_TIMEOUT": "200"}, "GLYPHQ_TIME_LIMIT=100 times 2"),
        ({"GLYPHQ_MAX_BATCH": "0"}, "GLYPHQ_MAX_BATCH=0: must be at least 1"),
        ({"GLYPHQ_RECYCLE_OVERLAP_S": "-5"}, "GLYPHQ_RECYCLE_OVERLAP_S=-5: must be at least 0"),
        ({"GLYPHQ_TIME_LIMIT": "100", "GLYPHQ_SOFT_TIME_LIMIT": "200"}, "must not exceed GLYPHQ_TIME_LIMIT"),
        ({"GLYPHQ_REPETITION_PENALTY": "0.9"}, "GLYPHQ_REPETITION_PENALTY=0.9: must be from 1.0 to 2.0"),
        ({"GLYPHQ_REPETITION_PENALTY": "strong"}, "GLYPHQ_REPETITION_PENALTY='strong': expected a number"),
    ],
)
def test_bad_values_are_refused(env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env)


def test_parse_box():
    assert parse_box("720x1280") == (720, 1280)
    assert parse_box("1280×720") == (1280, 720)


def test_celery_settings(monkeypatch):
    monkeypatch.setenv("GLYPHQ_MAX_TASKS_PER_CHILD", "7")
    monkeypatch.setenv("GLYPHQ_TIME_LIMIT", "100")
    monkeypatch.setenv("GLYPHQ_SOFT_TIME_LIMIT", "90")
    cfg = importlib.reload(celeryconfig)
    try:
        assert cfg.accept_content == ["json"] and cfg.result_accept_content == ["json"]
        assert cfg.task_serializer == cfg.result_serializer == "json"
        assert cfg.task_acks_late and cfg.task_reject_on_worker_lost
        assert (cfg.worker_prefetch_multiplier, cfg.worker_concurrency, cfg.worker_pool) == (1, 1, "prefork")
        assert cfg.worker_max_tasks_per_child == 7
        assert cfg.worker_max_memory_per_child > 0
        assert (cfg.task_soft_time_limit, cfg.task_time_limit) == (90, 100)
        for value in (cfg.broker_transport_options["visibility_timeout"],
                      cfg.result_backend_transport_options["visibility_timeout"], cfg.visibility_timeout):
            assert value == 500 > 2 * cfg.task_time_limit  # two batches + 300
        assert cfg.result_expires >= 7 * 24 * 3600
        assert cfg.worker_send_task_events and cfg.task_send_sent_event and cfg.task_track_started
        assert cfg.broker_transport_options["queue_order_strategy"] == "priority"
        assert cfg.broker_transport_options["global_keyprefix"] == "glyphq:"
        assert cfg.result_backend_transport_options["global_keyprefix"] == "glyphq:"
        assert cfg.task_routes["glyphq.answer"]["queue"] == "gpu"
        assert cfg.broker_connection_retry_on_startup
        assert cfg.worker_cancel_long_running_tasks_on_connection_loss
        assert cfg.worker_proc_alive_timeout >= 60
    finally:
        monkeypatch.undo()
        importlib.reload(celeryconfig)


def test_celery_app_uses_celeryconfig():
    from glyphq.tasks.app import app

    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.worker_proc_alive_timeout == celeryconfig.worker_proc_alive_timeout


def test_every_setting_is_in_the_settings_table():
    source = (ROOT / "celeryconfig.py").read_text()
    names = set(re.findall(r'"(GLYPHQ_[A-Z_]+)"', source))
    table = (ROOT / "docs" / "settings.md").read_text()
    missing = sorted(n for n in names if f"| `{n}` |" not in table)
    assert not missing, f"settings missing from the table in docs/settings.md: {missing}"
    assert "docs/settings.md" in (ROOT / "README.md").read_text(), "the README does not link the settings table"
    assert len(names) >= 20


def test_no_environ_reads_outside_celeryconfig():
    """Settings are read in one place; setting a variable for a library (metrics) is not a read."""
    read = re.compile(r"os\.environ\.get|getenv|os\.environ\[[^\]]+\](?!\s*=[^=])|environ\)")
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("producer", "tasks", "worker")
        for path in (ROOT / package).rglob("*.py")
        if read.search(path.read_text())
    ]
    assert offenders == []


def test_visibility_timeout_covers_two_batches_only_when_batching():
    """A batched job may wait behind one batch and run in its own; unbatched, one hard limit is enough."""
    assert Settings.from_env({"GLYPHQ_TIME_LIMIT": "100"}).visibility_timeout_s == 500
    unbatched = Settings.from_env({"GLYPHQ_TIME_LIMIT": "100", "GLYPHQ_MAX_BATCH": "1",
                                   "GLYPHQ_VISIBILITY_TIMEOUT": "150"})
    assert unbatched.visibility_timeout_s == 150
    assert Settings.from_env({"GLYPHQ_TIME_LIMIT": "100", "GLYPHQ_MAX_BATCH": "1"}).visibility_timeout_s == 400


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_a_bad_setting_stops_the_glyphq_command_with_one_line_naming_it():
    """No traceback: JSON on stdout, one line on stderr naming the variable and its limit, exit 2."""
    glyphq = Path(sys.executable).with_name("glyphq")
    done = _run([str(glyphq), "status", "some-job"], GLYPHQ_MAX_BATCH="0")
    assert done.returncode == celeryconfig.EXIT_BAD_SETTING == 2, done
    assert json.loads(done.stdout) == {"ok": False, "error_type": "SettingsError",
                                       "error": "GLYPHQ_MAX_BATCH=0: must be at least 1"}
    assert done.stderr == "glyphq: bad setting: GLYPHQ_MAX_BATCH=0: must be at least 1\n"


def test_a_bad_setting_stops_a_celery_worker_with_one_line_naming_it():
    done = _run([sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker"], GLYPHQ_TIME_LIMIT="soon")
    assert done.returncode == 2, done
    assert done.stderr == "glyphq: bad setting: GLYPHQ_TIME_LIMIT='soon': expected an integer\n", done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_bad_setting_is_a_glyphq_error_for_a_library_importer():
    """A web backend importing glyphq gets the exception, under the one error tree, not an exit."""
    code = ("from glyphq import producer\n"
            "from glyphq.celeryconfig import Settings\n"
            "try:\n    Settings.from_env({'GLYPHQ_MAX_PAGES': '0'})\n"
            "except producer.GlyphqError as exc:\n"
            "    assert isinstance(exc, producer.SettingsError) and isinstance(exc, ValueError)\n"
            "    print(exc)\n")
    done = _run([sys.executable, "-c", code])
    assert done.returncode == 0 and done.stdout == "GLYPHQ_MAX_PAGES=0: must be at least 1\n", done
    imported = _run([sys.executable, "-c", "import glyphq.producer"], GLYPHQ_MAX_PAGES="0")
    assert imported.returncode == 1 and "glyphq.celeryconfig.SettingsError: GLYPHQ_MAX_PAGES=0" in imported.stderr


def test_queue_and_task_names_are_spelled_once():
    """Queue and task names live in celeryconfig; the packages use its constants, never the literals."""
    literal = re.compile(r"""["'](glyphq\.(answer|answer_pages|render))["']|queue=["']|enqueue\(cfg, ["']""")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in ("producer", "tasks", "worker")
                 for path in sorted((ROOT / package).rglob("*.py")) if path.name != "batch.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []
    assert celeryconfig.task_routes == {celeryconfig.ANSWER_TASK: {"queue": celeryconfig.GPU_QUEUE},
                                        celeryconfig.ANSWER_PAGES_TASK: {"queue": celeryconfig.GPU_QUEUE},
                                        celeryconfig.RENDER_TASK: {"queue": celeryconfig.RENDER_QUEUE}}
