"""OpenAI Batch files in ``glyphq batch``: input lines ``{"custom_id", "method", "url", "body"}``, output lines
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.

A file is an OpenAI Batch file when its first non-blank line is a JSON object with a ``custom_id``. The
``custom_id`` is the line's id (resume, job ids and duplicates work as for glyphq's own lines). Only
``POST /v1/chat/completions`` requests are run; their bodies are read as the gateway reads them
(``producer.chat``), when the line is submitted, so the whole file's images are never held at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glyphq.celeryconfig import Settings
from glyphq.producer import chat
from glyphq.producer.errors import InvalidJob

FIELDS = ("custom_id", "method", "url", "body")
URL = "/v1/chat/completions"
#: The status an OpenAI Batch output gives a job that failed with each worker error; others get 500.
FAILURE_STATUS = {"InvalidJob": 400, "JobExpired": 504}


def is_openai_file(path: Path) -> bool:
    """Whether the first non-blank line of ``path`` is an OpenAI Batch request (has ``custom_id``)."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    data = json.loads(raw)
                except (ValueError, RecursionError):  # a bad first line: glyphq's reading reports it
                    return False
                return isinstance(data, dict) and "custom_id" in data
    return False


def check_envelope(data: object) -> str:
    """The ``custom_id`` of an OpenAI Batch line whose envelope is right; ``ValueError`` naming what is not.

    The body is checked when the line is submitted (``job_args``).
    """
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError(f"custom_id: must be a non-empty string, got {custom_id!r}")
    if data.get("method", "POST") != "POST":
        raise ValueError(f"method: must be POST, got {data.get('method')!r}")
    if data.get("url") != URL:
        raise ValueError(f"url: glyphq runs {URL} requests only, got {data.get('url')!r}")
    if not isinstance(data.get("body"), dict):
        raise ValueError("body: must be the JSON object of a chat completion request")
    return custom_id


def job_args(raw: bytes, cfg: Settings) -> tuple[bytes, str, dict[str, Any]]:
    """(image, question, other ``submit`` arguments) of one OpenAI Batch line; ``InvalidJob`` if refused."""
    body = json.loads(raw)["body"]
    if chat.served_model(body.get("model"), cfg) is None:
        raise InvalidJob("body.model", chat.not_served(body.get("model"), cfg))
    for name, why in (("stream", "a batch line is answered whole"), ("timeout", "use glyphq batch --timeout")):
        if body.get(name):
            raise InvalidJob(f"body.{name}", f"is not used in batch files: {why}")
    request = chat.parse_request(body, cfg)
    return request.image, request.question, request.submit_kwargs()


def served_model(raw: bytes, cfg: Settings) -> str:
    """The served model name an OpenAI Batch line's body asked for (the first one if it names none it serves)."""
    try:
        requested = json.loads(raw)["body"].get("model")
    except (ValueError, KeyError, TypeError, AttributeError):
        requested = None
    return chat.served_model(requested, cfg) or cfg.served_model_names[0]


def success(custom_id: str, job_id: str, result: dict[str, Any], model: str) -> dict[str, Any]:
    """The output line of a request the workers answered."""
    return {"id": f"batch_req_{job_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": job_id, "body": chat.completion(result, job_id, model)},
            "error": None}


def failure(custom_id: str, job_id: str, error_type: str, message: str) -> dict[str, Any]:
    """The output line of a request whose job failed: the HTTP-like response and ``error`` both say why."""
    status = FAILURE_STATUS.get(error_type, 500)
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {"id": f"batch_req_{job_id}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": job_id,
                         "body": chat.error_body(message, kind, None, error_type)},
            "error": {"code": error_type, "message": message}}


def finished(record: dict[str, Any]) -> tuple[str, bool]:
    """(custom_id, ok) of an output line."""
    response = record["response"]
    ok = record["error"] is None and isinstance(response, dict) and response.get("status_code") == 200
    return str(record["custom_id"]), ok
