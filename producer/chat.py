"""OpenAI chat completions in glyphq's terms: a request body becomes a job, a result becomes a response.

Shared by the HTTP gateway (``producer.gateway``) and ``glyphq batch`` on OpenAI Batch files. Pure
functions over JSON values: nothing here talks to Redis or knows about HTTP.

A conversation is about one image. Its last message is the user's question; earlier user and assistant
messages are the history (the last ``GLYPHQ_HISTORY_TURNS`` turns, as plain text, like a session's). System
(and developer) messages are put before the question, separated by a blank line.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any

from glyphq.celeryconfig import Settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.validation import check_question

#: Fields of a chat completion request that glyphq honours (``priority``, ``thinking_budget`` and
#: ``deadline`` are its own), and those it accepts and ignores because they change nothing here.
FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                    "stream", "stream_options", "priority", "thinking_budget", "deadline", "timeout"})
IGNORED = frozenset({"user", "seed", "metadata", "store"})
#: Sampling fields and the one value of each that greedy decoding honours.
GREEDY = {"temperature": 0, "top_p": 1, "n": 1}
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request, checked and turned into the fields of one glyphq job."""

    image: bytes
    question: str
    image_param: str = "messages"  # where the image is in the request, as OpenAI's errors name it
    history: list[dict[str, str]] = field(default_factory=list)
    max_new_tokens: int | None = None
    priority: int | None = None
    thinking_budget: int | None = None
    deadline: float | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    timeout: float | None = None  # seconds the gateway waits for the answer (at most GLYPHQ_GATEWAY_TIMEOUT)

    def submit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``producer.submit`` (besides image and question)."""
        return {"max_new_tokens": self.max_new_tokens, "priority": self.priority,
                "thinking_budget": self.thinking_budget, "deadline": self.deadline,
                "history": self.history or None}


def served_model(requested: object, settings: Settings) -> str | None:
    """The served model name a request's ``model`` asks for: itself if it is one of
    ``GLYPHQ_SERVED_MODEL_NAME``, the first of them when left out; ``None`` if it is not served here.

    Responses carry this name, never ``GLYPHQ_MODEL``, which may be a local path.
    """
    if requested is None:
        return settings.served_model_names[0]
    return requested if isinstance(requested, str) and requested in settings.served_model_names else None


def not_served(requested: object, settings: Settings) -> str:
    """The message refusing a ``model`` that is not served here."""
    names = ", ".join(repr(n) for n in settings.served_model_names)
    return f"model {requested!r} is not served here; it serves {names} (GLYPHQ_SERVED_MODEL_NAME), or omit model"


def parse_request(body: object, settings: Settings) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; ``InvalidJob`` names the field (as OpenAI spells it)."""
    if not isinstance(body, dict):
        raise InvalidJob("body", f"must be a JSON object, got {type(body).__name__}")
    unknown = sorted(str(k) for k in body if k not in FIELDS and k not in IGNORED)
    if unknown:
        raise InvalidJob(unknown[0], f"is not supported by glyphq (unknown field(s): {', '.join(unknown)})")
    _check_sampling(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidJob("model", f"must be a string, got {model!r}")
    image_param, image, question, history = _conversation(body.get("messages"), settings)
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidJob("timeout", f"must be a positive number of seconds, got {timeout!r}")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidJob("stream", f"must be true or false, got {stream!r}")
    return ChatRequest(image=image, question=question, image_param=image_param, history=history,
                       max_new_tokens=_max_tokens(body),
                       priority=body.get("priority"), thinking_budget=body.get("thinking_budget"),
                       deadline=body.get("deadline"), stream=bool(stream),
                       include_usage=_include_usage(body.get("stream_options"), bool(stream)), model=model,
                       timeout=timeout)


def _check_sampling(body: dict[str, Any]) -> None:
    for name, greedy in GREEDY.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or value != greedy):
            raise InvalidJob(name, f"must be {greedy} or absent: the workers decode greedily, got {value!r}")


def _max_tokens(body: dict[str, Any]) -> int | None:
    values = {name: body[name] for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None}
    if len(set(map(repr, values.values()))) > 1:
        raise InvalidJob("max_tokens", f"and max_completion_tokens differ ({values}); give one of them")
    value = next(iter(values.values()), None)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidJob(next(iter(values)), f"must be an integer, got {value!r}")
    return value


def _include_usage(options: object, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise InvalidJob("stream_options", "is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidJob("stream_options", f"must be {{\"include_usage\": bool}}, got {options!r}")
    return bool(options.get("include_usage", False))


def _conversation(messages: object, settings: Settings) -> tuple[str, bytes, str, list[dict[str, str]]]:
    """Where the image is, the image, the question (system text first) and the earlier turns of ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise InvalidJob("messages", "must be a non-empty list of messages")
    system: list[str] = []
    turns: list[dict[str, str]] = []
    asked: list[str] = []  # user text since the last assistant message
    images: list[tuple[str, bytes]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidJob(where, f"must be an object whose role is one of {', '.join(ROLES)}, got "
                                    f"{message.get('role') if isinstance(message, dict) else message!r}")
        role, content = message["role"], message.get("content")
        if role in ("system", "developer"):
            system.append(_text_only(content, f"{where}.content"))
        elif role == "assistant":
            if not asked:
                raise InvalidJob(where, "an assistant message must follow a user message")
            turns.append({"question": "\n".join(asked), "answer": _text_only(content or "", f"{where}.content")})
            asked = []
        else:
            text, found = _user_content(content, f"{where}.content", settings)
            asked.append(text)
            images.extend(found)
    if not asked:
        raise InvalidJob("messages", "must end with a user message: the question")
    image_param, image = _one_image(images)
    question = "\n".join(asked)
    if system:
        question = "\n\n".join([*system, question])
    try:
        question = check_question(question, settings)
    except InvalidJob as exc:
        raise InvalidJob(f"messages[{len(messages) - 1}].content", exc.problem) from None
    return image_param, image, question, turns[-settings.history_turns:] if settings.history_turns else []


def _text_only(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidJob(f"{where}[{number}]", "must be a text part {\"type\": \"text\", \"text\": ...} "
                                                      "(images go in user messages)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidJob(where, f"must be a string or a list of text parts, got {type(content).__name__}")


def _user_content(content: object, where: str, settings: Settings) -> tuple[str, list[tuple[str, bytes]]]:
    """A user message's text and its images, each as (where it was, its bytes)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidJob(where, f"must be a string or a list of text and image_url parts, got {type(content).__name__}")
    texts: list[str] = []
    images: list[tuple[str, bytes]] = []
    for number, part in enumerate(content):
        at = f"{where}[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append((at, decode_data_url(url, f"{at}.image_url.url", settings)))
        else:
            raise InvalidJob(at, f"must be a part of type text or image_url, got {kind or type(part).__name__!r}")
    return "\n".join(texts), images


def decode_data_url(url: object, where: str, settings: Settings) -> bytes:
    """The bytes of a ``data:<type>;base64,...`` URL, refused past ``GLYPHQ_MAX_IMAGE_BYTES`` before decoding."""
    if not isinstance(url, str):
        raise InvalidJob(where, f"must be a string, got {type(url).__name__}")
    if url.startswith(("http://", "https://")):
        raise InvalidJob(where, "is an http(s) URL; glyphq fetches nothing: send the image inline as a "
                                "data:image/...;base64,... URL")
    header, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma or not header.endswith(";base64"):
        raise InvalidJob(where, f"must be a data:<type>;base64,<bytes> URL, got {url[:40]!r}")
    limit = settings.max_image_bytes
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise InvalidJob(where, f"holds about {len(payload) * 3 // 4} bytes; the limit is {limit} "
                                "(GLYPHQ_MAX_IMAGE_BYTES)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidJob(where, f"is not valid base64: {exc}") from None


def _one_image(images: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    if not images:
        raise InvalidJob("messages", "hold no image: glyphq answers questions about an image; add a part "
                                     '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}')
    first = images[0][1]
    for where, data in images[1:]:
        if data != first:
            raise InvalidJob(where, "is a second, different image; glyphq answers over one image per "
                                    "conversation")
    return f"{images[0][0]}.image_url.url", first


# ---- responses ----------------------------------------------------------------------------------------


def completion_id(job_id: str) -> str:
    """The ``id`` of the completion of job ``job_id``."""
    return f"chatcmpl-{job_id}"


def usage(result: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``usage`` from a glyphq result: prompt, completion and reasoning tokens."""
    prompt, completion = int(result.get("tokens_in") or 0), int(result.get("tokens_out") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": int(result.get("thinking_tokens") or 0)}}


def completion(result: dict[str, Any], job_id: str, model: str, created: int | None = None) -> dict[str, Any]:
    """The ``chat.completion`` object for a glyphq result, under the served model name ``model``.

    The reasoning goes in ``message.reasoning`` (vLLM's name) and in ``reasoning_content`` too, the name
    Glyph's own scripts and older vLLM clients read; ``content`` is the answer alone.
    """
    message = {"role": "assistant", "content": result.get("answer", ""), "reasoning": result.get("reasoning"),
               "reasoning_content": result.get("reasoning")}
    return {
        "id": completion_id(job_id), "object": "chat.completion", "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.get("finish_reason") or "stop",
                     "logprobs": None}],
        "usage": usage(result),
        "glyphq": {key: result.get(key) for key in ("job_id", "thinking_budget_hit", "image_size", "image_size_used",
                                                    "vision_tokens", "timings", "worker")},
    }


def chunk(job_id: str, created: int, model: str, delta: dict[str, Any] | None,
          finish_reason: str | None = None, include_usage: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` gives the final usage chunk with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    data: dict[str, Any] = {"id": completion_id(job_id), "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": choices}
    if include_usage:
        data["usage"] = None
    return data


def delta(kind: str, text: str) -> dict[str, Any]:
    """A chunk's ``delta`` of new ``text`` of ``kind`` "reasoning" (in both reasoning fields, as in
    ``completion``) or "answer" (``content``)."""
    if kind == "reasoning":
        return {"reasoning": text, "reasoning_content": text}
    return {"content": text}


def closing_chunks(result: dict[str, Any], job_id: str, created: int, include_usage: bool,
                   model: str) -> list[dict[str, Any]]:
    """The chunks that end a stream once its text is out: the finish reason and, if asked, the usage.
    ``model`` is the served name the client asked for."""
    chunks = [chunk(job_id, created, model, {}, result.get("finish_reason") or "stop", include_usage)]
    if include_usage:
        final = chunk(job_id, created, model, None)
        final["usage"] = usage(result)
        chunks.append(final)
    return chunks


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` (plus ``extra``)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **extra}}
