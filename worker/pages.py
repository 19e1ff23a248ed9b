"""The render queue's work: a document's text blob in, page-image blobs out. No torch here."""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from typing import Any

from glyphq.celeryconfig import Settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.schema import RenderRequest, document_text
from glyphq.producer.store import Store
from glyphq.worker.render import InvalidRenderConfig, RenderConfig, png_bytes, render_pages

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def base_config(path: str) -> dict[str, Any]:
    """The render worker's own defaults: Glyph's, or the JSON file at ``GLYPHQ_RENDER_CONFIG``."""
    if not path:
        return {}
    return RenderConfig.from_json(path).to_dict()


def render_config(settings: Settings, overrides: dict[str, Any]) -> RenderConfig:
    """The worker's defaults with a job's overrides on top; a bad value is the job's ``InvalidJob``."""
    if "font-path" in overrides:
        raise InvalidJob("render", "font-path cannot be set per job; set it in GLYPHQ_RENDER_CONFIG on the worker")
    try:
        return RenderConfig.from_dict({**base_config(settings.render_config), **overrides})
    except InvalidRenderConfig as exc:
        raise InvalidJob("render", str(exc)) from None


def render_document(raw_request: object, job_id: str, settings: Settings) -> dict[str, Any]:
    """Render a document's text into page blobs held for ``job_id``; refuse more than ``max_pages``."""
    request = RenderRequest.from_dict(raw_request)
    config = render_config(settings, request.render)
    store = Store(settings)
    text = document_text(store, request.text_key, settings)
    start = time.perf_counter()
    try:
        pages = render_pages(text, config)
    except InvalidRenderConfig as exc:
        raise InvalidJob("render", str(exc)) from None
    if len(pages) > settings.max_pages:
        raise InvalidJob("text", f"renders to {len(pages)} pages; the limit is {settings.max_pages} (GLYPHQ_MAX_PAGES)")
    encoded = [png_bytes(page) for page in pages]
    render_s = time.perf_counter() - start
    keys = [store.put_blob(png, job_id) for png in encoded]
    log.info("rendered %d chars into %d pages in %.2f s", request.text_chars, len(pages), render_s)
    return {
        "page_keys": keys,
        "page_sizes": [list(page.size) for page in pages],
        "page_bytes": sum(len(png) for png in encoded),
        "render_s": round(render_s, 4),
        "config": json.loads(json.dumps(config.to_dict())),
    }
