"""The device fails under a running batch: the child leaves, and its successor answers every job.

The fault is a ``sitecustomize`` module on the worker's ``PYTHONPATH``: in every worker child it wraps
``PagedDecoder.decode`` so that, once the test creates a flag file, the first child to decode fails on
that step and on every later one, as a child does after a sticky CUDA error (an illegal memory access).
Only that child sees it: it takes the flag.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

from conftest import png_bytes, wait_until

from faults.helpers import (
    endless_worker_settings,
    long_settings,
    only_child,
    runs,
    submit_long,
    tail,
    wait_started,
)

FAULT = textwrap.dedent('''
    import os

    from celery.signals import worker_process_init


    @worker_process_init.connect(weak=False)
    def _break_decoding_when_flagged(**_):
        from glyphq.worker.paged import PagedDecoder

        flag, real_decode, broken = os.environ["FAULT_DEVICE_FLAG"], PagedDecoder.decode, []

        def decode(self, *args, **kwargs):
            if not broken and os.path.exists(flag):
                try:
                    os.rename(flag, flag + ".taken")
                    broken.append(True)
                except FileNotFoundError:
                    pass
            if broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_decode(self, *args, **kwargs)

        PagedDecoder.decode = decode
''')

#: Long enough that both jobs still decode when the fault is raised, short enough to run again soon.
TOKENS = 2500


def received(worker, job_id: str) -> int:
    """How many times the worker received the job's message (Celery logs each delivery)."""
    return worker.log().count(f"glyphq.answer[{job_id}] received")


def test_a_failed_decode_step_hands_every_job_to_a_fresh_child(start_worker, endless_model, tmp_path: Path,
                                                               monkeypatch, redis_client):
    """Two jobs decode, and a third (the next turn of one's session) waits in the child, when every
    decode step starts failing. The child exits instead of failing them: the two that ran come back
    through Redis as redelivered (a second run each), the one it never started is handed to the
    successor as it was (one delivery, one run), and the successor answers all three, while the
    worker runs on."""
    from glyphq.producer import submit

    site = tmp_path / "fault"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT)
    flag = tmp_path / "break-the-device"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAULT_DEVICE_FLAG", str(flag))
    worker = start_worker(**endless_worker_settings(endless_model))
    first_child = only_child(worker)

    session = "device-failure"
    running = [submit(png_bytes((64, 48), seed=400), "A long answer", max_new_tokens=TOKENS, session=session,
                      settings=long_settings()),
               submit_long(seed=401, tokens=TOKENS)]
    for job in running:
        wait_started(redis_client, job)
    waiting = submit(png_bytes((64, 48), seed=402), "And then?", max_new_tokens=8, session=session)
    assert wait_until(lambda: received(worker, waiting.id) == 1, 30), tail(worker)
    time.sleep(0.5)  # handed to the child as it is received; it waits there for its session's turn
    flag.touch()

    results = [job.result(timeout=240) for job in running + [waiting]]
    assert (tmp_path / "break-the-device.taken").exists(), "the fault fired"
    assert [r["tokens_out"] for r in results] == [TOKENS, TOKENS, 8]
    assert all(r["worker"]["pid"] != first_child for r in results), tail(worker)
    assert [runs(redis_client, job.id) for job in running] == [2, 2], "each running job ran again once"
    assert [received(worker, job.id) for job in running] == [2, 2], "redelivered through Redis"
    assert runs(redis_client, waiting.id) == 1 and received(worker, waiting.id) == 1, \
        "the job the child never started went to its successor without a redelivery"
    log = worker.log()
    assert "the running batch failed (RuntimeError: CUDA error: an illegal memory access" in log
    assert "its 3 job(s) go to its successor" in log, "the third was handed to the child that failed"
    assert worker.proc.poll() is None
