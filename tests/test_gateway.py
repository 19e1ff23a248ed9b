"""``glyphq serve`` through the real ``openai`` client (and LangChain's), a real worker and redis-server.

One gateway and one worker on the Glyph-like stand-in serve the whole module; a second gateway on an
empty Redis database, where no worker listens, shows a full queue and a wait that times out.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, free_port, png_bytes
from faults.helpers import ready_worker

from glyphq.producer.submit import submit
from glyphq.worker.tiny import build, script

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))
KEY = "test-key-0123456789abcdef"
OTHER = "other-key-0123456789abcdef"
#: Seconds the module's gateway gives a client to send a request's headers, and then its body.
HEADER_TIMEOUT, BODY_TIMEOUT = 3, 4
#: The stand-in reasons in four words, then answers "ten" in GLM-4.1V's wrapper.
ANSWERS = "<|assistant|> <think> read the total line </think> <answer> <|begin_of_box|> ten <|end_of_box|> </answer>"


class Gateway:
    """``glyphq serve`` in a subprocess on a free port."""

    def __init__(self, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **{f"GLYPHQ_{k.upper()}": v for k, v in settings.items()}}
        self._log = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.clients: list[openai.OpenAI] = []
        self.proc = subprocess.Popen([GLYPHQ, "serve", "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"glyphq serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def client(self, key: str = KEY) -> openai.OpenAI:
        self.clients.append(openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60))
        return self.clients[-1]

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = build(tmp_path_factory.mktemp("answering"), "glyph-tiny")
    script(out, ANSWERS)
    return out


@pytest.fixture(scope="module")
def gateway(model: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("gateway")
    with ready_worker(redis_url, model, folder / "worker.log"):
        server = Gateway(folder / "serve.log", broker_url=redis_url, model=str(model), api_keys=f"{KEY},{OTHER}",
                         gateway_header_timeout=str(HEADER_TIMEOUT), gateway_body_timeout=str(BODY_TIMEOUT),
                         served_model_name="glyph,glyph-9b")
        yield server
        server.stop()


@pytest.fixture(scope="module")
def idle(model: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway without keys (so localhost only) on a Redis database no worker reads; its queue holds 2 jobs."""
    server = Gateway(tmp_path_factory.mktemp("idle") / "serve.log", broker_url=redis_url[:-1] + "5",
                     model=str(model), max_queue="2")
    yield server
    server.stop()


def data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed=seed)).decode()


def ask(question: str, seed: int = 1, url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url(seed)}},
                                         {"type": "text", "text": question}]}]


def test_chat_completion_with_a_data_url_image_and_its_reasoning_apart(gateway, model):
    client = gateway.client()
    assert [m.id for m in client.models.list().data] == ["glyph", "glyph-9b"]
    raw = client.chat.completions.with_raw_response.create(model="glyph", messages=ask("What is the total?"),
                                                           max_tokens=64)
    job_id = raw.headers["x-glyphq-job-id"]
    reply = raw.parse()
    assert reply.id == f"chatcmpl-{job_id}" and reply._request_id == job_id
    message = reply.choices[0].message
    assert reply.model == "glyph", "the name asked for, never the worker's GLYPHQ_MODEL path"
    assert message.content == "ten", "the answer alone"
    assert message.reasoning == "read the total line" and message.reasoning_content == message.reasoning
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 10 and reply.usage.completion_tokens_details.reasoning_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 10

    # The same job without waiting: its result stays readable under its id.
    later = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert later.status_code == 200 and later.json()["state"] == "SUCCESS"
    assert later.json()["completion"]["choices"][0]["message"]["content"] == "ten"
    assert later.json()["completion"]["model"] == "glyph"


def test_a_conversation_carries_its_earlier_turns_and_system_text(gateway, model):
    client = gateway.client()
    alone = client.chat.completions.create(model="glyph", messages=ask("And the date?", seed=2), max_tokens=64)
    history = [*ask("What is the total?", seed=2), {"role": "assistant", "content": "ten"},
               {"role": "user", "content": "And the date?"}]
    turn = client.chat.completions.create(model="glyph", messages=history, max_tokens=64)
    with_system = client.chat.completions.create(
        model="glyph", messages=[{"role": "system", "content": "Answer briefly."}, *history], max_tokens=64)
    assert turn.choices[0].message.content == "ten"
    # The earlier turn and the system text reach the prompt: "What is the total?" + "ten" + the template's
    # role tokens; then "Answer briefly." before the question.
    assert turn.usage.prompt_tokens > alone.usage.prompt_tokens + 4
    assert with_system.usage.prompt_tokens > turn.usage.prompt_tokens

    jobs = httpx.post(f"{gateway.url}/v1/jobs", json={"messages": history, "max_tokens": 64, "priority": 9},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert jobs.status_code == 202 and jobs.json()["state"] == "PENDING"
    job_id = jobs.json()["id"]
    deadline = time.monotonic() + 60
    while (body := httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"},
                             timeout=30).json())["state"] != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert body["completion"]["usage"]["prompt_tokens"] == turn.usage.prompt_tokens

    # A retry with the same Idempotency-Key re-attaches to the job instead of queuing it again.
    retry = httpx.post(f"{gateway.url}/v1/jobs", json={"messages": history, "max_tokens": 64, "priority": 9},
                       headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": "order-17"}, timeout=30)
    again = httpx.post(f"{gateway.url}/v1/jobs", json={"messages": history, "max_tokens": 64, "priority": 9},
                       headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": "order-17"}, timeout=30)
    assert retry.status_code == again.status_code == 202 and retry.json()["id"] == again.json()["id"]
    assert retry.json()["id"] != job_id


def test_a_streamed_completion_is_a_correct_event_stream(gateway, model):
    client = gateway.client()
    chunks = list(client.chat.completions.create(model="glyph", messages=ask("Stream it?", seed=3), max_tokens=64,
                                                  stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "ten"
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "read the total line"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 10

    raw = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": ask("Raw?", seed=3), "stream": True,
                                                                  "max_tokens": 64},
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.headers["x-glyphq-job-id"]
    events = [block for block in raw.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(block[6:]) for block in events[:-1]), "usage only when asked"


def test_refusals_are_400s_in_openais_error_shape(gateway, model):
    client = gateway.client()
    wide = "data:image/png;base64," + base64.b64encode(png_bytes((4000, 10))).decode()
    cases = [
        (ask("Fetch it?", url="https://example.com/page.png"), {}, "glyphq fetches nothing",
         "messages[0].content[0].image_url.url"),
        (ask("Corrupt?", url="data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()),
         {}, "messages[0].content[0].image_url.url: cannot be decoded", "messages[0].content[0].image_url.url"),
        ([{"role": "system", "content": "Be brief."}, *ask("Too wide?", url=wide)], {}, "aspect ratio",
         "messages[1].content[0].image_url.url"),
        (ask("Warm?"), {"temperature": 0.7}, "the workers decode greedily", "temperature"),
        ([{"role": "user", "content": "No image here"}], {}, "no image", "messages"),
        (ask("Long?"), {"max_tokens": 10**6}, "max_new_tokens: must be from 1 to", "max_new_tokens"),
    ]
    for messages, extra, text, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="glyph", messages=messages, **extra)
        assert refused.value.status_code == 400
        assert text in refused.value.message and refused.value.body["param"] == param, refused.value.body
        assert refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=ask("Which model?"))
    assert unknown.value.body["code"] == "model_not_found"
    assert "'glyph', 'glyph-9b' (GLYPHQ_SERVED_MODEL_NAME)" in unknown.value.message
    with pytest.raises(openai.NotFoundError) as by_path:
        client.chat.completions.create(model=str(model), messages=ask("By path?"))
    assert by_path.value.body["code"] == "model_not_found", "GLYPHQ_MODEL is not a served name"


def test_served_model_names_answer_as_asked_and_never_leak_the_model_path(gateway, model):
    client = gateway.client()
    alias = client.chat.completions.create(model="glyph-9b", messages=ask("Alias?", seed=8), max_tokens=64)
    assert alias.model == "glyph-9b" and alias.choices[0].message.content == "ten"
    omitted = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": ask("No model?", seed=8)},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert omitted.status_code == 200 and omitted.json()["model"] == "glyph"
    chunks = list(client.chat.completions.create(model="glyph-9b", messages=ask("Streamed alias?", seed=8),
                                                  max_tokens=64, stream=True))
    assert {c.model for c in chunks} == {"glyph-9b"}
    queued = httpx.post(f"{gateway.url}/v1/jobs", json={"model": "glyph-9b", "messages": ask("Queued alias?", seed=8),
                                                       "max_tokens": 64},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert wait_state(gateway.url, queued["id"])["completion"]["model"] == "glyph-9b", "the jobs endpoint's name"
    health = httpx.get(f"{gateway.url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert health["model"] == "glyph", "with a key, /health names the first served name"
    for text in (omitted.text, json.dumps(health), alias.model_dump_json()):
        assert str(model) not in text, "a local GLYPHQ_MODEL path must not reach API clients"


def test_keys_body_limit_health_metrics_and_no_torch(gateway, model):
    with pytest.raises(openai.AuthenticationError) as denied:
        gateway.client("wrong-key-0123456789abcdef").chat.completions.create(model="glyph", messages=ask("Who?"))
    assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"
    missing = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": ask("No key?")}, timeout=30)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}

    from glyphq.celeryconfig import settings
    from glyphq.producer.gateway import body_limit

    huge = b"x" * (body_limit(settings) + 1)
    too_big = httpx.post(f"{gateway.url}/v1/chat/completions", content=huge,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"

    assert httpx.get(f"{gateway.url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{gateway.url}/metrics", timeout=10).status_code == 401
    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    assert 'glyphq_gateway_requests_total{route="/v1/chat/completions",status="401"}' in text
    assert "libtorch" not in Path(f"/proc/{gateway.proc.pid}/maps").read_text()


def wait_state(url: str, job_id: str, key: str = KEY) -> dict:
    deadline = time.monotonic() + 60
    while (body := httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"},
                             timeout=30).json()).get("state") in ("PENDING", "STARTED") and time.monotonic() < deadline:
        time.sleep(0.1)
    return body


def assert_no_such_job(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["code"] == "not_found" and "completion" not in response.text


def test_a_key_sees_its_own_jobs_only(gateway, model):
    mine, theirs = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER}"}
    made = httpx.post(f"{gateway.url}/v1/jobs", json={"messages": ask("Mine?", seed=8), "max_tokens": 64},
                      headers=mine, timeout=30)
    job_id = made.json()["id"]
    assert wait_state(gateway.url, job_id)["state"] == "SUCCESS"
    assert_no_such_job(httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers=theirs, timeout=30))

    # Jobs no key made (a producer's, a batch's) are no key's, however guessable their ids.
    invoice = submit(png_bytes(seed=9), "Invoice total?", job_id="invoice-0001", max_new_tokens=8)
    invoice.result(timeout=60)
    for headers in (mine, theirs):
        assert_no_such_job(httpx.get(f"{gateway.url}/v1/jobs/{invoice.id}", headers=headers, timeout=30))


def test_an_idempotency_key_belongs_to_its_api_key_and_its_body(gateway, model, redis_client):
    mine, theirs = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER}"}
    header = {"Idempotency-Key": "order-18"}
    body = {"messages": ask("Which order?", seed=10), "max_tokens": 64}
    # The other key sends the header first: it gets a job of its own, not one the first key will read.
    first_theirs = httpx.post(f"{gateway.url}/v1/jobs", json={"messages": ask("Theirs?", seed=11), "max_tokens": 64},
                              headers={**theirs, **header}, timeout=30)
    first = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers={**mine, **header}, timeout=30)
    retry = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers={**mine, **header}, timeout=30)
    assert first_theirs.status_code == first.status_code == retry.status_code == 202
    assert first.json()["id"] == retry.json()["id"] != first_theirs.json()["id"]
    assert wait_state(gateway.url, first.json()["id"])["state"] == "SUCCESS"
    assert_no_such_job(httpx.get(f"{gateway.url}/v1/jobs/{first.json()['id']}", headers=theirs, timeout=30))
    assert_no_such_job(httpx.get(f"{gateway.url}/v1/jobs/{first_theirs.json()['id']}", headers=mine, timeout=30))

    # The same header with another body is a conflict, and queues nothing.
    claims = len(redis_client.keys("glyphq:job:*"))
    changed = httpx.post(f"{gateway.url}/v1/chat/completions", headers={**mine, **header}, timeout=30,
                         json={"messages": ask("Which other order?", seed=10), "max_tokens": 64})
    assert changed.status_code == 409, changed.text
    assert set(changed.json()["error"]) == {"message", "type", "param", "code"}
    assert "Idempotency-Key" in changed.json()["error"]["message"] and "x-glyphq-job-id" not in changed.headers
    assert len(redis_client.keys("glyphq:job:*")) == claims
    # Who made each job is kept at least as long as its result.
    from glyphq.celeryconfig import settings

    owners = redis_client.keys("glyphq:owner:*")
    assert owners and all(settings.result_expires_s < redis_client.ttl(key) <= 2 * settings.result_expires_s
                          for key in owners)


def test_nested_or_broken_json_is_a_400_and_no_traceback(gateway):
    logged = gateway.log.stat().st_size
    bodies = [b"[" * 1000 + b"]" * 1000, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
              b'{"messages": [' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"]}", b'{"messages": [], "timeout": NaN}',
              b"{not json", b"\xff\xfe"]
    for content in bodies:
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", content=content, timeout=30,
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert refused.status_code == 400, (content[:40], refused.text[:300])
        error = refused.json()["error"]
        assert error["param"] == "body" and error["type"] == "invalid_request_error", error
    assert "nested more than" in error_for(gateway, bodies[0])
    time.sleep(0.5)
    assert "Traceback" not in gateway.log.read_bytes()[logged:].decode(errors="replace")


def error_for(gateway: Gateway, content: bytes) -> str:
    return str(httpx.post(f"{gateway.url}/v1/jobs", content=content, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30).json()["error"]["message"])


def test_slow_clients_are_cut_off(gateway):
    """Slowloris: headers sent a byte at a time are cut off after GLYPHQ_GATEWAY_HEADER_TIMEOUT (before any key
    is checked), and a body sent a byte at a time gets a 408 after GLYPHQ_GATEWAY_BODY_TIMEOUT."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    slow_heads = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(5)]
    slow_body = socket.create_connection(("127.0.0.1", gateway.port))
    slow_body.sendall(head)
    started = time.monotonic()
    closed: dict[socket.socket, float] = {}
    answered = b""
    try:
        while len(closed) < 6 and time.monotonic() - started < HEADER_TIMEOUT + BODY_TIMEOUT + 6:
            for sock in [*slow_heads, slow_body]:
                if sock not in closed:
                    with contextlib.suppress(OSError):
                        sock.send(head[:1] if sock is not slow_body else b" ")
            readable, _, _ = select.select([s for s in [*slow_heads, slow_body] if s not in closed], [], [], 0.25)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if sock is slow_body:
                    answered += data
                if not data:
                    closed[sock] = time.monotonic() - started
        assert all(sock in closed for sock in slow_heads), f"{len(closed)} of 6 closed"
        assert max(closed[s] for s in slow_heads) < HEADER_TIMEOUT + 2, closed
        assert slow_body in closed and closed[slow_body] < BODY_TIMEOUT + 2, closed
        assert answered.startswith(b"HTTP/1.1 408"), answered[:200]
        assert b'"code":"body_timeout"' in answered
    finally:
        for sock in [*slow_heads, slow_body]:
            sock.close()
    # The gateway still answers.
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200


def test_full_queue_is_429_with_retry_after_and_a_long_wait_is_504_with_the_job_id(idle, model):
    client = idle.client("no-key-needed-on-localhost")
    # Without GLYPHQ_SERVED_MODEL_NAME the gateway answers to the last part of GLYPHQ_MODEL, lower-case.
    assert [m.id for m in client.models.list().data] == [model.name.lower()]
    with pytest.raises(openai.APIStatusError) as waited:
        client.chat.completions.create(model=model.name.lower(), messages=ask("Anyone?", seed=4),
                                       extra_body={"timeout": 0.5})
    assert waited.value.status_code == 504
    job_id = waited.value.body["job_id"]
    assert waited.value.response.headers["x-glyphq-job-id"] == job_id and f"/v1/jobs/{job_id}" in waited.value.message
    assert httpx.get(f"{idle.url}/v1/jobs/{job_id}", timeout=10).json()["state"] == "PENDING"

    queued = httpx.post(f"{idle.url}/v1/jobs", json={"messages": ask("Second?", seed=5)}, timeout=30)
    assert queued.status_code == 202
    with pytest.raises(openai.RateLimitError) as full:
        client.chat.completions.create(model=model.name.lower(), messages=ask("Third?", seed=6))
    assert full.value.status_code == 429 and full.value.response.headers["retry-after"]
    assert "GLYPHQ_MAX_QUEUE" in full.value.message and full.value.body["code"] == "queue_full"


def test_unreachable_redis_is_a_fast_503_and_wide_binds_need_keys(model, tmp_path):
    port = free_port()
    down = Gateway(tmp_path / "down.log", broker_url=f"redis://127.0.0.1:{port}/0", model=str(model), api_keys=KEY)
    key = {"Authorization": f"Bearer {KEY}"}
    try:
        started = time.monotonic()
        response = httpx.post(f"{down.url}/v1/chat/completions", json={"messages": ask("Up?")}, headers=key,
                              timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"], response.text
        assert "cannot reach Redis" in response.json()["error"]["message"]
        assert time.monotonic() - started < 1.5
        # Without a valid key /health says only whether it is well: no host, port or error text.
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}):
            anonymous = httpx.get(f"{down.url}/health", headers=headers, timeout=10)
            assert anonymous.status_code == 503 and anonymous.json() == {"status": "unavailable"}
            assert str(port) not in anonymous.text and "127.0.0.1" not in anonymous.text
        detailed = httpx.get(f"{down.url}/health", headers=key, timeout=10)
        assert detailed.status_code == 503 and f"127.0.0.1:{port}" in detailed.json()["error"]
    finally:
        down.stop()
    wide = subprocess.run([GLYPHQ, "serve", "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT,
                          env={**os.environ, "GLYPHQ_API_KEYS": ""}, capture_output=True, text=True, timeout=60)
    assert wide.returncode == 2 and "without API keys" in wide.stderr


def test_langchains_openai_client(gateway, model):
    langchain_openai = pytest.importorskip("langchain_openai")
    with httpx.Client(timeout=60) as http:
        llm = langchain_openai.ChatOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, model="glyph", max_tokens=64,
                                          max_retries=0, http_client=http)
        reply = llm.invoke([("user", [{"type": "image_url", "image_url": {"url": data_url(7)}},
                                      {"type": "text", "text": "What is the total?"}])])
    assert reply.content == "ten"
    assert reply.usage_metadata["output_tokens"] == 10
