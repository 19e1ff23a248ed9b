"""The gateway's tenants: each API key reads only the jobs it made, and owns its ``Idempotency-Key``s.

A job made through the gateway records its maker (the hash of the key) and, for an idempotent job, the
hash of its body, in ``glyphq:owner:<job id>`` (``Store.record_owner``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import redis

from glyphq.celeryconfig import Settings
from glyphq.producer import chat
from glyphq.producer.errors import RequestRefused
from glyphq.producer.store import Store, broker_error
from glyphq.producer.submit import Job, submit

log = logging.getLogger(__name__)

#: The tenant of every request to a gateway without API keys: its callers are one tenant.
NO_KEY_TENANT = "no-key"


class Keys:
    """The API keys of ``GLYPHQ_API_KEYS``, compared in constant time. Each key is a tenant."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def tenant(self, authorization: str | None) -> str:
        """The tenant of a request: the SHA-256 (hex) of its key, or ``NO_KEY_TENANT`` on a gateway without
        keys. Raises ``RequestRefused`` (401) unless ``authorization`` is ``Bearer <one of the keys>``."""
        if not self._keys:
            return NO_KEY_TENANT
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestRefused(401, "missing API key: send it as the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
        # Hashing first gives every comparison the same length; every key is compared, match or not.
        given = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise RequestRefused(401, "incorrect API key", code="invalid_api_key")
        return given.hex()

    def admits(self, authorization: str | None) -> bool:
        """True if ``authorization`` carries one of the keys, or the gateway has none."""
        try:
            self.tenant(authorization)
        except RequestRefused:
            return False
        return True


def body_digest(body: Any) -> str:
    """The SHA-256 (hex) of a request body's JSON value, whatever its key order and spacing."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotent_job_id(tenant: str, idempotency_key: str | None) -> str | None:
    """The job id of an ``Idempotency-Key`` within a tenant: a retried request re-attaches to its first job,
    and another key's header with the same text names another job."""
    if not idempotency_key:
        return None
    return "idem-" + hashlib.sha256(f"{tenant}\n{idempotency_key}".encode()).hexdigest()[:40]


def claim_job_id(cfg: Settings, job_id: str, tenant: str, digest: str, model: str = "") -> bool:
    """Record ``tenant`` as the maker of ``job_id`` from a body of hash ``digest`` that asked for the served
    model name ``model``. True if recorded now, False if the same tenant and body made it before (a retry);
    ``RequestRefused`` (409) if another body did."""
    owner = f"{tenant} {digest} {model}"
    try:
        current = Store(cfg).record_owner(job_id, owner)
    except redis.RedisError as exc:
        raise broker_error(cfg, exc) from exc
    if current is None:
        return True
    if current != owner:
        raise RequestRefused(409, "this Idempotency-Key was sent before with a different request body; a new "
                                  "request needs a new Idempotency-Key", code="idempotency_key_reused")
    return False


def submit_as(tenant: str, job_id: str, digest: str, parsed: chat.ChatRequest, cfg: Settings) -> Job:
    """Submit ``parsed`` as ``tenant``'s job ``job_id``. Its owner is recorded first, so that the job is never
    readable by another key; a job that is refused leaves no record behind."""
    recorded = claim_job_id(cfg, job_id, tenant, digest, parsed.model or "")
    try:
        # Each key's jobs share the worker's caches of pages read before with that key's jobs only, so that
        # no key can tell from a result's timings what another key asked about.
        return submit(parsed.image, parsed.question, job_id=job_id, stream=parsed.stream, settings=cfg,
                      cache_scope=tenant, **parsed.submit_kwargs())
    except BaseException:
        if recorded:
            try:
                Store(cfg).forget_owner(job_id)
            except redis.RedisError:
                log.warning("could not forget the owner of refused job %s; the record expires on its own", job_id)
        raise


def served_name(cfg: Settings, job_id: str, tenant: str) -> str | None:
    """The served model name ``tenant``'s job ``job_id`` asked for; None if ``tenant`` did not make it through
    the gateway (or its record has expired)."""
    try:
        owner = Store(cfg).owner(job_id)
    except redis.RedisError as exc:
        raise broker_error(cfg, exc) from exc
    if owner is None:
        return None
    maker, _, rest = owner.partition(" ")
    return (rest.partition(" ")[2] or cfg.served_model_names[0]) if maker == tenant else None
