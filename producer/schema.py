"""Broker messages: small JSON that names blobs in Redis, never carries their bytes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from glyphq.celeryconfig import ANSWER_PAGES_TASK, ANSWER_TASK, RENDER_TASK, Settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.store import Store, check_blob_key
from glyphq.producer.validation import (
    check_history,
    check_identifier,
    check_max_new_tokens,
    check_question,
    check_thinking_budget,
)

__all__ = ["ANSWER_TASK", "ANSWER_PAGES_TASK", "RENDER_TASK", "JobMessage", "RenderRequest", "check_task_id",
           "document_text", "MESSAGE_VERSION"]

MESSAGE_VERSION = 1


#: A task id: a job id (see ``check_identifier``), or a document's render step ``<job id>.render``.
_TASK_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}(\.render)?$")


def check_task_id(task_id: object) -> str:
    """``task_id`` if it could be a glyphq job id; it becomes part of Redis keys (claims, run counters)."""
    if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
        raise InvalidJob("task_id", f"must be 1 to 128 characters of letters, digits and . _ : -, got {task_id!r}")
    return task_id


def document_text(store: Store, key: str, settings: Settings) -> str:
    """A document's text from its blob, checked as ``submit_document`` checks it: UTF-8, within
    ``GLYPHQ_MAX_DOCUMENT_CHARS``."""
    data = store.require_blob("text_key", key, 4 * settings.max_document_chars)  # UTF-8: at most 4 bytes a char
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJob("text_key", f"blob {key} is not UTF-8 text: {exc}") from None
    if len(text) > settings.max_document_chars:
        raise InvalidJob("text_key", f"blob {key} holds {len(text)} characters; the limit is "
                                     f"{settings.max_document_chars} (GLYPHQ_MAX_DOCUMENT_CHARS)")
    return text


def _check_int(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidJob(field, f"must be a non-negative integer, got {value!r}")
    return value


def _check_bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidJob(field, f"must be true or false, got {value!r}")
    return value


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_time(field: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidJob(field, f"must be a number, got {value!r}")
    return float(value)


def _check_version(data: dict[str, Any]) -> None:
    if data.get("version") != MESSAGE_VERSION:
        raise InvalidJob("version", f"must be {MESSAGE_VERSION}, got {data.get('version')!r}")


@dataclass(frozen=True)
class JobMessage:
    """What the GPU worker receives for one job: its images (one, or a document's pages) and question."""

    image_keys: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]
    image_bytes: int
    question: str
    max_new_tokens: int
    session: str | None
    submitted_at: float
    text_key: str | None = None  # a document's text, kept to count its tokens
    render_s: float | None = None
    thinking_budget: int = 0  # new tokens of reasoning before the answer is due; 0: no budget
    history: tuple[dict[str, str], ...] = ()  # earlier turns the job carries itself (not a session's)
    stream: bool = False  # publish the text as it is written (producer.stream)
    cache_scope: str | None = None  # only jobs of the same scope share the worker's caches of pages read before
    version: int = MESSAGE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as sent to the broker."""
        data = asdict(self)
        data["image_keys"] = list(self.image_keys)
        data["image_sizes"] = [list(size) for size in self.image_sizes]
        data["history"] = [dict(turn) for turn in self.history]
        return data

    def summary(self) -> str:
        """Short form for logs and Flower: blob keys and sizes, never the bytes."""
        question = self.question if len(self.question) <= 60 else self.question[:57] + "..."
        if self.text_key and not self.image_keys:
            images = f"document {self.text_key} (pages not rendered yet)"
        elif len(self.image_keys) == 1:
            w, h = self.image_sizes[0]
            images = f"{self.image_keys[0]} ({self.image_bytes} B, {w}x{h})"
        else:
            images = f"{len(self.image_keys)} pages ({self.image_bytes} B)"
        return (f"{{image: {images}, question: {question!r}, max_new_tokens: {self.max_new_tokens}, "
                f"session: {self.session}}}")

    @classmethod
    def from_dict(cls, data: object, settings: Settings) -> JobMessage:
        """Check a received message as strictly as ``submit`` checks a new job."""
        if not isinstance(data, dict):
            raise InvalidJob("job", f"must be an object, got {type(data).__name__}")
        _check_version(data)
        keys, sizes = data.get("image_keys"), data.get("image_sizes")
        if not isinstance(keys, list) or not 1 <= len(keys) <= settings.max_pages:
            raise InvalidJob("image_keys", f"must list 1 to {settings.max_pages} images (GLYPHQ_MAX_PAGES), "
                             f"got {len(keys) if isinstance(keys, list) else repr(keys)}")
        if not (isinstance(sizes, list) and len(sizes) == len(keys)
                and all(isinstance(s, list) and len(s) == 2 and all(_positive_int(v) for v in s) for s in sizes)):
            raise InvalidJob("image_sizes", f"must give [width, height] in pixels for each image, got {sizes!r}")
        text_key = data.get("text_key")
        render_s = data.get("render_s")
        max_new_tokens = check_max_new_tokens(data.get("max_new_tokens"), settings)
        session = check_identifier("session", data.get("session"))
        return cls(
            image_keys=tuple(check_blob_key("image_keys", k) for k in keys),
            image_sizes=tuple((s[0], s[1]) for s in sizes),
            image_bytes=_check_int("image_bytes", data.get("image_bytes")),
            question=check_question(data.get("question"), settings),
            max_new_tokens=max_new_tokens,
            thinking_budget=check_thinking_budget(data.get("thinking_budget"), max_new_tokens, settings),
            session=session,
            history=check_history(data.get("history"), session, settings),
            submitted_at=_check_time("submitted_at", data.get("submitted_at")),
            text_key=None if text_key is None else check_blob_key("text_key", text_key),
            render_s=None if render_s is None else _check_time("render_s", render_s),
            stream=_check_bool("stream", data.get("stream", False)),
            cache_scope=check_identifier("cache_scope", data.get("cache_scope")),
        )


@dataclass(frozen=True)
class RenderRequest:
    """What the CPU render worker receives: the text blob and the per-job render settings."""

    text_key: str
    text_chars: int
    render: dict[str, Any]
    version: int = MESSAGE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as sent to the broker."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> RenderRequest:
        """Check a received render message."""
        if not isinstance(data, dict):
            raise InvalidJob("request", f"must be an object, got {type(data).__name__}")
        _check_version(data)
        render = data.get("render")
        if not isinstance(render, dict):
            raise InvalidJob("render", f"must be an object, got {render!r}")
        return cls(text_key=check_blob_key("text_key", data.get("text_key")),
                   text_chars=_check_int("text_chars", data.get("text_chars")), render=render)
