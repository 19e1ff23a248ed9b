"""Soak: 20,000 jobs on the tiny model with a child replaced every 50 jobs, through bench/soak.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

RESULTS = ROOT / "bench" / "results" / "soak.json"
JOBS = 20_000


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
def test_soak_20000_jobs_nothing_lost_or_repeated_memory_and_keys_steady():
    """Soak: 20,000 jobs (after 100 warm-up jobs), GLYPHQ_MAX_TASKS_PER_CHILD=50, TTLs of 60 s.

    No job is lost, failed or run twice (every runs counter is 1), the worker's main process stays
    within ±10% of its resident memory after the warm-up, and once the results, blobs and sessions
    have expired Redis holds the keys it held before the run, and no other. bench/soak.py prints the
    figures and writes them to bench/results/soak.json.
    """
    started = RESULTS.stat().st_mtime if RESULTS.exists() else 0.0
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--jobs", str(JOBS), "--max-tasks-per-child", "50",
                           "--ttl", "60"], cwd=ROOT, timeout=6 * 3600 - 100)
    assert RESULTS.exists() and RESULTS.stat().st_mtime > started, "bench/soak.py wrote no results"
    figures = json.loads(RESULTS.read_text())["figures"]

    assert figures["jobs"] == JOBS and figures["answered"] == JOBS
    assert figures["lost"] == 0 and figures["failed"] == 0
    assert figures["duplicated"] == 0 and figures["received_more_than_once"] == 0
    assert figures["max_task_index"] == 50 and figures["children"] >= JOBS // 50
    assert figures["parent_rss_change_max"] <= 0.10, figures
    assert figures["redis_keys_after_expiry"] <= figures["redis_keys_before"], figures
    assert figures["redis_keys_left_over"] == []
    assert figures["worker_alive_at_end"]
    assert done.returncode == 0
