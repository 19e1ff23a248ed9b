"""Streamed text end to end: a real worker on a scripted Glyph-like stand-in, redis-server, ``glyphq serve``
read with the real ``openai`` client, ``Job.stream()`` and ``glyphq submit --stream``.

The stand-in reasons "read the page read the page ..." until its thinking budget feeds it ``</think>``,
then answers "one two three ... ten one two ..." until ``max_new_tokens``: a long answer of known words,
many decode chunks long. The tests of the class share one GPU worker, one render worker and one gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, png_bytes, wait_until
from test_gateway import KEY, Gateway, ask

from glyphq.producer import Job, submit, submit_document
from glyphq.producer.batch import run_batch
from glyphq.producer.stream import STREAM_END_TTL_S
from glyphq.worker.tiny import build, script

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))
LOOPS = "<|assistant|> <think> read the page read"
COUNTS = "</think> <answer> <|begin_of_box|> one two three four five six seven eight nine ten one"
#: New tokens per job and the reasoning budget: about three decode chunks of answer after the reasoning.
MAX, BUDGET = 64, 12


@pytest.fixture(scope="module")
def counting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = build(tmp_path_factory.mktemp("counting"), "glyph-tiny")
    script(out, LOOPS, COUNTS)
    return out


@pytest.fixture(scope="class")
def served(start_class_worker, counting_model: Path, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    render = start_class_worker(wait=False, queues="render")
    start_class_worker(model=str(counting_model))
    render.wait_ready()
    gateway = Gateway(tmp_path_factory.mktemp("stream-gateway") / "serve.log", broker_url=redis_url,
                      model=str(counting_model), api_keys=KEY, served_model_name="glyph")
    yield gateway
    gateway.stop()


def stream_ttl(redis_client, job_id: str) -> int:
    return int(redis_client.ttl(f"glyphq:stream:{job_id}"))


def expires_soon(redis_client, job_id: str) -> bool:
    """The job's stream has its end, which it gets just after the result is stored, and expires soon."""
    return wait_until(lambda: 0 < stream_ttl(redis_client, job_id) <= STREAM_END_TTL_S, timeout=10)


def check_text(result: dict, reasoning: str, answer: str) -> None:
    """The streamed text is the result's, and the result is the whole scripted output."""
    assert reasoning == result["reasoning"] and reasoning.startswith("read the page read")
    assert answer == result["answer"] and answer.startswith("one two three four")
    assert result["finish_reason"] == "length" and result["tokens_out"] == MAX


@pytest.mark.usefixtures("served")
class TestStreaming:
    def test_the_gateway_streams_deltas_while_the_job_decodes(self, served, counting_model, redis_client):
        client = served.client()
        chunks, ready_at_first_content = [], None
        for chunk in client.chat.completions.create(
                model="glyph", messages=ask("Count?", seed=61), max_tokens=MAX, stream=True,
                stream_options={"include_usage": True}, extra_body={"thinking_budget": BUDGET}):
            chunks.append(chunk)
            if ready_at_first_content is None and chunk.choices and chunk.choices[0].delta.content:
                ready_at_first_content = Job(chunk.id.removeprefix("chatcmpl-")).ready()
        job_id = chunks[0].id.removeprefix("chatcmpl-")
        assert ready_at_first_content is False, "the answer came while the job was still decoding"
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        assert sum(bool(d.content) for d in deltas) > 1, "the answer came in several chunks"
        reasoning = "".join(getattr(d, "reasoning", None) or "" for d in deltas)
        assert reasoning == "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        check_text(Job(job_id).result(timeout=10), reasoning, "".join(d.content or "" for d in deltas))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == MAX
        assert all(c.usage is None for c in chunks[:-1])
        assert expires_soon(redis_client, job_id), "the stream expires soon after its end"

    def test_a_client_that_leaves_mid_stream_leaves_the_job_running(self, served, counting_model, redis_client):
        """The job runs to its end and its result is stored; a retry with the same Idempotency-Key reads its
        text from the start."""
        body = {"model": "glyph", "messages": ask("Count again?", seed=62), "max_tokens": MAX,
                "stream": True, "thinking_budget": BUDGET}
        headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "leaves-mid-stream"}
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, headers=headers,
                          timeout=60) as response:
            job = Job(response.headers["x-glyphq-job-id"])
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
            assert not job.ready(), "left mid-stream"
        result = job.result(timeout=120)
        assert result["tokens_out"] == MAX, "the job ran to its end"
        assert expires_soon(redis_client, job.id)

        again = httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert again.headers["x-glyphq-job-id"] == job.id
        pieces = [json.loads(block[6:]) for block in again.text.split("\n\n") if block.startswith("data: {")]
        deltas = [p["choices"][0]["delta"] for p in pieces if p["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == result["answer"]
        assert sum(bool(d.get("content")) for d in deltas) > 1, "re-read entry by entry from the stream"

    def test_job_stream_yields_text_then_the_result(self, served, redis_client):
        job = submit(png_bytes(seed=63), "Count?", max_new_tokens=MAX, thinking_budget=BUDGET, stream=True)
        events, ready_at_first_answer = [], None
        for event in job.stream(timeout=120):
            events.append(event)
            if ready_at_first_answer is None and event.kind == "answer":
                ready_at_first_answer = job.ready()
        assert ready_at_first_answer is False
        assert [e.kind for e in events][-1] == "result" and events[-1].result == job.result(timeout=1)
        assert sum(e.kind == "answer" for e in events) > 1
        check_text(events[-1].result, "".join(e.text for e in events if e.kind == "reasoning"),
                   "".join(e.text for e in events if e.kind == "answer"))
        assert expires_soon(redis_client, job.id)

        # A job submitted without stream=True publishes nothing: its text comes whole, with its result.
        quiet = submit(png_bytes(seed=64), "Count?", max_new_tokens=MAX, thinking_budget=BUDGET)
        events = list(quiet.stream(timeout=120))
        assert [e.kind for e in events] == ["reasoning", "answer", "result"]
        check_text(events[-1].result, events[0].text, events[1].text)
        assert stream_ttl(redis_client, quiet.id) == -2, "no stream key"

    def test_glyphq_submit_stream_prints_text_as_it_comes(self, served, tmp_path):
        image = tmp_path / "page.png"
        image.write_bytes(png_bytes(seed=65))
        job = Job("cli-stream-1")
        lines, ready_at_first_answer = [], None
        with subprocess.Popen([GLYPHQ, "submit", str(image), "Count?", "--stream", "--job-id", job.id,
                               "--max-new-tokens", str(MAX), "--thinking-budget", str(BUDGET)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if ready_at_first_answer is None and line.startswith('{"kind": "answer"'):
                    ready_at_first_answer = job.ready()
        assert proc.returncode == 0
        events = [json.loads(line) for line in lines if line.startswith('{"kind"')]
        result = json.loads("".join(lines[len(events):]))
        assert ready_at_first_answer is False
        assert sum(e["kind"] == "answer" for e in events) > 1
        check_text(result, "".join(e["text"] for e in events if e["kind"] == "reasoning"),
                   "".join(e["text"] for e in events if e["kind"] == "answer"))

    def test_a_document_job_streams_too(self, served, redis_client):
        job = submit_document("The invoice total is ten euro.\n" * 20, "Count?", max_new_tokens=MAX,
                              thinking_budget=BUDGET, stream=True)
        events = list(job.stream(timeout=180))
        assert sum(e.kind == "answer" for e in events) > 1
        check_text(events[-1].result, "".join(e.text for e in events if e.kind == "reasoning"),
                   "".join(e.text for e in events if e.kind == "answer"))
        assert events[-1].result["pages"] >= 1
        assert expires_soon(redis_client, job.id)

    def test_batch_jobs_publish_nothing(self, served, tmp_path, redis_client):
        """A batch reads results, not text as it comes (and refuses OpenAI Batch lines that ask for a stream)."""
        image = tmp_path / "page.png"
        image.write_bytes(png_bytes(seed=66))
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps({"id": "plain", "image": str(image), "question": "Count?", "max_new_tokens": 20,
                                      "thinking_budget": BUDGET}) + "\n")
        summary = run_batch(source, tmp_path / "out.jsonl", job_prefix="nostream", progress=False, timeout=120)
        assert summary.exit_code() == 0
        assert redis_client.keys("glyphq:job:nostream*") and not redis_client.keys("glyphq:stream:nostream*")

    def test_no_stream_key_is_left_without_an_expiry(self, served, redis_client):
        keys = redis_client.keys("glyphq:stream:*")
        assert keys, "the tests above left their streams to expire"
        assert all(0 < redis_client.ttl(key) <= STREAM_END_TTL_S for key in keys)
