"""Cache scopes: only jobs of one scope share what a GPU worker keeps of pages read before, so that no
one can tell from a result's timings what another asked about. The gateway gives each API key its own."""

from __future__ import annotations

import base64
import io
import json

import pytest
from conftest import png_bytes, queued_messages
from PIL import Image
from test_prefix import _document, _engine

from glyphq.celeryconfig import settings
from glyphq.producer import InvalidJob, submit, submit_document
from glyphq.producer.chat import parse_request
from glyphq.producer.tenants import Keys, submit_as
from glyphq.worker.prefix import block_keys, page_key, page_spans

BOX = (1280, 720)


def _queued_job(redis_client, job_id: str) -> dict:
    (message,) = [m for m in queued_messages(redis_client, "gpu") if job_id.encode() in m]
    return json.loads(base64.b64decode(json.loads(message)["body"]))[1]["job"]


def test_keys_of_one_scope_never_equal_anothers():
    page = Image.open(io.BytesIO(png_bytes(seed=5)))
    ids = [1] + [7] * 80
    owner = page_spans(ids, 7, [80])
    keys = {scope: (page_key(page, "ab" * 32, scope), block_keys(ids, owner, [page_key(page, "ab" * 32, scope)],
                                                                 scope)[0]) for scope in (None, "alice", "bob")}
    assert len({page for page, _ in keys.values()}) == 3 and len({block for _, block in keys.values()}) == 3


@pytest.mark.parametrize("scope", ["", "a b", "x" * 129, "tenant/1", 7])
def test_a_bad_cache_scope_is_refused_naming_the_field_and_nothing_is_enqueued(scope, redis_client):
    before = set(redis_client.keys("*"))
    for send in (lambda: submit(png_bytes(), "q", cache_scope=scope),
                 lambda: submit_document("Some text.", "q", cache_scope=scope)):
        with pytest.raises(InvalidJob) as info:
            send()
        assert info.value.field == "cache_scope" and "1 to 128 characters" in str(info.value)
    assert set(redis_client.keys("*")) == before


def test_the_gateway_scopes_each_keys_jobs_to_that_key(redis_client):
    keys = Keys(("key-of-alice-0123456789", "key-of-bob-0123456789ab"))
    alice = keys.tenant("Bearer key-of-alice-0123456789")
    body = {"model": "glyph", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()}},
        {"type": "text", "text": "What is here?"}]}], "max_tokens": 4}
    job = submit_as(alice, "scoped-job-1", "digest", parse_request(body, settings), settings)
    plain = submit(png_bytes(), "What is here?", max_new_tokens=4, cache_scope="user-42")
    assert _queued_job(redis_client, job.id)["cache_scope"] == alice
    assert _queued_job(redis_client, plain.id)["cache_scope"] == "user-42"
    redis_client.delete(*[k for k in redis_client.keys("glyphq:gpu*")])


def test_jobs_of_another_scope_read_the_same_pages_again(endless_model):
    engine = _engine(endless_model)
    pages = list(range(700, 712))

    def ask(scope: str | None):
        job = _document(pages, "When does the lease end")
        job.cache_scope = scope
        return engine.answer([job], BOX)[0]

    first, same, other, shared = ask("alice"), ask("alice"), ask("bob"), ask(None)
    assert first.token_ids == same.token_ids == other.token_ids == shared.token_ids
    assert same.prefix_cached_tokens > 0 and same.encoder_cached_pages == 1
    assert other.prefix_cached_tokens == 0 and other.encoder_cached_pages == 0
    assert shared.prefix_cached_tokens == 0 and shared.encoder_cached_pages == 0
