"""The channel between a GPU worker's main process and its child: the main process never waits for room
in the jobs pipe, frames are UTF-8, and the draining flag reaches a forked child."""

from __future__ import annotations

import fcntl
import json
import os
import time

from glyphq.tasks.channel import FRAME_BYTES, Channel, encode


def _pipe_capacity(channel: Channel) -> int:
    import fcntl

    return int(fcntl.fcntl(channel.jobs_w, 1032))  # F_GETPIPE_SZ


def test_hand_over_returns_at_once_when_the_pipe_is_full_and_the_rest_follows_when_read():
    channel = Channel()
    question = "请总结这份合同的付款条款" * 10  # what froze the worker: a backlog of Chinese questions
    jobs = [{"id": f"job-{i}", "question": question} for i in range(400)]
    written = [channel.hand_over(1, job) for job in jobs]  # a child still loading reads nothing
    assert not all(written), "400 jobs should not fit a pipe nobody reads"
    assert channel.waiting_bytes > 0
    received: list[dict] = []
    for _ in range(1000):
        received += channel.receive(1)
        if channel.write_jobs() and len(received) == len(jobs):
            break
    received += channel.receive(1)
    assert [job["id"] for job in received] == [job["id"] for job in jobs]
    assert received[0]["question"] == question
    assert channel.waiting_bytes == 0


def test_frames_are_utf8_not_escapes_and_a_lone_surrogate_survives():
    message = {"question": "合同" + "\ud800", "id": "x"}
    data = encode(message)
    assert "合同".encode() in data
    assert b"\\u" not in data
    assert json.loads(data) == message
    channel = Channel()
    assert channel.hand_over(3, message)
    assert channel.receive(3) == [message]


def test_a_message_longer_than_the_pipe_arrives_whole():
    channel = Channel()
    big = {"id": "big", "history": "长" * (_pipe_capacity(channel) // 2)}  # 1.5 pipes of UTF-8
    assert not channel.hand_over(1, big)
    received: list[dict] = []
    while not received:
        received = channel.receive(1)
        channel.write_jobs()
    assert received == [big]


def test_frames_of_an_epoch_that_ended_are_forgotten():
    channel = Channel()
    filler = {"id": "filler", "pad": "x" * 1000}
    while channel.hand_over(1, filler):
        pass
    channel.hand_over(2, {"id": "for-the-next-child"})
    channel.forget(1)
    while channel.receive(1):  # the child of epoch 1 reads what was written before it stopped
        pass
    assert channel.write_jobs()
    assert channel.receive(2) == [{"id": "for-the-next-child"}]


def test_the_draining_flag_reaches_a_forked_child():
    channel = Channel()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child waits for the parent's drain, then says what it saw
        os.close(read_end)
        deadline = time.monotonic() + 10
        while not channel.draining() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(write_end, b"1" if channel.draining() else b"0")
        os._exit(0)
    os.close(write_end)
    assert not channel.draining()
    channel.drain()
    assert os.read(read_end, 1) == b"1"
    os.waitpid(pid, 0)



def _as_a_child(channel: Channel, report: dict, exit_with_unsent: bool) -> bytes:
    """Fork a child that reports ``report`` into a reports pipe with room for one frame, then exits (after
    handing back its unsent frames, as a child that stops serving does, or dying with them). What it handed back."""
    fcntl.fcntl(channel.reports_w, 1031, FRAME_BYTES)  # F_SETPIPE_SZ: one frame fills it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            channel.report(report)
            if exit_with_unsent:
                os.write(write_end, channel.unsent())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    handed_back = b""
    while chunk := os.read(read_end, 1 << 16):
        handed_back += chunk
    os.close(read_end)
    return handed_back


def test_a_report_split_between_the_pipe_and_the_unsent_frames_arrives_whole():
    channel = Channel()
    report = {"id": "a", "event": "failed", "exception": "x" * (2 * FRAME_BYTES)}
    handed_back = _as_a_child(channel, report, exit_with_unsent=True)
    assert channel.reports() == [], "only its first frame fits the pipe"
    assert channel.handed_back(handed_back) == [report]


def test_a_report_cut_short_by_its_childs_death_spoils_no_report_of_the_next_child():
    """The next child numbers its reports from the same count (both forked from one main process)."""
    channel = Channel()
    _as_a_child(channel, {"id": "a", "event": "failed", "exception": "x" * (2 * FRAME_BYTES)}, exit_with_unsent=False)
    assert channel.reports() == []
    channel.forget(1)  # the scheduler, as its child is lost
    _as_a_child(channel, {"id": "b", "event": "started"}, exit_with_unsent=False)
    assert channel.reports() == [{"id": "b", "event": "started"}]

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
