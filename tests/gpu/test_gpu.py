"""On a CUDA machine: Glyph's architecture (GLM-4.1V, toy size) through the real queue, in bf16.

Run with ``pytest -m gpu tests/gpu``; skipped where CUDA is unavailable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from conftest import ROOT, png_bytes  # noqa: E402

from glyphq.producer import submit, submit_document  # noqa: E402


@pytest.fixture(scope="module")
def glm4v_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glm4v-tiny")
    subprocess.run([sys.executable, "-m", "glyphq.worker.tiny", str(out), "--preset", "glm4v-tiny"], check=True,
                   cwd=ROOT)
    return out


def _compute_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True)
    return {int(line) for line in out.stdout.split() if line.strip().isdigit()}


def test_glm4v_answers_in_bf16_with_gpu_figures(start_worker, glm4v_tiny):
    worker = start_worker(model=glm4v_tiny)
    result = submit(png_bytes((1600, 900), seed=1), "What is the total?", max_new_tokens=8).result(timeout=120)
    assert result["image_size_used"] == [1280, 720]
    assert result["gpu"] is not None
    assert result["gpu"]["peak_mb"] > 0 and result["gpu"]["reserved_mb"] >= 0
    assert result["tokens_in"] > 100  # GLM-4V spends ~1,200 image tokens on a 1280x720 image
    # Only the child holds a CUDA context; the parent never touched CUDA before forking.
    pids = _compute_pids()
    if pids:  # nvidia-smi may not see processes inside some sandboxes
        assert worker.proc.pid not in pids
        assert set(worker.children()) & pids


def test_recycling_with_cuda(start_worker, glm4v_tiny):
    start_worker(model=glm4v_tiny, max_tasks_per_child=2)
    jobs = [submit(png_bytes(seed=i), f"q{i}", max_new_tokens=4) for i in range(6)]
    results = [j.result(timeout=180) for j in jobs]
    assert len({r["worker"]["pid"] for r in results}) == 3


def test_gpu_guard_replaces_the_child_once_its_batch_ends(start_worker, glm4v_tiny):
    """Past the guard, a child finishes the jobs it runs and is replaced. Jobs sent one at a time each
    end a batch, so each goes to a new child."""
    start_worker(model=glm4v_tiny, gpu_guard_mb=1)
    results = [submit(png_bytes(seed=10 + i), "guard", max_new_tokens=4).result(timeout=180) for i in range(3)]
    assert len({r["worker"]["pid"] for r in results}) == 3
    assert all(r["worker"]["task_index"] == 1 for r in results)
    assert all(r["gpu"]["reserved_mb"] > 1 for r in results), "a reading from the child's load on"


def test_document_pages_in_one_glm4v_prompt(start_worker, glm4v_tiny):
    start_worker(queues="render", concurrency=2)
    start_worker(model=glm4v_tiny)
    text = (ROOT / "samples" / "lease.txt").read_text(encoding="utf-8")
    result = submit_document(text, "When does the lease end?", max_new_tokens=8).result(timeout=300)
    assert result["pages"] >= 2
    assert result["image_size_used"] == result["image_size"]  # A4 at 72 dpi is not shrunk
    assert result["vision_tokens"] > 300 * result["pages"]
    assert result["tokens_in"] > result["vision_tokens"]
