"""The channel between a GPU worker's main process and its child: the main process never waits for room
in the jobs pipe, frames are UTF-8, a message longer than the pipe arrives whole, the draining flag reaches a
forked child, and what a child reports right before it exits is all read."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import time
from collections.abc import Iterator

import pytest

from glyphq.tasks.channel import FRAME_BYTES, Channel, encode


@pytest.fixture
def channel() -> Iterator[Channel]:
    """A channel whose four pipe ends are all closed after the test, whichever side closed some already."""
    made = Channel()
    ends = {fd: os.fstat(fd).st_ino for fd in (made.jobs_r, made.jobs_w, made.reports_r, made.reports_w)}
    yield made
    made.close()
    for fd, inode in ends.items():
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == inode:  # not an fd number reused since this end was closed
                os.close(fd)


def _pipe_capacity(channel: Channel) -> int:
    return int(fcntl.fcntl(channel.jobs_w, 1032))  # F_GETPIPE_SZ


def test_hand_over_returns_at_once_when_the_pipe_is_full_and_the_rest_follows_when_read(channel):
    question = "请总结这份合同的付款条款" * 10  # what froze the worker: a backlog of Chinese questions
    jobs = [{"id": f"job-{i}", "question": question} for i in range(400)]
    started = time.monotonic()
    written = [channel.hand_over(job) for job in jobs]  # a child still loading reads nothing
    assert time.monotonic() - started < 5
    assert not all(written), "400 jobs should not fit a pipe nobody reads"
    assert channel.waiting_bytes > 0
    received: list[dict] = []
    for _ in range(1000):
        received += channel.receive(1)
        if channel.write_jobs() and len(received) == len(jobs):
            break
    received += channel.receive()
    assert [job["id"] for job in received] == [job["id"] for job in jobs]
    assert received[0]["question"] == question
    assert channel.waiting_bytes == 0


def test_frames_are_utf8_not_escapes_and_a_lone_surrogate_survives(channel):
    message = {"question": "合同" + "\ud800", "id": "x"}
    data = encode(message)
    assert "合同".encode() in data
    assert b"\\u" not in data
    assert json.loads(data) == message
    assert channel.hand_over(message)
    assert channel.receive(3) == [message]
    assert channel.hand_over(data), "an encoded message goes as it is"
    assert channel.receive(3) == [message]


def test_a_message_longer_than_the_pipe_arrives_whole(channel):
    big = {"id": "big", "history": "长" * (_pipe_capacity(channel) // 2)}  # 1.5 pipes of UTF-8
    assert not channel.hand_over(big)
    received: list[dict] = []
    while not received:
        received = channel.receive(1)
        channel.write_jobs()
    assert received == [big]


def test_the_draining_flag_reaches_a_forked_child(channel):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child waits for the parent's drain, then says what it saw
        try:
            os.close(read_end)
            deadline = time.monotonic() + 10
            while not channel.draining() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.write(write_end, b"1" if channel.draining() else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert not channel.draining()
        channel.drain()
        assert os.read(read_end, 1) == b"1"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_every_report_a_child_writes_right_before_it_exits_is_read_and_then_the_end(channel):
    """More reports than the pipe holds, one longer than a frame, the last one written as the child exits (as
    ``tasks.serve``'s exit does: report, flush, ``os._exit``): the main process reads them all, then the end."""
    reports = [{"id": f"job-{i}", "event": "succeeded", "runtime": i / 10} for i in range(2000)]
    reports.insert(1000, {"id": "long", "event": "failed", "exception": "错" * (3 * FRAME_BYTES)})
    reports.append({"event": "leaving", "reason": "tasks"})
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            channel.child_side()
            for report in reports:
                channel.report(report)
            code = 0 if channel.flush(timeout=10) else 2
        finally:
            os._exit(code)
    channel.parent_side()
    received: list[dict] = []
    deadline = time.monotonic() + 20
    while not channel.ended and time.monotonic() < deadline:
        select.select([channel.reports_r], [], [], 1)
        received += channel.reports()
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0, "the child wrote every report"
    assert channel.ended
    assert received == reports
    assert channel.reports() == [], "nothing after the end"


def test_the_message_limit_holds_the_largest_job_the_other_limits_allow():
    """A question and history of control characters, each written ``\\u0001`` in JSON (6 bytes), on a document
    of ``GLYPHQ_MAX_PAGES`` pages: the default ``GLYPHQ_MAX_MESSAGE_BYTES`` derived from raised text limits
    still lets it through."""
    from glyphq.celeryconfig import Settings
    from glyphq.producer.schema import JobMessage
    from glyphq.producer.validation import check_history, check_question

    cfg = Settings.from_env({"GLYPHQ_MAX_QUESTION_CHARS": "200000", "GLYPHQ_MAX_HISTORY_CHARS": "600000"})
    question = check_question("a" + "\x01" * (cfg.max_question_chars - 1), cfg)
    half_turn = cfg.max_history_chars // (2 * cfg.history_turns)
    turns = check_history([{"question": "\x01" * half_turn, "answer": "\x01" * half_turn}] * cfg.history_turns,
                          None, cfg)
    job = JobMessage(image_keys=tuple(f"glyphq:blob:{'x' * 128}:{page}" for page in range(cfg.max_pages)),
                     image_sizes=((1280, 1810),) * cfg.max_pages, image_bytes=10**9, question=question,
                     max_new_tokens=cfg.max_new_tokens_limit, session=None, submitted_at=time.time(), history=turns,
                     stream=True)
    message = {"id": "x" * 128, "task": "glyphq.answer", "args": [], "kwargs": {"job": job.to_dict()},
               "priority": 0, "hostname": "celery@" + "h" * 64,
               "delivery_info": {"routing_key": "gpu", "priority": 0, "redelivered": True},
               "group": None, "parent_id": None, "root_id": None}
    assert len(encode(message)) <= cfg.max_message_bytes
