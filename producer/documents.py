"""``submit_document()``: long text the Glyph way. A CPU worker renders pages, then the GPU worker answers.

The text is stored as a blob; a Celery chain runs ``glyphq.render`` on queue ``render`` and then
``glyphq.answer_pages`` on queue ``gpu`` (or the ``gpu.<name>`` queue the job names). Page images
travel as blobs, never inside messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import chain

from glyphq.celeryconfig import RENDER_QUEUE, Settings
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.options import check_job_options
from glyphq.producer.schema import ANSWER_PAGES_TASK, RENDER_TASK, JobMessage, RenderRequest
from glyphq.producer.submit import Job, enqueue
from glyphq.producer.validation import check_unicode_text
from glyphq.tasks.app import app

#: Render settings a job may set, as in Glyph's config_en.json. ``font-path`` is not among them: the
#: worker never opens a path a producer sent. Operators set it in GLYPHQ_RENDER_CONFIG.
RENDER_KEYS = frozenset({
    "page-size", "dpi", "margin-x", "margin-y", "font-size", "line-height", "font-color", "page-bg-color",
    "para-bg-color", "alignment", "horizontal-scale", "first-line-indent", "left-indent", "right-indent",
    "space-before", "space-after", "border-width", "border-padding", "auto-crop-width", "auto-crop-last-page",
    "newline-markup",
})


def check_text(text: object, settings: Settings) -> str:
    """The document text, if it is UTF-8-encodable text with a visible character, within ``max_document_chars``."""
    if not isinstance(text, str):
        raise InvalidJob("text", f"must be a string, got {type(text).__name__}")
    if len(text) > settings.max_document_chars:
        raise InvalidJob("text", f"is {len(text)} characters; the limit is {settings.max_document_chars} "
                                 "(GLYPHQ_MAX_DOCUMENT_CHARS)")
    return check_unicode_text("text", text)


def check_render(render: object) -> dict[str, Any]:
    """Per-job render settings from a mapping or a JSON file, with Glyph's hyphenated keys.

    Unknown keys and ``font-path`` are refused here; values are checked by the render worker.
    """
    if render is None:
        return {}
    if isinstance(render, (str, Path)):
        try:
            render = json.loads(Path(render).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidJob("render", f"cannot read render config {str(render)!r}: {exc}") from None
    if not isinstance(render, Mapping):
        raise InvalidJob("render", f"must be an object of Glyph render settings, got {type(render).__name__}")
    if "font-path" in render:
        raise InvalidJob("render", "font-path cannot be set per job; set it in GLYPHQ_RENDER_CONFIG on the worker")
    unknown = sorted(str(k) for k in render if k not in RENDER_KEYS)
    if unknown:
        raise InvalidJob("render", f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(RENDER_KEYS))}")
    data = dict(render)
    try:
        json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise InvalidJob("render", f"values must be JSON: {exc}") from None
    return data


def submit_document(
    text: str,
    question: str,
    *,
    render: Mapping[str, Any] | str | Path | None = None,
    max_new_tokens: int | None = None,
    thinking_budget: int | None = None,
    priority: int | None = None,
    session: str | None = None,
    job_id: str | None = None,
    deadline: float | None = None,
    stream: bool = False,
    queue: str | None = None,
    cache_scope: str | None = None,
    settings: Settings | None = None,
) -> Job:
    """Enqueue a question about a long text; it is rendered into pages on the ``render`` queue first.

    ``render`` overrides Glyph's rendering settings (its ``config_en.json`` keys, e.g. ``{"dpi": 96}``),
    as a mapping or a JSON file. ``thinking_budget`` is as in ``submit``. The result adds ``pages``,
    ``text_tokens``, ``vision_tokens`` and ``compression`` (text tokens per vision token) to the fields
    of an image job. A text that renders
    to more than ``GLYPHQ_MAX_PAGES`` pages fails with ``InvalidJob``. ``stream`` is as in ``submit``.
    ``queue`` (``gpu.<name>``) is as in ``submit``: the pages are rendered on ``render`` as always, and the
    question is answered by the worker that consumes that queue. Sending every question about one
    document to one worker lets it reuse what it computed for the pages (docs/scaling.md).
    ``cache_scope`` is as in ``submit``.
    """
    cfg = settings or default_settings
    text = check_text(text, cfg)
    options = check_job_options(question, max_new_tokens=max_new_tokens, thinking_budget=thinking_budget,
                                priority=priority, session=session, job_id=job_id, deadline=deadline, settings=cfg,
                                queue=queue, cache_scope=cache_scope)
    overrides = check_render(render)
    job_id = options.job_id
    data = text.encode("utf-8")

    def send(key: str) -> None:
        request = RenderRequest(text_key=key, text_chars=len(text), render=overrides)
        job = JobMessage(image_keys=(), image_sizes=(), image_bytes=0, question=options.question,
                         max_new_tokens=options.max_new_tokens, session=options.session, submitted_at=time.time(),
                         text_key=key, thinking_budget=options.thinking_budget, stream=bool(stream),
                         cache_scope=options.cache_scope)
        chain(
            app.signature(RENDER_TASK, kwargs={"request": request.to_dict(), "job_id": job_id}, queue=RENDER_QUEUE,
                          priority=options.celery_priority, expires=options.expires).set(task_id=f"{job_id}.render"),
            app.signature(ANSWER_PAGES_TASK, kwargs={"job": job.to_dict()}, queue=options.queue,
                          priority=options.celery_priority, kwargsrepr=job.summary(),
                          expires=options.expires).set(task_id=job_id),
        ).apply_async()

    return enqueue(cfg, RENDER_QUEUE, job_id, data, send)
