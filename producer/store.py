"""glyphq's own Redis keys: image blobs, job-id claims, run counters, session history, session locks and text
streams.

Every key starts with ``glyphq:`` and carries a TTL, so none grows without bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from glyphq.celeryconfig import KEY_PREFIX, PRIORITY_LEVELS, Settings
from glyphq.producer.errors import (
    BlobCorrupt,
    BlobMissing,
    BrokerEvicts,
    BrokerFull,
    BrokerUnavailable,
    InvalidJob,
)

log = logging.getLogger(__name__)

CLAIM_TTL_S = 120

# Drop this job's reference to a blob; delete the blob when no queued job refers to it any more. A job
# that holds no reference deletes nothing, so a message cannot delete a blob that is not its own.
_RELEASE_BLOB = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then
  return 0
end
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

# Take a session's lock for a job if it is free, or held by this same job (started before by a child that
# died); return the id of the job that holds it then.
_LOCK_SESSION = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  return held
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""

# Release a session's lock only if this job holds it: a lock that expired and went to another turn stays.
_UNLOCK_SESSION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# Record a job's owner unless it has one; either way answer the record that was there before (nil: none).
_RECORD_OWNER = """
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""


_BLOB_KEY = re.compile(rf"^{KEY_PREFIX}blob:([0-9a-f]{{64}})$")


def blob_key(sha256: str) -> str:
    """Key of the image bytes with this content hash."""
    return f"{KEY_PREFIX}blob:{sha256}"


def is_blob_key(key: object) -> bool:
    """True if ``key`` has the exact form ``glyphq:blob:<64 hex digits>``."""
    return isinstance(key, str) and _BLOB_KEY.match(key) is not None


def blob_sha256(key: str) -> str:
    """The sha256 (hex) a ``glyphq:blob:<sha256>`` key names; ValueError for any other key."""
    match = _BLOB_KEY.match(key)
    if match is None:
        raise ValueError(f"not a blob key: {key!r}")
    return match.group(1)


def check_blob_key(field: str, key: object) -> str:
    """``key`` if it is a ``glyphq:blob:<sha256>`` key; the worker reads nothing else, never a path."""
    if not is_blob_key(key):
        raise InvalidJob(field, f"must be a {KEY_PREFIX}blob:<sha256> key, got {key!r}")
    return key  # type: ignore[return-value]


def _refs_key(image_key: str) -> str:
    return f"{image_key}:refs"


def job_key(job_id: str) -> str:
    """Key that claims a job id, so the same id is enqueued once."""
    return f"{KEY_PREFIX}job:{job_id}"


def runs_key(job_id: str) -> str:
    """Key counting how many times a worker started this job."""
    return f"{KEY_PREFIX}runs:{job_id}"


def owner_key(job_id: str) -> str:
    """Key recording who made a job through the gateway (see ``Store.record_owner``)."""
    return f"{KEY_PREFIX}owner:{job_id}"


def session_key(session: str) -> str:
    """Key of a session's list of turns, oldest first."""
    return f"{KEY_PREFIX}session:{session}"


def session_lock_key(session: str) -> str:
    """Key naming the job whose turn of a session is running (``Store.lock_session``)."""
    return f"{KEY_PREFIX}session-lock:{session}"


def stream_key(job_id: str) -> str:
    """Key of the Redis stream of a job's text as it is written (``producer.stream``)."""
    return f"{KEY_PREFIX}stream:{job_id}"


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

    def record_owner(self, job_id: str, owner: str) -> str | None:
        """Record ``owner`` as the maker of ``job_id`` unless it has one: None if recorded now, else the record
        already there.

        The record lasts twice ``GLYPHQ_RESULT_EXPIRES``: a job's claim lasts that long from its submit, and its
        result that long from its end.
        """
        current = self.redis.eval(_RECORD_OWNER, 1, owner_key(job_id), owner, 2 * self.settings.result_expires_s)
        return current.decode() if isinstance(current, bytes) else None

    def owner(self, job_id: str) -> str | None:
        """The owner recorded for ``job_id``; None if no one recorded it (or the record expired)."""
        current = self.redis.get(owner_key(job_id))
        return current.decode() if isinstance(current, bytes) else None

    def forget_owner(self, job_id: str) -> None:
        """Forget the owner of a job that never reached the queue."""
        self.redis.delete(owner_key(job_id))

    def put_blob(self, data: bytes, job_id: str) -> str:
        """Store bytes under their content address for ``job_id``; return the key.

        The bytes are always written, never only their TTL renewed: bytes already under the key that do
        not match it are replaced, not kept alive. Equal bytes overwrite equal bytes, so concurrent
        producers of one blob cannot disagree.
        """
        key = blob_key(hashlib.sha256(data).hexdigest())
        ttl = self.settings.blob_ttl_s
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(key, data, ex=ttl)
        pipe.sadd(_refs_key(key), job_id)
        pipe.expire(_refs_key(key), ttl)
        pipe.execute()
        return key

    def require_blob(self, field: str, key: object, max_bytes: int) -> bytes:
        """The bytes under a blob key named by a message's ``field``, checked before use.

        Raises ``InvalidJob`` for a key that is not a blob key or bytes over ``max_bytes`` (read from
        ``STRLEN``, so they are never fetched), ``BlobMissing`` if they expired or never existed, and
        ``BlobCorrupt`` if they do not hash to the key, after deleting them so the next submit stores
        good bytes.
        """
        key = check_blob_key(field, key)
        size = int(self.redis.strlen(key))
        if size > max_bytes:
            raise InvalidJob(field, f"blob {key} is {size} bytes; the limit is {max_bytes}")
        data = self.redis.get(key)
        if not isinstance(data, bytes):
            raise BlobMissing(f"blob {key} is gone (expired after GLYPHQ_BLOB_TTL?)")
        if hashlib.sha256(data).hexdigest() != blob_sha256(key):
            self.redis.delete(key)
            raise BlobCorrupt(f"blob {key} holds bytes whose sha256 is not its key's; deleted it, submit again")
        return data

    def release_blob(self, key: str, job_id: str) -> bool:
        """Drop ``job_id``'s reference to a blob; True if the blob itself was deleted.

        Only a ``glyphq:blob:<sha256>`` key that ``job_id`` holds is touched; any other key is left alone.
        """
        if not is_blob_key(key):
            log.warning("not releasing %r for job %s: not a blob key", key, job_id)
            return False
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
        turns = [_turn(raw) for raw in self.redis.lrange(session_key(session), -limit, -1)]
        if None in turns:
            log.warning("session %s holds turns that are not glyphq's; leaving them out", session)
        return [turn for turn in turns if turn is not None]

    def lock_session(self, session: str, job_id: str, ttl_s: int) -> str:
        """Take the lock on a session's turns for ``job_id``, for ``ttl_s`` seconds, unless another job holds
        it; return the id of the job that holds it now (``job_id`` once taken).

        The lock's value is the job id, so a job delivered again after its child died takes its own
        lock back at once, and no other job can release it (``unlock_session``).
        """
        holder = self.redis.eval(_LOCK_SESSION, 1, session_lock_key(session), job_id, ttl_s)
        return holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)

    def unlock_session(self, session: str, job_id: str) -> bool:
        """Release the lock on a session's turns if ``job_id`` holds it; True if it did."""
        return bool(self.redis.eval(_UNLOCK_SESSION, 1, session_lock_key(session), job_id))

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


#: The longest question or answer a stored turn may bring into a prompt.
MAX_TURN_CHARS = 100_000


def _turn(raw: bytes | str) -> dict[str, str] | None:
    """A stored turn as ``{"question", "answer"}``, or None if the value is not one."""
    try:
        turn = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) and len(turn[k]) <= MAX_TURN_CHARS
                                           for k in ("question", "answer"))):
        return None
    return {"question": turn["question"], "answer": turn["answer"]}


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


def check_broker(settings: Settings, timeout: float) -> None:
    """Raise ``BrokerUnavailable`` unless Redis answers PING within about ``timeout`` seconds."""
    url = settings.broker_url
    try:
        probe = (redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
                 if not url.startswith("sentinel://") else settings_client(settings))
    except ValueError as exc:  # redis-py's word for a URL it cannot parse
        raise BrokerUnavailable(f"GLYPHQ_BROKER_URL is not a Redis URL ({exc})") from None
    try:
        probe.ping()
    except redis.RedisError as exc:
        raise unavailable(settings, exc) from exc
    finally:
        if probe is not settings_client(settings):
            probe.close()


def broker_error(settings: Settings, exc: BaseException) -> BrokerFull | BrokerUnavailable:
    """What a Redis or kombu error means to a caller: ``BrokerFull`` if Redis refused a write because it is
    at ``maxmemory``, else ``BrokerUnavailable``."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(cause):
            return BrokerFull(f"Redis at {broker_location(settings.broker_url)} is at its memory limit "
                              f"(maxmemory) and refuses writes; nothing was enqueued: {cause}")
        cause = cause.__cause__ or cause.__context__
    return unavailable(settings, exc if isinstance(exc, Exception) else Exception(str(exc)))


#: The only ``maxmemory-policy`` that never deletes a key by itself. Every glyphq key has a TTL, so the
#: ``volatile-*`` policies can evict blobs, id claims and results as surely as ``allkeys-*`` can.
SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class MemoryInfo:
    """Redis's memory use, limit (0: none) and eviction policy, from ``INFO memory``."""

    used: int
    limit: int
    policy: str

    @property
    def evicts(self) -> bool:
        """True if Redis may delete keys on its own when it is full."""
        return self.policy != SAFE_POLICY


def memory_info(client: redis.Redis) -> MemoryInfo | None:
    """Redis's memory figures, or None where ``INFO`` is not allowed (some managed services)."""
    try:
        info = client.info("memory")
    except redis.exceptions.ResponseError:  # NOPERM, or INFO renamed away
        return None
    return MemoryInfo(used=int(info.get("used_memory", 0)), limit=int(info.get("maxmemory", 0)),
                      policy=str(info.get("maxmemory_policy", "")))


def check_memory_room(settings: Settings) -> None:
    """Raise ``BrokerFull`` once Redis uses more than ``100 - GLYPHQ_REDIS_RESERVE_PCT`` percent of its
    ``maxmemory``: the rest is kept for the workers, which need to write results and acks to drain.

    Raise ``BrokerEvicts`` when its ``maxmemory-policy`` may evict keys (unless ``GLYPHQ_ALLOW_EVICTION=on``):
    no worker starts on such a Redis, so a job would wait forever. Both come from the one ``INFO memory``
    reply read for every submit, so the policy check costs no extra round trip.
    """
    info = memory_info(settings_client(settings))
    if info is not None and info.evicts and settings.allow_eviction != "on":
        raise BrokerEvicts(
            f"Redis at {broker_location(settings.broker_url)} has maxmemory-policy {info.policy}: it may delete "
            f"queued jobs and images when full, so workers refuse to start on it and nothing was enqueued. "
            f"Set maxmemory-policy {SAFE_POLICY}, or GLYPHQ_ALLOW_EVICTION=on to run anyway")
    if info is None or not info.limit or not settings.redis_reserve_pct:
        return
    ceiling = info.limit * (100 - settings.redis_reserve_pct) // 100
    if info.used > ceiling:
        raise BrokerFull(
            f"Redis at {broker_location(settings.broker_url)} uses {info.used} of its {info.limit} bytes "
            f"(maxmemory); new jobs stop at {100 - settings.redis_reserve_pct}% so workers can drain the queue "
            f"(GLYPHQ_REDIS_RESERVE_PCT={settings.redis_reserve_pct}); nothing was enqueued")
