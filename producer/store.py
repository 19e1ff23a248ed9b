"""glyphq's own Redis keys: image blobs, job-id claims, run counters and session history.

Every key starts with ``glyphq:`` and carries a TTL, so none grows without bound.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from celeryconfig import KEY_PREFIX, PRIORITY_LEVELS, Settings
from producer.errors import BlobMissing, BrokerUnavailable

log = logging.getLogger(__name__)

CLAIM_TTL_S = 120

# Drop this job's reference to a blob; delete the blob when no queued job refers to it any more.
_RELEASE_BLOB = """
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


def blob_key(sha256: str) -> str:
    """Key of the image bytes with this content hash."""
    return f"{KEY_PREFIX}blob:{sha256}"


def _refs_key(image_key: str) -> str:
    return f"{image_key}:refs"


def job_key(job_id: str) -> str:
    """Key that claims a job id, so the same id is enqueued once."""
    return f"{KEY_PREFIX}job:{job_id}"


def runs_key(job_id: str) -> str:
    """Key counting how many times a worker started this job."""
    return f"{KEY_PREFIX}runs:{job_id}"


def session_key(session: str) -> str:
    """Key of a session's list of turns, oldest first."""
    return f"{KEY_PREFIX}session:{session}"


_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30}


@lru_cache(maxsize=8)
def client(url: str, sentinel_master: str = "", sentinel_password: str = "") -> redis.Redis:
    """A Redis client for ``url``, shared per URL.

    ``url`` is ``redis://``, ``rediss://``, ``unix://``, or Celery's Sentinel form
    ``sentinel://:pw@h1:26379/0;sentinel://:pw@h2:26379/0``, whose password is the master's.
    """
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **_OPTIONS)
    nodes: list[tuple[str, int]] = []
    username = password = None
    db = 0
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        nodes.append((parts.hostname or "localhost", parts.port or 26379))
        username = username or (unquote(parts.username) if parts.username else None)
        password = password or (unquote(parts.password) if parts.password else None)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 5}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(sentinel_master, db=db, username=username, password=password, **_OPTIONS)


def settings_client(settings: Settings) -> redis.Redis:
    """The client for ``settings``' broker, Sentinel master name and password included."""
    return client(settings.broker_url, settings.sentinel_master, settings.sentinel_password)


class Store:
    """glyphq's keys on the broker's Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = settings_client(settings)

    def claim_job(self, job_id: str) -> bool:
        """Claim ``job_id`` for a short while; False if it was already submitted (and not yet expired).

        The claim lasts ``CLAIM_TTL_S`` until ``confirm_job``: a producer that dies between claiming
        and sending leaves an id that can be submitted again soon, not one stuck for days.
        """
        return bool(self.redis.set(job_key(job_id), "1", nx=True, ex=CLAIM_TTL_S))

    def confirm_job(self, job_id: str) -> None:
        """Keep the claim of a job that reached the queue as long as its result."""
        self.redis.expire(job_key(job_id), self.settings.result_expires_s)

    def job_exists(self, job_id: str) -> bool:
        """True if ``job_id`` was submitted and its claim has not expired."""
        return bool(self.redis.exists(job_key(job_id)))

    def unclaim_job(self, job_id: str) -> None:
        """Forget a claim whose job never reached the queue."""
        self.redis.delete(job_key(job_id))

    def put_blob(self, sha256: str, data: bytes, job_id: str) -> str:
        """Store image bytes under their content address for ``job_id``; return the key."""
        key = blob_key(sha256)
        ttl = self.settings.blob_ttl_s
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(key, data, nx=True, ex=ttl)
        pipe.expire(key, ttl)  # refresh: an older job may have stored it with less time left
        pipe.sadd(_refs_key(key), job_id)
        pipe.expire(_refs_key(key), ttl)
        pipe.execute()
        return key

    def require_blob(self, key: str) -> bytes:
        """The bytes under a blob key; ``BlobMissing`` if they expired or never existed."""
        data = self.get_blob(key)
        if data is None:
            raise BlobMissing(f"blob {key} is gone (expired after GLYPHQ_BLOB_TTL?)")
        return data

    def get_blob(self, key: str) -> bytes | None:
        """The bytes under a blob key, or None if it expired or never existed."""
        value = self.redis.get(key)
        return value if isinstance(value, bytes) else None

    def release_blob(self, key: str, job_id: str) -> bool:
        """Drop ``job_id``'s reference to a blob; True if the blob itself was deleted."""
        return bool(self.redis.eval(_RELEASE_BLOB, 2, key, _refs_key(key), job_id))

    def count_run(self, job_id: str) -> int:
        """Count one more start of ``job_id`` and return how many there have been."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(runs_key(job_id))
        pipe.expire(runs_key(job_id), self.settings.result_expires_s)
        return int(pipe.execute()[0])

    def runs(self, job_id: str) -> int:
        """How many times a worker has started ``job_id``."""
        return int(self.redis.get(runs_key(job_id)) or 0)

    def session_turns(self, session: str, limit: int) -> list[dict[str, str]]:
        """The last ``limit`` turns of a session, oldest first, as ``{"question", "answer"}`` dicts."""
        if limit <= 0:
            return []
        return [json.loads(t) for t in self.redis.lrange(session_key(session), -limit, -1)]

    def append_turn(self, session: str, question: str, answer: str) -> None:
        """Add a turn to a session, keeping only the last ``history_turns``."""
        keep = self.settings.history_turns
        if keep <= 0:
            return
        key = session_key(session)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, json.dumps({"question": question, "answer": answer}))
        pipe.ltrim(key, -keep, -1)
        pipe.expire(key, self.settings.session_ttl_s)
        pipe.execute()


def queue_depths(settings: Settings, queues: tuple[str, ...]) -> dict[str, int]:
    """Messages waiting on each queue, summed over its Redis priority sub-queues (``gpu``, ``gpu:1``...)."""
    pipe = settings_client(settings).pipeline(transaction=False)
    for queue in queues:
        for suffix in [""] + [f":{p}" for p in range(1, PRIORITY_LEVELS)]:
            pipe.llen(f"{KEY_PREFIX}{queue}{suffix}")
    counts = pipe.execute()
    per_queue = PRIORITY_LEVELS
    return {q: int(sum(counts[i * per_queue:(i + 1) * per_queue])) for i, q in enumerate(queues)}


def broker_location(url: str) -> str:
    """host:port/db of a broker URL, without its password (the first host of a sentinel:// list)."""
    try:
        parts = urlsplit(url.split(";")[0])
        if parts.hostname:
            return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"
        return parts.path or url.split("://")[0]
    except ValueError:
        return "(unparsable URL)"


def unavailable(settings: Settings, exc: Exception) -> BrokerUnavailable:
    """A ``BrokerUnavailable`` naming the broker without its password."""
    return BrokerUnavailable(f"cannot reach Redis at {broker_location(settings.broker_url)}: {exc}")
