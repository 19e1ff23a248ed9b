"""The broker message of a ``glyphq.answer`` job: small JSON that names the image blob, never its bytes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from celeryconfig import KEY_PREFIX, Settings
from producer.errors import InvalidJob
from producer.validation import check_identifier, check_max_new_tokens, check_question

ANSWER_TASK = "glyphq.answer"
_BLOB_KEY = re.compile(rf"^{KEY_PREFIX}blob:[0-9a-f]{{64}}$")
MESSAGE_VERSION = 1


@dataclass(frozen=True)
class JobMessage:
    """What the worker receives for one job."""

    image_key: str
    image_bytes: int
    image_size: tuple[int, int]
    question: str
    max_new_tokens: int
    session: str | None
    submitted_at: float
    version: int = MESSAGE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as sent to the broker."""
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    def summary(self) -> str:
        """Short form for logs and Flower: the blob key and its size, never the bytes."""
        question = self.question if len(self.question) <= 60 else self.question[:57] + "..."
        return (
            f"{{image: {self.image_key} ({self.image_bytes} B, {self.image_size[0]}x{self.image_size[1]}), "
            f"question: {question!r}, max_new_tokens: {self.max_new_tokens}, session: {self.session}}}"
        )

    @classmethod
    def from_dict(cls, data: object, settings: Settings) -> JobMessage:
        """Check a received message as strictly as ``submit`` checks a new job.

        The worker reads images only from ``glyphq:blob:`` keys, never from a path in the message.
        """
        if not isinstance(data, dict):
            raise InvalidJob("job", f"must be an object, got {type(data).__name__}")
        if data.get("version") != MESSAGE_VERSION:
            raise InvalidJob("version", f"must be {MESSAGE_VERSION}, got {data.get('version')!r}")
        key = data.get("image_key")
        if not isinstance(key, str) or not _BLOB_KEY.match(key):
            raise InvalidJob("image_key", f"must be a {KEY_PREFIX}blob:<sha256> key, got {key!r}")
        size = data.get("image_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise InvalidJob("image_size", f"must be [width, height], got {size!r}")
        image_bytes = data.get("image_bytes")
        submitted_at = data.get("submitted_at")
        if not isinstance(image_bytes, int) or not isinstance(submitted_at, (int, float)):
            raise InvalidJob("job", "image_bytes and submitted_at must be numbers")
        return cls(
            image_key=key,
            image_bytes=image_bytes,
            image_size=(size[0], size[1]),
            question=check_question(data.get("question"), settings),
            max_new_tokens=check_max_new_tokens(data.get("max_new_tokens"), settings),
            session=check_identifier("session", data.get("session")),
            submitted_at=float(submitted_at),
        )
