"""``glyphq batch``: a JSON Lines file of jobs through a real worker; bad lines, kills and reruns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, free_port, png_bytes, wait_until

from glyphq.celeryconfig import default_served_name
from glyphq.producer.batch import default_job_prefix
from glyphq.producer.store import job_key, runs_key

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))


def drop_queued(redis_client) -> None:
    """Empty the GPU queues."""
    keys = [k for k in redis_client.keys("glyphq:gpu*") if redis_client.type(k) == b"list"]
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(autouse=True)
def _empty_queues(redis_client) -> None:
    """Start with nothing queued, so only this test's jobs reach its worker."""
    drop_queued(redis_client)


def write_batch(folder: Path, lines: list[dict | str], images: int = 3) -> Path:
    """``jobs.jsonl`` in ``folder`` with its images ``img0.png``... (paths in the lines are relative)."""
    for i in range(images):
        (folder / f"img{i}.png").write_bytes(png_bytes(seed=100 + i))
    path = folder / "jobs.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def batch(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GLYPHQ, "batch", *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def start_batch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([GLYPHQ, "batch", *args], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def records(path: Path) -> list[dict]:
    """Every line of a results file; each must be a whole JSON object."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"partial last line in {path}: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_usage_errors_exit_2_and_unreachable_broker_exits_4(tmp_path):
    source = write_batch(tmp_path, [{"image": "img0.png", "question": "q"}], images=1)
    out = tmp_path / "out.jsonl"
    assert batch(str(tmp_path / "missing.jsonl"), "--out", str(out)).returncode == 2
    assert batch(str(source), "--out", str(out), "--window", "0").returncode == 2
    assert batch(str(source), "--out", str(source)).returncode == 2
    assert batch(str(source)).returncode == 2  # --out is required
    notes = tmp_path / "notes.txt"  # not a results file: refused, and left alone (no last line cut off)
    notes.write_text("first line\nno newline at the end")
    refused = batch(str(source), "--out", str(notes))
    assert refused.returncode == 2 and "is not a results file of glyphq batch" in refused.stderr
    assert notes.read_text() == "first line\nno newline at the end"
    env = {**os.environ, "GLYPHQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    down = batch(str(source), "--out", str(out), env=env, timeout=60)
    assert down.returncode == 4, down.stderr
    assert "cannot reach Redis" in down.stderr
    assert not out.exists() or out.read_bytes() == b""


def refusal(run: subprocess.CompletedProcess[str]) -> str:
    """The error of a ``glyphq batch`` run that refused to start: exit 2, the CLI's JSON error, no traceback."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    error = json.loads(run.stdout)
    assert (error["ok"], error["error_type"]) == (False, "BatchUsageError")
    return str(error["error"])


def test_an_output_that_is_not_a_regular_file_is_refused_before_it_is_read(tmp_path):
    """A directory gave a traceback; /dev/zero and /dev/full were read until the kernel killed the run; a FIFO
    blocked forever."""
    source = write_batch(tmp_path, [{"image": "img0.png", "question": "q"}], images=1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, kind in [(tmp_path, "a directory"), (Path("/dev/zero"), "a character device"),
                      (Path("/dev/full"), "a character device"), (fifo, "a FIFO")]:
        error = refusal(batch(str(source), "--out", str(out), timeout=30))
        assert error == f"--out must be a regular file or a new path; {out} is {kind}"


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, redis_client):
    """Two runs on one --out wrote every result twice. Here no worker answers, so the first run waits."""
    source = write_batch(tmp_path, [{"image": "img0.png", "question": "q", "id": "a"}], images=1)
    out = tmp_path / "results.jsonl"
    first = start_batch(str(source), "--out", str(out), "--no-progress")
    try:
        assert wait_until(lambda: redis_client.exists(job_key(f"{default_job_prefix(source, out)}-a")), timeout=30)
        error = refusal(batch(str(source), "--out", str(out), "--no-progress", timeout=30))
        assert error == f"--out {out} is in use by another glyphq batch run; wait for it to end or choose another --out"
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 130
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=10)
        drop_queued(redis_client)
    assert out.read_bytes() == b""
    # The lock goes with the run that held it: the next run re-attaches to the job and waits for it.
    after = batch(str(source), "--out", str(out), "--no-progress", "--timeout", "1", timeout=30)
    assert after.returncode == 1, after.stderr
    assert json.loads(after.stdout)["timed_out_ids"] == ["a"]


def test_a_resume_line_is_a_success_only_when_its_ok_is_true(tmp_path):
    """A hand-edited ``"ok": "no"`` counted as a success, so the batch exited 0."""
    source = write_batch(tmp_path, [{"image": "img0.png", "question": "q", "id": name} for name in "abc"], images=1)
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps({"id": name, "job_id": f"x-{name}", "line": line, "ok": ok}) + "\n"
                           for line, (name, ok) in enumerate([("a", True), ("b", "no"), ("c", 1)], start=1)))
    run = batch(str(source), "--out", str(out), "--no-progress")
    assert run.returncode == 1, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["already_done"], summary["previously_failed"], summary["done"]) == (3, 2, 0)


def test_a_resume_line_nested_too_deeply_is_refused_as_not_a_results_file(tmp_path):
    source = write_batch(tmp_path, [{"image": "img0.png", "question": "q"}], images=1)
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "a", "ok": true, "result": ' + "[" * 5000 + "]" * 5000 + "}\n")
    before = out.read_bytes()
    error = refusal(batch(str(source), "--out", str(out), "--no-progress"))
    assert error == f"{out} is not a results file of glyphq batch (line 1); choose another --out"
    assert out.read_bytes() == before



def test_an_openai_batch_output_line_names_the_served_model_its_request_asked_for(tmp_path):
    from glyphq.celeryconfig import Settings
    from glyphq.producer.batch import parse_lines

    cfg = Settings.from_env({"GLYPHQ_SERVED_MODEL_NAME": "glyph,glyph-9b"})
    body = {"messages": [{"role": "user", "content": "Total?"}], "max_tokens": 8}
    source = write_batch(tmp_path, [{"custom_id": name or "none", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {**body, **({"model": name} if name else {})}}
                                    for name in ("glyph-9b", "glyph", None)], images=0)
    answered = {"ok": True, "result": {"answer": "ten", "tokens_in": 5, "tokens_out": 1}}
    names = [item.record(answered, cfg)["response"]["body"]["model"] for item in parse_lines(source, "p")]
    assert names == ["glyph-9b", "glyph", "glyph"]

class TestDefaultWorker:
    """Batches of short jobs, answered by one worker at the default settings (``class_worker``)."""

    def test_small_batch_end_to_end_and_rerun_skips_everything(self, class_worker, tmp_path, redis_client):
        source = write_batch(tmp_path, [
            {"image": "img0.png", "question": "What is the total?", "id": "invoice-1", "max_new_tokens": 5},
            {"image": "img1.png", "question": "Who signed it?", "max_new_tokens": 4, "priority": 9},
            {"image": str(tmp_path / "img2.png"), "question": "Absolute path", "id": 7, "max_new_tokens": 3},
            {"image": "img0.png", "question": "Same image, other question", "max_new_tokens": 4},
        ])
        out = tmp_path / "results.jsonl"
        first = batch(str(source), "--out", str(out), "--window", "2")
        assert first.returncode == 0, first.stderr
        summary = json.loads(first.stdout)
        assert {k: summary[k] for k in ("total", "done", "failed", "skipped_bad", "already_done")} == \
            {"total": 4, "done": 4, "failed": 0, "skipped_bad": 0, "already_done": 0}
        assert summary["elapsed"] > 0
        assert "4/4" in first.stderr  # the progress bar

        prefix = default_job_prefix(source, out)
        assert summary["job_prefix"] == prefix
        got = {r["id"]: r for r in records(out)}
        assert set(got) == {"invoice-1", "line-2", "7", "line-4"}
        for record in got.values():
            assert record["ok"] is True and record["job_id"] == f"{prefix}-{record['id']}"
            assert record["result"]["job_id"] == record["job_id"] and record["result"]["answer"]
            assert redis_client.get(runs_key(record["job_id"])) == b"1"
        assert got["invoice-1"]["result"]["tokens_out"] <= 5 and got["7"]["result"]["tokens_out"] <= 3
        assert got["line-2"]["line"] == 2

        before = out.read_bytes()
        again = batch(str(source), "--out", str(out))
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout)
        assert (summary["done"], summary["already_done"], summary["job_prefix"]) == (0, 4, prefix)
        assert out.read_bytes() == before

    def test_bad_lines_are_reported_with_line_numbers_and_skipped(self, class_worker, tmp_path):
        source = write_batch(tmp_path, [
            {"image": "img0.png", "question": "fine", "id": "a", "max_new_tokens": 3},   # 1
            '{"image": "img1.png", "question": ',                                          # 2 bad JSON
            {"image": "img1.png"},                                                         # 3 no question
            "",                                                                            # 4 blank: ignored
            {"image": "nope.png", "question": "missing file"},                             # 5 InvalidJob at submit
            {"image": "img1.png", "question": "q", "priority": 12},                        # 6 InvalidJob at submit
            {"image": "img1.png", "question": "q", "max_tokens": 3},                       # 7 unknown field
            {"image": "img2.png", "question": "dup", "id": "a"},                           # 8 duplicate id
            "[1, 2]",                                                                      # 9 not an object
            {"image": "img2.png", "question": "fine too", "max_new_tokens": 3},            # 10
        ])
        out = tmp_path / "results.jsonl"
        run = batch(str(source), "--out", str(out))
        assert run.returncode == 1, run.stderr  # not every line ended up done
        summary = json.loads(run.stdout)
        assert (summary["total"], summary["done"], summary["skipped_bad"], summary["failed"]) == (9, 2, 7, 0)
        assert [b["line"] for b in summary["bad_lines"]] == [2, 3, 5, 6, 7, 8, 9]
        for line, message in [(2, "not valid JSON"), (3, "missing field 'question'"), (5, "image: no such file"),
                              (6, "priority: must be an integer from 0 to 9"), (7, "unknown field(s) max_tokens"),
                              (8, "duplicate id 'a' (first on line 1)"), (9, "must be a JSON object")]:
            assert f"jobs.jsonl:{line}: skipped: " in run.stderr, (line, run.stderr)
            assert message in run.stderr, (message, run.stderr)
        assert sorted(r["id"] for r in records(out)) == ["a", "line-10"]

    def test_lines_nested_too_deeply_are_bad_lines_and_the_batch_goes_on(self, class_worker, tmp_path):
        """A line nested 5,000 deep stopped the whole batch with a RecursionError. The first line is one, so the
        check of whether the file is an OpenAI Batch file meets it too. An OpenAI Batch line is read again
        at submit, deeper in the stack: one that only just parsed at the start stopped the batch there."""
        deep, limit = 5000, 64
        source = write_batch(tmp_path, [
            "[" * deep + "]" * deep,                                                          # 1
            {"image": "img0.png", "question": "fine", "max_new_tokens": 3},                    # 2
            '{"image": "img1.png", "question": "q", "id": ' + '{"a":' * deep + "1" + "}" * deep + "}",  # 3
            {"image": "img1.png", "question": "fine too", "max_new_tokens": 3},                # 4
            '{"image": "img1.png", "question": ' + "[" * limit + "]" * limit + "}",           # 5: 65 levels
        ])
        out = tmp_path / "results.jsonl"
        run = batch(str(source), "--out", str(out), "--no-progress")
        assert run.returncode == 1, run.stderr
        summary = json.loads(run.stdout)
        assert (summary["total"], summary["done"], summary["skipped_bad"]) == (5, 2, 3)
        too_deep = f"nested more than {limit} levels deep"
        assert summary["bad_lines"] == [{"line": n, "error": too_deep} for n in (1, 3, 5)]
        assert f"jobs.jsonl:1: skipped: {too_deep}" in run.stderr
        assert sorted(r["id"] for r in records(out)) == ["line-2", "line-4"]

        folder = tmp_path / "openai"
        folder.mkdir()
        good, _ = _openai_batch(folder, jobs=1, tokens=3)
        request = good.read_text().splitlines()[0]
        depths = range(900, 1000, 2)  # up to about where json gives up
        deep_lines = [request.replace('"custom_id": "req-0"', f'"custom_id": "deep-{depth}"')[:-2]
                      + ', "metadata": ' + "[" * depth + "]" * depth + "}}" for depth in depths]
        good.write_text("\n".join([request, *deep_lines]) + "\n")
        run = batch(str(good), "--out", str(folder / "output.jsonl"), "--no-progress")
        assert run.returncode == 1, run.stderr
        summary = json.loads(run.stdout)
        assert (summary["done"], summary["skipped_bad"]) == (1, len(depths))
        assert {b["error"] for b in summary["bad_lines"]} == {too_deep}

    def test_a_full_disk_stops_the_batch_with_its_summary_and_the_rerun_resumes(
            self, class_worker, tmp_path, redis_client):
        import resource

        source = write_batch(tmp_path, [{"image": f"img{i % 3}.png", "question": f"Line {i}?", "max_new_tokens": 3}
                                        for i in range(6)])
        out = tmp_path / "results.jsonl"
        # The results file may not grow past about one line: the next write fails as on a full disk.
        def small_disk() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

        full = subprocess.run([GLYPHQ, "batch", str(source), "--out", str(out), "--window", "1", "--no-progress"],
                              cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
                              preexec_fn=small_disk)
        assert full.returncode == 8, (full.stdout, full.stderr)
        summary = json.loads(full.stdout)
        assert summary["output_error"] and "cannot write" in summary["output_error"]
        assert summary["done"] < 6
        assert "Resume with the same command" in full.stderr
        assert "Traceback" not in full.stderr

        rerun = batch(str(source), "--out", str(out), "--no-progress")
        assert rerun.returncode == 0, rerun.stderr
        lines = records(out)
        assert sorted(r["id"] for r in lines) == [f"line-{i}" for i in range(1, 7)]
        assert all(r["ok"] for r in lines)


JOBS, TOKENS = 10, 400  # each job generates exactly TOKENS tokens on the endless model


def _long_batch(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    ids = [f"doc-{i}" for i in range(JOBS)]
    source = write_batch(tmp_path, [{"image": f"img{i % 3}.png", "question": f"Read page {i}", "id": ids[i],
                                     "max_new_tokens": TOKENS} for i in range(JOBS)])
    return source, tmp_path / "results.jsonl", ids


def _assert_every_id_once_and_ran_once(out: Path, ids: list[str], prefix: str, redis_client) -> None:
    got = records(out)
    assert Counter(r["id"] for r in got) == Counter(ids), "an id is missing or written twice"
    assert all(r["ok"] and r["result"]["tokens_out"] == TOKENS for r in got)
    runs = {i: int(redis_client.get(runs_key(f"{prefix}-{i}")) or 0) for i in ids}
    assert runs == dict.fromkeys(ids, 1), "a job ran more than once (or never)"


def _openai_batch(tmp_path: Path, jobs: int, tokens: int) -> tuple[Path, list[str]]:
    import base64

    ids = [f"req-{i}" for i in range(jobs)]
    lines = []
    for i, custom_id in enumerate(ids):
        url = "data:image/png;base64," + base64.b64encode(png_bytes(seed=200 + i % 3)).decode()
        lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                      "body": {"max_tokens": tokens, "messages": [
                          {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": f"Read page {i}"}]}]}})
    lines.append({"custom_id": "fetch", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}})
    return write_batch(tmp_path, lines, images=0), ids


@pytest.fixture(scope="class")
def long_worker(start_class_worker, endless_model):
    """A worker on the endless model; one torch thread, so the batch process next to it cannot stall it.

    Batches of two at most, so results arrive a pair at a time: on an idle machine a batch of eight finished
    together, and a kill meant to land between results came after all of them.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return start_class_worker(model=endless_model, max_batch=2)


def _kill_after_lines(proc, out: Path, lines: int) -> None:
    """SIGKILL the ``glyphq batch`` process once ``out`` holds ``lines`` results (or it ended by itself)."""
    try:
        assert wait_until(lambda: line_count(out) >= lines or proc.poll() is not None, timeout=90, interval=0.1)
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


class TestLongJobs:
    """Batches of long jobs killed or interrupted halfway, answered by one worker (``long_worker``).

    Every rerun waits for the last of its jobs, so each test leaves the shared worker idle."""

    def test_sigkill_halfway_then_rerun_runs_each_job_once(self, long_worker, tmp_path, redis_client):
        source, out, ids = _long_batch(tmp_path)
        prefix = default_job_prefix(source, out)
        # A window as large as the batch: everything is submitted first, so the kill lands while waiting.
        proc = start_batch(str(source), "--out", str(out), "--window", str(JOBS))
        _kill_after_lines(proc, out, 3)
        written = records(out)  # whole lines only
        assert 3 <= len(written) < JOBS, f"{len(written)} results before the kill; the kill came too late"
        assert all(redis_client.exists(job_key(f"{prefix}-{i}")) for i in ids), "not every job was submitted"

        # A kill in the middle of a write leaves a partial line; the rerun must cut it off.
        with out.open("ab") as handle:
            handle.write(b'{"id":"doc-9","job_id":"x","ok":tr')
        rerun = batch(str(source), "--out", str(out), timeout=180)
        assert rerun.returncode == 0, rerun.stderr
        assert "dropping a partial last line" in rerun.stderr
        summary = json.loads(rerun.stdout)
        assert summary["already_done"] == len(written)
        assert summary["done"] == JOBS - len(written)
        _assert_every_id_once_and_ran_once(out, ids, prefix, redis_client)

    def test_sigint_stops_submitting_keeps_the_output_whole_and_rerun_resumes(
            self, long_worker, tmp_path, redis_client):
        source, out, ids = _long_batch(tmp_path)
        prefix = default_job_prefix(source, out)
        window = 3

        def submitted() -> int:
            return int(redis_client.exists(*(job_key(f"{prefix}-{i}") for i in ids)))

        proc = start_batch(str(source), "--out", str(out), "--window", str(window))
        try:
            deadline = time.monotonic() + 90
            while line_count(out) < 2:
                claimed = submitted()  # read before the output: the output only grows meanwhile
                assert claimed <= line_count(out) + window, "more jobs in flight than the window"
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        assert proc.returncode == 130, stderr
        summary = json.loads(stdout)
        assert summary["interrupted"] is True
        assert summary["not_submitted"] > 0 and summary["done"] >= 2
        assert "Resume with the same command" in stderr and f"glyphq batch {source} --out {out}" in stderr
        # It stopped submitting: exactly the jobs written or still in flight were ever submitted.
        assert submitted() == summary["done"] + summary["in_flight"] == len(records(out)) + summary["in_flight"]

        rerun = batch(str(source), "--out", str(out), "--window", str(window), timeout=180)
        assert rerun.returncode == 0, rerun.stderr
        again = json.loads(rerun.stdout)
        assert again["already_done"] == summary["done"] and again["done"] == JOBS - summary["done"]
        _assert_every_id_once_and_ran_once(out, ids, prefix, redis_client)

    def test_openai_batch_file_killed_halfway_resumes_with_openai_output_lines(
            self, long_worker, tmp_path, redis_client):
        jobs, tokens = 6, 200
        source, ids = _openai_batch(tmp_path, jobs, tokens)
        out = tmp_path / "output.jsonl"
        prefix = default_job_prefix(source, out)
        proc = start_batch(str(source), "--out", str(out), "--window", str(jobs))
        _kill_after_lines(proc, out, 2)
        written = records(out)
        assert 2 <= len(written) < jobs, f"{len(written)} results before the kill; the kill came too late"

        rerun = batch(str(source), "--out", str(out), timeout=180)
        assert rerun.returncode == 1, rerun.stderr  # the http(s) line is bad
        summary = json.loads(rerun.stdout)
        assert summary["already_done"] == len(written) and summary["done"] == jobs - len(written)
        assert [b["line"] for b in summary["bad_lines"]] == [jobs + 1]
        assert "glyphq fetches nothing" in summary["bad_lines"][0]["error"]

        got = records(out)
        assert Counter(r["custom_id"] for r in got) == Counter(ids), "a request is missing or written twice"
        for record in got:
            job_id = f"{prefix}-{record['custom_id']}"
            assert list(record) == ["id", "custom_id", "response", "error"] and record["error"] is None
            assert record["id"] == f"batch_req_{job_id}"
            response = record["response"]
            assert response["status_code"] == 200 and response["request_id"] == job_id
            body = response["body"]
            assert body["object"] == "chat.completion" and body["id"] == f"chatcmpl-{job_id}"
            assert body["model"] == default_served_name(os.environ.get("GLYPHQ_MODEL", "zai-org/Glyph"))
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == tokens
            assert redis_client.get(runs_key(job_id)) == b"1", "a job ran more than once"
