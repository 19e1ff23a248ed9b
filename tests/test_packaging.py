"""glyphq installs as one package, ``glyphq``: a web backend with its own top-level ``tasks.py`` and
``celeryconfig.py`` (the Celery tutorial's layout) installs the wheel and submits jobs beside its own app."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

#: What the wheel is built from (pyproject.toml's package-dir, readme and license files).
PACKAGE_SOURCES = ["pyproject.toml", "README.md", "LICENSE", "__init__.py", "celeryconfig.py",
                   "producer", "tasks", "worker"]

USER_TASKS = """\
from celery import Celery

app = Celery("tasks")
app.config_from_object("glyphq.celeryconfig")


@app.task
def add(x, y):
    return x + y
"""

USER_BACKEND = """\
import io
import json
import sys

import celeryconfig
import tasks
from PIL import Image

import glyphq.producer
from glyphq.producer import submit

image = io.BytesIO()
Image.new("RGB", (64, 48), "white").save(image, format="PNG")
result = submit(image.getvalue(), "What is shown?", max_new_tokens=4).result(timeout=120)
print(json.dumps({
    "answer": result["answer"],
    "worker_pid": result["worker"]["pid"],
    "glyphq": glyphq.producer.__file__,
    "tasks": tasks.__file__,
    "user_task": tasks.add.name,
    "user_broker": celeryconfig.broker_url,
}))
"""


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel built from this checkout, a folder it is installed into)."""
    build = tmp_path_factory.mktemp("wheel")
    source = build / "source"  # setuptools writes build/ beside the sources: keep it out of the checkout
    source.mkdir()
    for name in PACKAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(build), str(source)], check=True, capture_output=True, timeout=180)
    wheel = next(build.glob("glyphq-*.whl"))
    site = build / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=180)
    return wheel, site


def test_the_wheel_holds_one_top_level_package(installed_wheel):
    wheel, _ = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"glyphq"}, top
    assert {"glyphq/__init__.py", "glyphq/celeryconfig.py", "glyphq/tasks/app.py", "glyphq/producer/cli.py",
            "glyphq/worker/fonts/DejaVuSans.ttf"} <= set(names)
    assert not [name for name in names if name.startswith(("glyphq/tests/", "glyphq/bench/"))]


def test_a_backend_with_its_own_tasks_and_celeryconfig_submits_jobs(installed_wheel, tiny_model, tmp_path,
                                                                     redis_url):
    """The backend and a worker both run from the wheel, in a folder with the tutorial's two files."""
    import psutil

    _, site = installed_wheel
    project = tmp_path / "backend"
    project.mkdir()
    user_broker = redis_url.rsplit("/", 1)[0] + "/5"
    (project / "tasks.py").write_text(USER_TASKS)
    (project / "celeryconfig.py").write_text(f"broker_url = {user_broker!r}\nresult_backend = {user_broker!r}\n")
    (project / "backend.py").write_text(USER_BACKEND)
    env = {**os.environ, "PYTHONPATH": str(site), "GLYPHQ_BROKER_URL": redis_url, "GLYPHQ_MODEL": str(tiny_model),
           "GLYPHQ_METRICS_PORT": "0"}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "glyphq.tasks", "worker", "-n",
                                   "wheel@%h", "--without-mingle", "--without-gossip"],
                                  cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = subprocess.run([sys.executable, "backend.py"], cwd=project, env=env, capture_output=True, text=True,
                             timeout=180)
        children = {child.pid for child in psutil.Process(worker.pid).children()}
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    assert out.returncode == 0, out.stderr[-3000:] + (tmp_path / "worker.log").read_text(errors="replace")[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["answer"] and seen["worker_pid"] in children, (seen, children)
    assert Path(seen["glyphq"]).is_relative_to(site), "glyphq came from the installed wheel"
    assert Path(seen["tasks"]).parent == project and seen["user_task"] == "tasks.add"
    assert seen["user_broker"] == user_broker, "the backend's own celeryconfig is untouched"


def test_a_checkout_still_serves_celery_a_tasks():
    """``celery -A tasks worker`` from a checkout loads the same app as ``celery -A glyphq.tasks worker``."""
    code = textwrap.dedent(
        """
        import tasks, glyphq.tasks
        assert tasks.app is glyphq.tasks.app
        assert {"glyphq.answer", "glyphq.answer_pages", "glyphq.render"} <= set(tasks.app.tasks)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
