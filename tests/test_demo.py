"""``make demo`` (scripts/demo.sh) run as a user runs it: its own Redis, the tiny model, two workers and Flower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port


def test_the_demo_answers_and_stops_its_workers_cleanly_before_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLYPHQ_BROKER_URL", "GLYPHQ_MODEL")}
    env.update(VENV=str(Path(sys.executable).parents[1]), DEMO_DIR=str(tmp_path / "demo"),
               FLOWER_PORT=str(free_port()))
    done = subprocess.run(["scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("  A: ") == 4, done.stdout
    assert "vision tokens (" in done.stdout and "x: the tiny model's figure, not Glyph's)" in done.stdout

    # Each worker stopped while Redis was still up: a warm shutdown, its child stopped by it, no lost lease.
    for log in ("worker.log", "render.log"):
        text = (tmp_path / "demo" / log).read_text(errors="replace")
        problems = [line for line in text.splitlines() if "ERROR/" in line or "WARNING/" in line]
        assert not problems, (log, problems)
