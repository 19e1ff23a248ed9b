"""``producer.chat``: chat completion bodies into jobs, results into OpenAI objects (pure functions)."""

from __future__ import annotations

import base64

import pytest
from conftest import png_bytes

from glyphq.celeryconfig import Settings
from glyphq.producer import chat
from glyphq.producer.errors import InvalidJob
from glyphq.producer.schema import JobMessage
from glyphq.producer.validation import check_history

CFG = Settings.from_env({})


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def test_a_conversation_becomes_image_question_and_the_last_turns():
    image = png_bytes(seed=1)
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image_part(image), {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": [{"type": "text", "text": "A2"}]},
        {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"},
        {"role": "user", "content": [image_part(image), {"type": "text", "text": "Q4"}]},
        {"role": "assistant", "content": "A4", "reasoning": "never read"},
        {"role": "user", "content": "Q5"}],
        "max_completion_tokens": 32, "priority": 8, "stream": True, "stream_options": {"include_usage": True}}
    request = chat.parse_request(body, Settings.from_env({"GLYPHQ_HISTORY_TURNS": "3"}))
    assert request.image == image and request.question == "Be brief.\n\nQ5"
    assert request.history == [{"question": "Q2", "answer": "A2"}, {"question": "Q3", "answer": "A3"},
                               {"question": "Q4", "answer": "A4"}], "the last three turns, answers only"
    assert (request.max_new_tokens, request.priority, request.stream, request.include_usage) == (32, 8, True, True)


@pytest.mark.parametrize(("body", "field", "text"), [
    ({"messages": [{"role": "user", "content": [image_part(png_bytes(seed=1)), image_part(png_bytes(seed=2))]}]},
     "messages[0].content[1]", "second, different image"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0]", "must follow a user message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "role is one of"),
    ({"messages": [{"role": "user", "content": [image_part(b"x"), {"type": "text", "text": "q"}]}], "max_tokens": 5,
      "max_completion_tokens": 6},
     "max_tokens", "differ"),
    ({"messages": [], "tools": []}, "tools", "not supported"),
    ({"messages": [], "n": 2}, "n", "decode greedily"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,xyz"}}]}]},
     "messages[0].content[0].image_url.url", "data:<type>;base64"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]",
     "text or image_url"),
    ({"messages": [{"role": "user", "content": [image_part(b"x"), {"type": "text", "text": "q"}]}],
      "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed with stream"),
])
def test_refusals_name_the_field(body, field, text):
    with pytest.raises(InvalidJob) as refused:
        chat.parse_request(body, CFG)
    assert refused.value.field == field and text in refused.value.problem, str(refused.value)


def test_an_oversized_data_url_is_refused_before_decoding():
    small = Settings.from_env({"GLYPHQ_MAX_IMAGE_BYTES": "1000"})
    url = "data:image/png;base64," + "A" * 2000
    with pytest.raises(InvalidJob, match="the limit is 1000"):
        chat.decode_data_url(url, "url", small)


def test_history_checks_and_travels_in_the_message():
    turns = [{"question": "Q1", "answer": "A1"}]
    assert check_history(turns, None, CFG) == ({"question": "Q1", "answer": "A1"},)
    with pytest.raises(InvalidJob, match="cannot be combined with session"):
        check_history(turns, "s1", CFG)
    with pytest.raises(InvalidJob, match="GLYPHQ_HISTORY_TURNS"):
        check_history(turns * 4, None, CFG)
    with pytest.raises(InvalidJob, match="GLYPHQ_MAX_HISTORY_CHARS"):
        check_history([{"question": "q", "answer": "x" * 20_000}], None, CFG)
    with pytest.raises(InvalidJob, match=r"history\[0\]"):
        check_history([{"question": "q"}], None, CFG)
    message = JobMessage(image_keys=("glyphq:blob:" + "0" * 64,), image_sizes=((4, 4),), image_bytes=1, question="q",
                         max_new_tokens=4, session=None, submitted_at=1.0, history=tuple(turns)).to_dict()
    assert message["history"] == turns
    assert JobMessage.from_dict(message, CFG).history == tuple(turns)
    message.pop("history")  # a message from a producer without histories
    assert JobMessage.from_dict(message, CFG).history == ()


def test_results_become_completion_chunks_and_usage():
    result = {"job_id": "j1", "answer": "ten", "reasoning": "read", "finish_reason": "length", "tokens_in": 20,
              "tokens_out": 5, "thinking_tokens": 2, "model": "/srv/models/glyph"}
    completion = chat.completion(result, "j1", "glyph", created=7)
    assert completion["model"] == "glyph", "the served name, not the worker's GLYPHQ_MODEL"
    assert completion["choices"][0]["message"]["content"] == "ten"
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25,
                                   "completion_tokens_details": {"reasoning_tokens": 2}}
    assert chat.delta("reasoning", "read") == {"reasoning": "read", "reasoning_content": "read"}
    assert chat.delta("answer", "ten") == {"content": "ten"}
    chunks = chat.closing_chunks(result, "j1", 7, include_usage=True, model="glyph")
    assert {c["model"] for c in chunks} == {"glyph"}
    assert [c["choices"][0]["finish_reason"] if c["choices"] else None for c in chunks] == ["length", None]
    assert chunks[-1]["usage"]["total_tokens"] == 25 and chunks[0]["usage"] is None
    plain = chat.closing_chunks({**result, "finish_reason": None}, "j1", 7, include_usage=False, model="glyph")
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in plain] == [({}, "stop")]
    assert all("usage" not in c for c in plain)


def test_every_glyphq_error_has_its_status_and_openai_shape():
    import json

    from glyphq.producer.errors import BrokerFull, BrokerUnavailable, JobExpired, JobFailed, JobLost, QueueFull
    from glyphq.producer.gateway import _timeout, error_response
    from glyphq.producer.submit import Job

    cases = [(InvalidJob("max_new_tokens", "too many"), 400, None, None),
             (QueueFull("full"), 429, "queue_full", "10"), (BrokerFull("full"), 503, "broker_full", "30"),
             (BrokerUnavailable("down"), 503, "broker_unavailable", "5"), (JobLost("gone"), 503, "job_lost", "5"),
             (JobFailed("j1", "ModelError", "oom twice"), 500, "ModelError", None),
             (JobFailed("j1", "InvalidJob", "image: bad"), 400, "InvalidJob", None),
             (JobExpired("late"), 504, "deadline_expired", None), (_timeout(Job("j2"), 3), 504, "timeout", None)]
    for exc, status, code, retry_after in cases:
        response = error_response(exc)
        body = json.loads(response.body)["error"]
        assert (response.status_code, body["code"], response.headers.get("retry-after")) == \
            (status, code, retry_after), exc
        assert body["message"] == str(exc) and {"message", "type", "param", "code"} <= set(body)
    expired = JobExpired("late")
    expired.job_id = "j3"
    assert error_response(expired).headers["x-glyphq-job-id"] == "j3"
    timed_out = error_response(_timeout(Job("j2"), 3))
    assert timed_out.headers["x-glyphq-job-id"] == "j2" and json.loads(timed_out.body)["error"]["job_id"] == "j2"
