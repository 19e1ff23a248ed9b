"""A gateway request's body: its size limit, a deadline on its arrival, and its JSON, read without recursion."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request

from glyphq.celeryconfig import Settings
from glyphq.producer.errors import InvalidJob, RequestRefused

#: Room in a request body besides the image: the JSON around it, escaped text (up to 12 bytes a
#: character for \\u escapes of surrogate pairs) of the question, a system prompt and the history.
BODY_SLACK_BYTES = 64 * 1024
#: Deepest nesting of arrays and objects a request body may have; a chat request nests 6 deep.
MAX_JSON_DEPTH = 32


def body_limit(cfg: Settings) -> int:
    """The largest request body accepted: a base64 image of ``GLYPHQ_MAX_IMAGE_BYTES`` plus its text."""
    image = (cfg.max_image_bytes + 2) // 3 * 4
    text = 12 * (2 * cfg.max_question_chars + cfg.max_history_chars)
    return image + text + BODY_SLACK_BYTES


async def read_json(request: Request, limit: int, timeout: float) -> Any:
    """The request's JSON body, refused (413) past ``limit`` bytes before it is all read, and (408) when it
    has not all arrived within ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, f"the request body is {declared} bytes; the limit is {limit} (from "
                                  "GLYPHQ_MAX_IMAGE_BYTES and the text limits)", code="body_too_large")
    try:
        data = await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestRefused(408, f"the request body did not arrive within {timeout:g} s "
                                  "(GLYPHQ_GATEWAY_BODY_TIMEOUT)", code="body_timeout") from None
    except ClientDisconnect:
        raise RequestRefused(400, "the client closed the connection before its body arrived",
                             code="client_disconnected") from None
    return parse_json(data)


async def _read_body(request: Request, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestRefused(413, f"the request body is over {limit} bytes (from GLYPHQ_MAX_IMAGE_BYTES and "
                                      "the text limits)", code="body_too_large")
        parts.append(part)
    return b"".join(parts)


def parse_json(data: bytes) -> Any:
    """A body's JSON value; ``InvalidJob`` (field ``body``) unless it is plain JSON (no NaN or Infinity)
    nested at most ``MAX_JSON_DEPTH`` deep."""
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:  # deeper than Python's recursion limit: far past MAX_JSON_DEPTH
        raise InvalidJob("body", f"is nested more than {MAX_JSON_DEPTH} deep") from None
    except ValueError as exc:
        raise InvalidJob("body", f"is not valid JSON: {exc}") from None
    _check_depth(value)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_depth(value: Any) -> None:
    """Refuse a value nested deeper than ``MAX_JSON_DEPTH``, walked without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidJob("body", f"is nested more than {MAX_JSON_DEPTH} deep")
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
