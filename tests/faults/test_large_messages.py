"""Messages as large as users send them, and larger, through real workers on the tiny model.

Glyph is a Chinese-first model: long Chinese questions and conversations are everyday traffic. The
worker's event loop never waits for its child to read the jobs pipe, so a backlog of them, or one long
conversation, is answered; a worker stops on SIGTERM while its child still loads its model; and a
message larger than ``GLYPHQ_MAX_MESSAGE_BYTES`` fails alone.
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WorkerProcess, png_bytes, raw_job, wait_until

from faults.helpers import ready_worker, tail, unacked_tags
from glyphq.producer import Job, JobFailed, submit
from glyphq.producer.schema import ANSWER_TASK
from glyphq.tasks.app import app

#: Seconds the slowed child of the backlog test spends "loading its model" before it serves.
SLOW_LOAD_S = 10
#: Jobs in the backlog: more than the worker reserves (80 at GLYPHQ_MAX_BATCH=64).
BACKLOG = 150
#: CJK ideographs (the first 2,000 of the Unicode block); 6 bytes each as JSON escapes, 3 as UTF-8.
HANZI = "".join(chr(code) for code in range(0x4E00, 0x4E00 + 2000))


def chinese(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(HANZI) for _ in range(chars))


def slowed_load(folder: Path, seconds: int) -> str:
    """A folder for PYTHONPATH whose ``sitecustomize`` makes each new child of a worker wait ``seconds``
    in Celery's ``worker_process_init``, where glyphq loads the model: a model that loads slowly."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import time\n"
        "from celery import signals\n\n\n"
        "@signals.worker_process_init.connect(weak=False)\n"
        "def _slow_model_load(**_):\n"
        f"    time.sleep({seconds})\n"
    )
    return str(folder)


def worker_env(redis_url: str, model: Path, **settings: str) -> dict[str, str]:
    return {**os.environ, "GLYPHQ_BROKER_URL": redis_url, "GLYPHQ_MODEL": str(model), "GLYPHQ_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1", **{f"GLYPHQ_{k.upper()}": v for k, v in settings.items()}}


def test_a_backlog_of_chinese_questions_while_the_model_loads_sigterm_then_drained(
        tiny_model, redis_url, redis_client, tmp_path):
    image = png_bytes((48, 32), seed=5)
    jobs = [submit(image, chinese(120, seed), max_new_tokens=2) for seed in range(BACKLOG)]
    slow = slowed_load(tmp_path / "slow", SLOW_LOAD_S)
    first = WorkerProcess(worker_env(redis_url, tiny_model) | {"PYTHONPATH": slow}, tmp_path / "first.log")
    try:
        # It reserves a full hand-over (80 jobs, over 64 KiB of frames) while its child still loads.
        assert wait_until(lambda: len(unacked_tags(redis_client)) >= 80, timeout=60), tail(first)
        os.kill(first.proc.pid, signal.SIGTERM)  # as `docker stop` does: the main process only
        first.proc.wait(timeout=SLOW_LOAD_S + 45)
    finally:
        first.stop()
    assert first.proc.returncode is not None
    assert not any(job.ready() for job in jobs), "the first worker's child was loading: it answered nothing"

    second = WorkerProcess(worker_env(redis_url, tiny_model) | {"PYTHONPATH": slowed_load(tmp_path / "s2", 3)},
                           tmp_path / "second.log")
    try:
        answers = [job.result(timeout=180) for job in jobs]
    finally:
        second.stop()
    assert len(answers) == BACKLOG and all(a["tokens_out"] >= 1 for a in answers)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_url: str) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("large") / "worker.log"
    with ready_worker(redis_url, tiny_model, log) as process:
        yield process


def conversation(seed: int) -> tuple[list[dict[str, str]], str]:
    """A conversation within every limit: 15,600 characters of earlier turns and a 1,500-character question
    (about 103 KB as JSON escapes, 52 KB as UTF-8)."""
    history = [{"question": chinese(2600, seed + i), "answer": chinese(2600, seed + 10 + i)} for i in range(3)]
    return history, chinese(1500, seed + 20)


def still_answers(worker: WorkerProcess, seed: int) -> None:
    result = submit(png_bytes((64, 48), seed=seed), "Still answering?", max_new_tokens=4).result(timeout=60)
    assert result["answer"] is not None, tail(worker)


def test_a_long_chinese_conversation_on_an_idle_worker_is_answered_and_so_is_the_next_job(worker):
    history, question = conversation(100)
    image = png_bytes((64, 48), seed=3)
    result = submit(image, question, history=history, max_new_tokens=4).result(timeout=120)
    alone = submit(image, question, max_new_tokens=4).result(timeout=60)
    assert result["tokens_out"] >= 1
    assert result["tokens_in"] > alone["tokens_in"], "the earlier turns reach the prompt"
    still_answers(worker, 4)


def test_a_long_chinese_conversation_through_the_gateway(worker, redis_url, tiny_model, tmp_path):
    from test_gateway import KEY, Gateway, data_url

    gateway = Gateway(tmp_path / "serve.log", broker_url=redis_url, model=str(tiny_model), api_keys=KEY)
    try:
        client = gateway.client()
        model = client.models.list().data[0].id
        history, question = conversation(200)
        messages: list[dict] = []
        for turn in history:
            messages += [{"role": "user", "content": turn["question"]},
                         {"role": "assistant", "content": turn["answer"]}]
        messages[0]["content"] = [{"type": "image_url", "image_url": {"url": data_url(7)}},
                                  {"type": "text", "text": history[0]["question"]}]
        messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, timeout=120)
        assert reply.usage.completion_tokens >= 1
    finally:
        gateway.stop()
    still_answers(worker, 5)


def send_raw(job: dict, task_id: str | None = None) -> Job:
    task_id = task_id or uuid.uuid4().hex
    app.send_task(ANSWER_TASK, kwargs={"job": job}, task_id=task_id, queue="gpu")
    return Job(task_id)


def refused(job: Job, worker: WorkerProcess) -> JobFailed:
    with pytest.raises(JobFailed) as caught:
        job.result(timeout=60)
    assert worker.proc.poll() is None, tail(worker)
    return caught.value


def test_a_message_over_the_size_limit_fails_alone_naming_the_size_and_the_limit(worker):
    job = send_raw(raw_job("glyphq:blob:" + "0" * 64, question="q" * 10_000_000))  # 10 MB of question
    failure = refused(job, worker)
    assert failure.error_type == "InvalidJob"
    assert "message" in str(failure) and "1048576" in str(failure) and "GLYPHQ_MAX_MESSAGE_BYTES" in str(failure)
    still_answers(worker, 6)


def test_ten_thousand_history_turns_fail_alone_naming_the_history(worker):
    job = send_raw(raw_job("glyphq:blob:" + "0" * 64, history=[{"question": "q", "answer": "a"}] * 10_000))
    failure = refused(job, worker)
    assert failure.error_type == "InvalidJob" and "history" in str(failure)
    still_answers(worker, 8)
