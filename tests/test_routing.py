"""Routing a job to one GPU worker's own queue (``queue="gpu.<name>"``), for image and document jobs alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, png_bytes, queued_messages, wait_until

from glyphq.celeryconfig import Settings, is_gpu_queue
from glyphq.producer import InvalidJob, Job, submit, submit_document
from glyphq.producer.health import check_health

RULE = "queue: must be 'gpu' or 'gpu.<name>', the name 1 to 64 characters of a-z, 0-9, _ and -"


@pytest.mark.parametrize("name", ["gpu", "gpu.a", "gpu.host-2_gpu0", "gpu." + "a" * 64])
def test_gpu_queue_names(name):
    assert is_gpu_queue(name)


@pytest.mark.parametrize("queue", ["", "render", "GPU", "gpu.", "gpu.A", "gpu.a.b", "gpu.a b", "gpu:1",
                                   "gpu." + "a" * 65, "gpu.a\n", 5])
def test_bad_queue_is_refused_and_nothing_is_enqueued(queue, redis_client):
    before = set(redis_client.keys("*"))
    with pytest.raises(InvalidJob) as image:
        submit(png_bytes(), "q", queue=queue)
    with pytest.raises(InvalidJob) as document:
        submit_document("Some text.", "q", queue=queue)
    for info in (image, document):
        assert info.value.field == "queue" and str(info.value).startswith(RULE), str(info.value)
    assert set(redis_client.keys("*")) == before


def test_cli_refuses_a_bad_queue():
    out = subprocess.run([sys.executable, "-m", "glyphq.producer.cli", "submit", str(ROOT / "samples" / "chart.png"),
                          "q", "--queue", "gpu.Big"], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stderr
    assert json.loads(out.stdout)["error"].startswith(RULE)


def test_jobs_sent_to_a_worker_queue_wait_there_and_that_worker_answers_them(start_worker, redis_client, tmp_path):
    render = start_worker(queues="render")
    image = submit(png_bytes(seed=3), "What is here?", max_new_tokens=4, queue="gpu.a")
    text = tmp_path / "doc.txt"
    text.write_text("\n".join(f"Clause {i}: the rent for year {i} is {i * 1000} euro." for i in range(60)),
                    encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "glyphq.producer.cli", "ask-doc", str(text), "What is the rent?",
                          "--max-new-tokens", "4", "--queue", "gpu.a"],
                         cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    document = Job(json.loads(out.stdout)["job_id"])

    # Rendered on ``render``; the answer step, like the image job, waits on ``gpu.a`` and not on ``gpu``.
    def waiting() -> list[bytes]:
        return queued_messages(redis_client, "gpu.a")

    assert wait_until(lambda: len(waiting()) == 2, timeout=60), (waiting(), render.log()[-2000:])
    assert all(job.id.encode() in b"".join(waiting()) for job in (image, document))
    assert not queued_messages(redis_client, "gpu")

    worker = start_worker(queues="gpu,gpu.a")
    assert image.result(timeout=120)["answer"]
    assert document.result(timeout=120)["pages"] == 1
    # ``glyphq health --queue gpu.a`` finds the worker and its model.
    report = check_health("gpu.a", timeout=1, node=worker.name, settings=Settings.from_env(worker.env))
    assert report.ok and report.checks["model"]["loaded_on"] == [worker.name], report.to_dict()
