"""``Store.lock_session`` and ``unlock_session`` against the test's real redis-server."""

from __future__ import annotations

import time
import uuid

import pytest

from glyphq.celeryconfig import Settings, settings
from glyphq.producer.store import Store, session_key, session_lock_key


@pytest.fixture
def session(redis_client) -> str:
    name = f"lock-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(session_lock_key(name))


def test_the_lock_key_is_glyphq_s_and_apart_from_every_session_s_turns():
    assert session_lock_key("s1") == "glyphq:session-lock:s1"
    # Session ids may hold ":", so a suffix on the turns' key could name another session's turns.
    assert session_lock_key("a") != session_key("a:lock") and not session_lock_key("a").startswith("glyphq:session:")


def test_one_job_at_a_time_holds_a_session(session, redis_client):
    store = Store(settings)
    assert store.lock_session(session, "job-1", 30) == "job-1"
    assert redis_client.get(session_lock_key(session)) == b"job-1"
    assert 25 < redis_client.ttl(session_lock_key(session)) <= 30
    assert store.lock_session(session, "job-2", 30) == "job-1", "a second turn took a held session"
    assert redis_client.get(session_lock_key(session)) == b"job-1"

    assert store.unlock_session(session, "job-1")
    assert not redis_client.exists(session_lock_key(session))
    assert store.lock_session(session, "job-2", 30) == "job-2", "a released session stayed locked"


def test_only_the_holder_releases_the_lock(session, redis_client):
    store = Store(settings)
    assert store.lock_session(session, "job-1", 30) == "job-1"
    assert not store.unlock_session(session, "job-2")
    assert redis_client.get(session_lock_key(session)) == b"job-1"
    assert store.unlock_session(session, "job-1")
    assert not store.unlock_session(session, "job-1"), "releasing twice released something"


def test_a_job_delivered_again_takes_its_own_lock_back(session, redis_client):
    store = Store(settings)
    assert store.lock_session(session, "job-1", 5) == "job-1"
    assert store.lock_session(session, "job-1", 30) == "job-1", "a redelivered job waited for its own lock"
    assert redis_client.ttl(session_lock_key(session)) > 5, "taking it back did not renew its expiry"


def test_a_lock_whose_holder_died_expires(session, redis_client):
    store = Store(settings)
    assert store.lock_session(session, "dead-job", 1) == "dead-job"
    assert store.lock_session(session, "job-2", 30) == "dead-job"
    time.sleep(1.2)
    assert store.lock_session(session, "job-2", 30) == "job-2", "an expired lock still held the session"
    assert not store.unlock_session(session, "dead-job"), "the dead job released the lock of the turn after it"
    assert redis_client.get(session_lock_key(session)) == b"job-2"


def test_the_worker_s_lock_outlives_the_hard_time_limit(session, redis_client, monkeypatch):
    from glyphq.worker import runtime

    monkeypatch.setattr(runtime, "settings", Settings.from_env({"GLYPHQ_TIME_LIMIT": "40",
                                                                "GLYPHQ_BROKER_URL": settings.broker_url}))
    assert runtime.lock_session(session, "job-1") == "job-1"
    ttl = redis_client.ttl(session_lock_key(session))
    assert 40 < ttl <= 40 + runtime.SESSION_LOCK_MARGIN_S
    runtime.unlock_session(session, "job-1")
    assert not redis_client.exists(session_lock_key(session))
