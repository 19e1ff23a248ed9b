"""``submit()``: check a job, store its image as a blob, and enqueue a small message for the GPU worker."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from celery.exceptions import BackendError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from glyphq.celeryconfig import Settings
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer.errors import JobExpired, JobFailed, JobLost, JobTimeout, QueueFull
from glyphq.producer.images import ImageInput, check_image
from glyphq.producer.options import check_job_options
from glyphq.producer.schema import ANSWER_TASK, JobMessage
from glyphq.producer.store import Store, broker_error, check_memory_room, queue_depths
from glyphq.producer.stream import Follower, StreamEvent, read
from glyphq.producer.validation import check_history
from glyphq.tasks.app import app

log = logging.getLogger(__name__)


#: Every state ``Job.state`` returns (see README, "Job states").
JOB_STATES = ("PENDING", "STARTED", "SUCCESS", "FAILURE", "EXPIRED", "REVOKED", "UNKNOWN")
#: How often ``Job.result`` looks whether a job it waits for still exists.
LOST_CHECK_S = 5.0
#: How long ``Job.stream`` waits for new text before it looks whether the job has ended.
STREAM_WAIT_MS = 250


class Job:
    """A handle on a submitted job: its ``id``, its ``state`` and, once done, its ``result()``."""

    def __init__(self, job_id: str, settings: Settings | None = None) -> None:
        self.id = job_id
        self.settings = settings or default_settings
        self._async = AsyncResult(job_id, app=app)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def state(self) -> str:
        """One of ``JOB_STATES``: PENDING (queued), STARTED, SUCCESS, FAILURE, EXPIRED (its deadline passed
        before it started), REVOKED (an operator revoked it), or UNKNOWN: Redis holds no record of it
        (never submitted, expired, or lost with Redis's data); such a job never finishes."""
        try:
            state = str(self._async.state)
            if state == "REVOKED" and "expired" in str(self._async.result):
                return "EXPIRED"
            if state == "PENDING" and not Store(self.settings).job_exists(self.id):
                return "UNKNOWN"
        except (redis.RedisError, BackendError) as exc:
            raise broker_error(self.settings, exc) from exc
        return state if state in JOB_STATES else "STARTED"  # RETRY or a custom state: it is still running

    def ready(self) -> bool:
        """True once the job succeeded, failed or expired."""
        try:
            return bool(self._async.ready())
        except (redis.RedisError, BackendError) as exc:
            raise broker_error(self.settings, exc) from exc

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait up to ``timeout`` seconds (None: as long as the job exists) and return the result dict.

        Raises ``JobTimeout`` if it is not done in time, ``JobFailed`` if the worker failed it,
        ``JobExpired`` if its deadline passed first, and ``JobLost`` if Redis holds no record of it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LOST_CHECK_S if deadline is None else max(0.0, min(LOST_CHECK_S, deadline - time.monotonic()))
            try:
                value = self._async.get(timeout=wait, propagate=False)
                state, outcome = self._async.state, self._async.result
                break
            except CeleryTimeoutError:
                current = self.state
                if current == "UNKNOWN" or (deadline is not None and time.monotonic() >= deadline):
                    self._stop_listening()
                if current == "UNKNOWN":
                    raise JobLost(f"job {self.id}: Redis holds no record of it (never submitted, expired, or "
                                  "lost with Redis's data); it will not finish, submit it again") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeout(f"job {self.id} not finished after {timeout} s (state {current})") from None
            except (redis.RedisError, BackendError) as exc:
                raise broker_error(self.settings, exc) from exc
        if state == "REVOKED" and "expired" in str(outcome):
            raise JobExpired(f"job {self.id} did not start before its deadline; it never ran")
        if state in ("FAILURE", "REVOKED"):
            raise JobFailed(self.id, type(outcome).__name__, str(outcome))
        return value  # type: ignore[no-any-return]

    def stream(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Follow the job's text as it is written: ``StreamEvent`` objects of kind "reasoning" and "answer"
        with the new ``text``, then one of kind "result" with the ``result()`` dict, last.

        The text comes while the job decodes if it was submitted with ``stream=True``; else it all
        comes at the end. Put together, a kind's texts equal the result's ``reasoning`` or ``answer``.
        A job that fails raises as ``result()`` does, after the text it wrote; ``JobTimeout`` if it has
        not ended within ``timeout`` seconds (None: as long as it exists).
        """
        follower = Follower()
        client = Store(self.settings).redis
        start = checked = time.monotonic()
        while not follower.ended:
            try:
                entries = read(client, self.id, follower.last_id, block_ms=STREAM_WAIT_MS)
                yield from follower.take(entries)
                if not entries and self.ready():
                    break
            except redis.RedisError as exc:
                raise broker_error(self.settings, exc) from exc
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                raise JobTimeout(f"job {self.id} not finished after {timeout} s (state {self.state})")
            if now - checked >= LOST_CHECK_S:
                checked = now
                if self.state == "UNKNOWN":
                    raise JobLost(f"job {self.id}: Redis holds no record of it (never submitted, expired, or "
                                  "lost with Redis's data); it will not finish, submit it again")
        yield from follower.settle(self.result(timeout=LOST_CHECK_S))

    def _stop_listening(self) -> None:
        """Unsubscribe from the job's result now. Otherwise ``AsyncResult.__del__`` does it while Python
        shuts down, when redis-py can no longer connect, and prints a traceback at exit."""
        with contextlib.suppress(redis.RedisError, BackendError):
            self._async.backend.remove_pending_result(self._async)


def submit(
    image: ImageInput,
    question: str,
    *,
    max_new_tokens: int | None = None,
    thinking_budget: int | None = None,
    priority: int | None = None,
    session: str | None = None,
    job_id: str | None = None,
    deadline: float | None = None,
    history: list[dict[str, str]] | None = None,
    stream: bool = False,
    queue: str | None = None,
    cache_scope: str | None = None,
    settings: Settings | None = None,
) -> Job:
    """Enqueue an image + question job for the GPU worker and return its ``Job``.

    ``image`` is a path, encoded bytes or a PIL image. ``priority`` runs from 0 to 9 (9 most urgent).
    ``session`` makes the job a turn in a stored conversation. A reasoning model (Glyph) that has
    written ``thinking_budget`` new tokens without ending its reasoning is made to answer (0: no
    budget; default ``GLYPHQ_THINKING_BUDGET``). Submitting an existing ``job_id``
    again returns the same job without enqueuing it twice. A job not started within ``deadline``
    seconds never runs; its state becomes EXPIRED. ``history`` gives earlier turns with the job itself,
    as ``[{"question", "answer"}, ...]`` (at most ``GLYPHQ_HISTORY_TURNS``), instead of a stored session.
    With ``stream=True`` the worker publishes the text as it writes it, for ``Job.stream()``.
    ``queue`` sends the job to ``gpu.<name>`` instead of ``gpu``: only a worker started with
    ``-Q gpu,gpu.<name>`` takes it (docs/scaling.md, "One document, one worker").
    ``cache_scope`` (1-128 letters, digits and ``._:-``) keeps what the worker caches of this job's pages
    to jobs of the same scope, e.g. one per user: without one, any job with the same pages shares them,
    and its ``timings.prefix_cached_tokens`` would tell that another job read them recently
    (docs/documents.md). The gateway gives each API key its own.

    Every field is checked before Redis is touched; a refusal raises ``InvalidJob`` naming the
    field and the limit. ``QueueFull`` means the queue holds ``GLYPHQ_MAX_QUEUE`` jobs already and
    ``BrokerUnavailable`` that Redis could not be reached; either way nothing was queued.
    """
    cfg = settings or default_settings
    options = check_job_options(question, max_new_tokens=max_new_tokens, thinking_budget=thinking_budget,
                                priority=priority, session=session, job_id=job_id, deadline=deadline, settings=cfg,
                                queue=queue, cache_scope=cache_scope)
    turns = check_history(history, options.session, cfg)
    checked = check_image(image, cfg)

    def send(key: str) -> None:
        message = JobMessage(
            image_keys=(key,),
            image_sizes=((checked.width, checked.height),),
            image_bytes=len(checked.data),
            question=options.question,
            max_new_tokens=options.max_new_tokens,
            session=options.session,
            submitted_at=time.time(),
            thinking_budget=options.thinking_budget,
            history=turns,
            stream=bool(stream),
            cache_scope=options.cache_scope,
        )
        app.send_task(ANSWER_TASK, kwargs={"job": message.to_dict()}, task_id=options.job_id, queue=options.queue,
                      priority=options.celery_priority, kwargsrepr=message.summary(), expires=options.expires)

    return enqueue(cfg, options.queue, options.job_id, checked.data, send)


def enqueue(cfg: Settings, queue: str, job_id: str, data: bytes, send: Callable[[str], None]) -> Job:
    """Claim ``job_id``, store ``data`` as its blob, then ``send(blob_key)``; undo both if anything fails.

    A ``job_id`` that is already claimed returns its ``Job`` without storing or sending anything. A
    ``queue`` already holding ``max_queue`` jobs raises ``QueueFull``, a Redis near its memory limit
    ``BrokerFull`` (the check and the send are not atomic, so concurrent producers may overshoot the
    limits by a few jobs). Whatever fails after the claim, the claim and the blob are taken back, so a
    retry with the same id runs the job.
    """
    store = Store(cfg)
    try:
        if cfg.max_queue and queue_depths(cfg, (queue,))[queue] >= cfg.max_queue:
            raise QueueFull(f"queue {queue} holds {cfg.max_queue} or more jobs; the limit is {cfg.max_queue} "
                            "(GLYPHQ_MAX_QUEUE)")
        check_memory_room(cfg)
        if not store.claim_job(job_id):
            log.info("job %s already submitted; not enqueuing it again", job_id)
            return Job(job_id, cfg)
    except redis.RedisError as exc:
        raise broker_error(cfg, exc) from exc
    key: str | None = None
    try:
        key = store.put_blob(data, job_id)
        send(key)
    except BaseException as exc:  # an interrupt too: nothing may stay half-enqueued
        _undo(store, key, job_id)
        if isinstance(exc, (OperationalError, redis.RedisError)):
            raise broker_error(cfg, exc) from exc
        raise
    try:
        store.confirm_job(job_id)
    except redis.RedisError:  # the job is queued; only its guard against a second submit is shorter
        log.warning("job %s is queued but its id claim could not be extended", job_id)
    log.debug("enqueued job %s", job_id)
    return Job(job_id, cfg)


def _undo(store: Store, key: str | None, job_id: str) -> None:
    """Best effort: forget the blob and the claim of a job that never reached the queue.

    Both commands free memory, so Redis runs them even at its memory limit.
    """
    try:
        if key is not None:
            store.release_blob(key, job_id)
        store.unclaim_job(job_id)
    except redis.RedisError:
        log.warning("could not clean up after job %s; its keys expire on their own", job_id)
