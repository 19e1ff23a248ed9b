"""Which blobs a finished task releases, and for whom: pure functions over untrusted message fields."""

from __future__ import annotations

from glyphq.producer.schema import ANSWER_PAGES_TASK, ANSWER_TASK, RENDER_TASK
from glyphq.tasks.signals import finished_blobs, render_owner

BLOB = "glyphq:blob:" + "ab" * 32
OTHER = "glyphq:blob:" + "cd" * 32


def test_an_answer_releases_its_blob_keys_for_its_own_id():
    assert finished_blobs(ANSWER_TASK, "j1", (), {"job": {"image_keys": [BLOB]}}, "SUCCESS") == ("j1", [BLOB])


def test_any_key_that_is_not_a_blob_key_releases_nothing():
    for bad in ("glyphq:render:4", "glyphq:session:s", BLOB + ":refs", "outside", BLOB.upper(), 7, None):
        assert finished_blobs(ANSWER_TASK, "j1", (), {"job": {"image_keys": [BLOB, bad]}}, "FAILURE") == ("j1", [])


def test_a_pages_job_releases_its_pages_and_text_only_if_all_are_blobs():
    rendered = {"page_keys": [BLOB, OTHER]}
    job = {"text_key": BLOB}
    assert finished_blobs(ANSWER_PAGES_TASK, "d1", (rendered,), {"job": job}, "SUCCESS") == ("d1", [BLOB, OTHER, BLOB])
    assert finished_blobs(ANSWER_PAGES_TASK, "d1", ({"page_keys": ["glyphq:gpu"]},), {"job": job}, "SUCCESS") \
        == ("d1", [])


def test_a_failed_render_releases_the_text_for_its_document_job_only():
    kwargs = {"job_id": "d1", "request": {"text_key": BLOB}}
    assert finished_blobs(RENDER_TASK, "d1.render", (), kwargs, "FAILURE") == ("d1", [BLOB])
    assert finished_blobs(RENDER_TASK, "d1.render", (), kwargs, "SUCCESS") == ("d1.render", [])
    assert finished_blobs(RENDER_TASK, "other.render", (), kwargs, "FAILURE") == ("", [])


def test_a_render_step_belongs_only_to_the_job_its_id_names():
    assert render_owner("d1.render", {"job_id": "d1"}) == "d1"
    assert render_owner("d2.render", {"job_id": "d1"}) is None
    assert render_owner("glyphq:x y.render", {"job_id": "glyphq:x y"}) is None  # not a job id
    assert render_owner("d1.render", {}) is None
