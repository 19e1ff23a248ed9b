"""``glyphq serve``: an HTTP gateway that speaks OpenAI's chat completions API in front of the queue.

Endpoints: ``POST /v1/chat/completions`` (waits for the answer, or streams it as server-sent events while
the worker writes it),
``POST /v1/jobs`` + ``GET /v1/jobs/{id}`` (the same without waiting), ``GET /v1/models``, ``GET /health``
and ``GET /metrics``. Errors answer in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
Each API key is a tenant: it reads only the jobs it made (see ``producer.tenants``).
Producer side only: this process imports no torch. See docs/openai-api.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glyphq.celeryconfig import Settings
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer import chat
from glyphq.producer.errors import (
    BrokerEvicts,
    BrokerFull,
    BrokerUnavailable,
    GlyphqError,
    InvalidJob,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    QueueFull,
    RequestRefused,
)
from glyphq.producer.request_body import body_limit, read_json
from glyphq.producer.store import broker_error, check_broker, settings_client
from glyphq.producer.stream import Follower, StreamEvent, read
from glyphq.producer.submit import LOST_CHECK_S, Job
from glyphq.producer.tenants import Keys, body_digest, idempotent_job_id, served_name, submit_as
from glyphq.producer.validation import check_identifier

log = logging.getLogger(__name__)

JOB_HEADER = "X-Glyphq-Job-Id"
#: How long ``/health`` waits for Redis to answer PING.
HEALTH_TIMEOUT_S = 0.5
#: Seconds between SSE comments that keep a streamed answer's connection open while its job waits.
KEEPALIVE_S = 10.0
#: A streamed answer reads its job's stream this often, and looks whether the job ended this often.
STREAM_POLL_S, STREAM_READY_S = 0.05, 0.5
#: Polling a job for its result: each pause is ``POLL_SHARE`` of the time waited so far, within these
#: bounds, so a result is seen at most about 5% late (a 0.3 s job: 15 ms; a 10 s job: 250 ms).
POLL_MIN_S, POLL_MAX_S, POLL_SHARE = 0.005, 0.25, 0.05
#: Retry-After (seconds) of each refusal that a later try may not meet.
RETRY_AFTER = {QueueFull: "10", BrokerFull: "30", BrokerUnavailable: "5", JobLost: "5"}


def error_response(exc: GlyphqError) -> JSONResponse:
    """The HTTP answer to one of glyphq's errors, in OpenAI's error shape."""
    status, kind, code, param, extra = _describe(exc)
    headers = {"Retry-After": RETRY_AFTER[type(exc)]} if type(exc) in RETRY_AFTER else {}
    if isinstance(exc, RequestRefused) and status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 408:  # the rest of the body is never read: the connection cannot serve another request
        headers["Connection"] = "close"
    if "job_id" in extra:
        headers[JOB_HEADER] = extra["job_id"]
    return JSONResponse(chat.error_body(str(exc), kind, param, code, **extra), status_code=status, headers=headers)


def _describe(exc: GlyphqError) -> tuple[int, str, str | None, str | None, dict[str, Any]]:
    """(status, type, code, param, extra fields) of an error."""
    if isinstance(exc, RequestRefused):
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return exc.status, kind, exc.code, exc.param, {}
    if isinstance(exc, InvalidJob):
        return 400, "invalid_request_error", None, exc.field, {}
    if isinstance(exc, QueueFull):
        return 429, "rate_limit_error", "queue_full", None, {}
    if isinstance(exc, (BrokerFull, BrokerUnavailable, BrokerEvicts, JobLost)):
        code = {BrokerFull: "broker_full", BrokerUnavailable: "broker_unavailable",
                BrokerEvicts: "broker_evicts"}.get(type(exc), "job_lost")
        return 503, "server_error", code, None, {}
    if isinstance(exc, (JobTimeout, JobExpired)):
        code = "timeout" if isinstance(exc, JobTimeout) else "deadline_expired"
        job_id = getattr(exc, "job_id", None)
        return 504, "server_error", code, None, {"job_id": job_id} if job_id else {}
    if isinstance(exc, JobFailed):
        if exc.error_type == "InvalidJob":
            return 400, "invalid_request_error", exc.error_type, None, {"job_id": exc.job_id}
        return 500, "server_error", exc.error_type, None, {"job_id": exc.job_id}
    return 500, "server_error", type(exc).__name__, None, {}


async def wait_result(job: Job, timeout: float) -> dict[str, Any]:
    """The job's result once it is ready, polling without holding a thread; ``JobTimeout`` past ``timeout``."""
    start = checked = time.monotonic()
    deadline = start + timeout
    while not await run_in_threadpool(job.ready):
        now = time.monotonic()
        if now >= deadline:
            raise _timeout(job, timeout)
        if now - checked > LOST_CHECK_S:
            checked = now
            if await run_in_threadpool(lambda: job.state) == "UNKNOWN":
                raise JobLost(f"job {job.id}: Redis holds no record of it (lost with Redis's data); submit it again")
        await asyncio.sleep(min(POLL_MAX_S, max(POLL_MIN_S, POLL_SHARE * (now - start))))
    return await run_in_threadpool(_ready_result, job)


#: Celery's Redis result consumer keeps one pub/sub connection per process, which is not meant to be
#: driven from several threads at once; reading a result that is already stored takes a moment.
_RESULT_LOCK = threading.Lock()


def _ready_result(job: Job) -> dict[str, Any]:
    with _RESULT_LOCK:
        try:
            return job.result(timeout=10.0)
        except JobExpired as exc:
            exc.job_id = job.id  # type: ignore[attr-defined]  # the 504 names the job
            raise


def _timeout(job: Job, timeout: float) -> JobTimeout:
    exc = JobTimeout(f"job {job.id} not finished after {timeout:g} s; it keeps its place in the queue: "
                     f"GET /v1/jobs/{job.id} fetches its result later")
    exc.job_id = job.id  # type: ignore[attr-defined]
    return exc


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_answer(job: Job, request: chat.ChatRequest, cfg: Settings, timeout: float) -> AsyncIterator[str]:
    """The SSE stream of an answer as it is written: role, then reasoning and content deltas as the worker
    publishes them, then the finish chunk, usage (if asked) and ``[DONE]``.

    The job is queued by now; a failure after the first chunk is sent as an ``error`` event. A client
    that leaves does not stop the job: it runs to its end and its result is stored (docs/openai-api.md).
    """
    created = int(time.time())
    model = request.model or cfg.served_model_names[0]

    def piece(delta: dict[str, Any] | None, finish_reason: str | None = None) -> str:
        return _sse(chat.chunk(job.id, created, model, delta, finish_reason, request.include_usage))

    yield piece({"role": "assistant", "content": ""})
    try:
        async for event in follow(job, cfg, timeout):
            if event is None:
                yield ": waiting for the worker\n\n"
            elif event.result is None:
                yield piece(chat.delta(event.kind, event.text))
            else:
                for closing in chat.closing_chunks(event.result, job.id, created, request.include_usage, model):
                    yield _sse(closing)
    except GlyphqError as exc:
        status, kind, code, param, extra = _describe(exc)
        yield _sse(chat.error_body(str(exc), kind, param, code, status=status, **extra))
        return
    yield "data: [DONE]\n\n"


async def follow(job: Job, cfg: Settings, timeout: float) -> AsyncIterator[StreamEvent | None]:
    """The job's ``StreamEvent`` objects as ``Job.stream`` gives them, without holding a thread between two
    reads, and None after each ``KEEPALIVE_S`` without one; ``JobTimeout`` past ``timeout``."""
    follower = Follower()
    client = settings_client(cfg)
    start = checked = looked = quiet = time.monotonic()
    while not follower.ended:
        try:
            events = follower.take(await run_in_threadpool(read, client, job.id, follower.last_id))
        except redis.RedisError as exc:
            raise broker_error(cfg, exc) from exc
        for event in events:
            yield event
        now = time.monotonic()
        if events:
            quiet = now
        elif now - quiet >= KEEPALIVE_S:
            quiet = now
            yield None
        if now - looked >= STREAM_READY_S:  # a job that publishes nothing, or whose stream expired
            looked = now
            if await run_in_threadpool(job.ready):
                break
        if now - start >= timeout:
            raise _timeout(job, timeout)
        if now - checked > LOST_CHECK_S:
            checked = now
            if await run_in_threadpool(lambda: job.state) == "UNKNOWN":
                raise JobLost(f"job {job.id}: Redis holds no record of it (lost with Redis's data); submit it again")
        await asyncio.sleep(STREAM_POLL_S)
    for event in follower.settle(await run_in_threadpool(_ready_result, job)):
        yield event


class Metrics:
    """The gateway's own Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("glyphq_gateway_requests_total", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("glyphq_gateway_request_seconds", "Seconds from request to response headers",
                                 ["route"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.waiting = Gauge("glyphq_gateway_waiting", "Requests waiting for their job's answer",
                             registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return str(getattr(route, "path", "other"))


@dataclass(frozen=True)
class _Context:
    """What every handler of one app reads: its settings, keys, metrics and body limit."""

    cfg: Settings
    keys: Keys
    metrics: Metrics
    limit: int


def _context(request: Request) -> _Context:
    return request.app.state.glyphq  # type: ignore[no-any-return]


async def _count(request: Request, call_next: Any) -> Response:
    start = time.perf_counter()
    response: Response = await call_next(request)
    metrics, route = _context(request).metrics, _route(request)
    metrics.requests.labels(route, str(response.status_code)).inc()
    metrics.seconds.labels(route).observe(time.perf_counter() - start)
    return response


async def _glyphq_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GlyphqError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(chat.error_body(str(exc.detail), "invalid_request_error", None, code),
                        status_code=exc.status_code)


def _authorized(request: Request) -> _Context:
    ctx = _context(request)
    ctx.keys.tenant(request.headers.get("authorization"))
    return ctx


def _tenant(request: Request) -> str:
    return _context(request).keys.tenant(request.headers.get("authorization"))


async def _queue(request: Request, streamable: bool) -> tuple[Job, chat.ChatRequest]:
    """Check the key and the body, then submit the job; raises what refuses it."""
    tenant = _tenant(request)
    ctx = _context(request)
    cfg = ctx.cfg
    body = await read_json(request, ctx.limit, cfg.gateway_body_timeout_s)
    requested = body.get("model") if isinstance(body, dict) else None
    model = chat.served_model(requested, cfg)
    if model is None:
        raise RequestRefused(404, chat.not_served(requested, cfg), "model_not_found", "model")
    parsed = replace(await run_in_threadpool(chat.parse_request, body, cfg), model=model)
    if parsed.stream and not streamable:
        raise InvalidJob("stream", "is not allowed here: GET /v1/jobs/{id} gives the result")
    # Celery retries a send to an unreachable Redis for seconds; a PING first answers 503 at once.
    await run_in_threadpool(check_broker, cfg, HEALTH_TIMEOUT_S)
    idempotent_id = idempotent_job_id(tenant, request.headers.get("idempotency-key"))
    # Only a retry can meet its job again, so only an idempotent job needs its body's hash.
    digest = await run_in_threadpool(body_digest, body) if idempotent_id else ""
    try:
        job = await run_in_threadpool(submit_as, tenant, idempotent_id or uuid.uuid4().hex, digest, parsed, cfg)
    except InvalidJob as exc:
        if exc.field != "image":
            raise
        raise InvalidJob(parsed.image_param, exc.problem) from None  # named as the request's other errors are
    return job, parsed


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``: the completion once answered, or its SSE stream."""
    job, parsed = await _queue(request, streamable=True)
    ctx = _context(request)
    limit = ctx.cfg.gateway_timeout_s
    timeout = min(float(parsed.timeout or limit), limit)
    headers = {JOB_HEADER: job.id, "X-Request-Id": job.id}
    if parsed.stream:
        return StreamingResponse(stream_answer(job, parsed, ctx.cfg, timeout), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    ctx.metrics.waiting.inc()
    try:
        result = await wait_result(job, timeout)
    finally:
        ctx.metrics.waiting.dec()
    return JSONResponse(chat.completion(result, job.id, parsed.model or ctx.cfg.served_model_names[0]),
                        headers=headers)


async def create_job(request: Request) -> JSONResponse:
    """``POST /v1/jobs``: queue the request, answer 202 at once."""
    job, _ = await _queue(request, streamable=False)
    return JSONResponse({"id": job.id, "object": "glyphq.job", "state": "PENDING"}, status_code=202,
                        headers={JOB_HEADER: job.id})


async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: a job the request's key made."""
    tenant = _tenant(request)
    return await run_in_threadpool(job_status, job_id, _context(request).cfg, tenant)


async def models(request: Request) -> dict[str, Any]:
    """``GET /v1/models``: the names the gateway answers to (``GLYPHQ_SERVED_MODEL_NAME``)."""
    names = _authorized(request).cfg.served_model_names
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "glyphq"}
                                       for name in names]}


async def health(request: Request) -> JSONResponse:
    """``GET /health``: 200 while Redis answers PING. It needs no key; without a valid key it says only ok or
    unavailable (no model, host or error text)."""
    ctx = _context(request)
    detailed = ctx.keys.admits(request.headers.get("authorization"))
    try:
        await run_in_threadpool(check_broker, ctx.cfg, HEALTH_TIMEOUT_S)
    except BrokerUnavailable as exc:
        return JSONResponse({"status": "unavailable", **({"error": str(exc)} if detailed else {})}, status_code=503)
    return JSONResponse({"status": "ok", **({"model": ctx.cfg.served_model_names[0]} if detailed else {})})


async def metrics_text(request: Request) -> Response:
    """``GET /metrics``: the gateway's Prometheus metrics."""
    return Response(_authorized(request).metrics.render(), media_type="text/plain; version=0.0.4")


ROUTES = (("POST", "/v1/chat/completions", chat_completions), ("POST", "/v1/jobs", create_job),
          ("GET", "/v1/jobs/{job_id}", get_job), ("GET", "/v1/models", models), ("GET", "/health", health),
          ("GET", "/metrics", metrics_text))


def create_app(cfg: Settings | None = None) -> FastAPI:
    """The gateway's FastAPI app, reading ``cfg`` (default: the environment's settings)."""
    cfg = cfg or default_settings
    app = FastAPI(title="glyphq", summary="OpenAI chat completions answered by glyphq's queue of VLM workers.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.glyphq = _Context(cfg, Keys(cfg.api_keys), Metrics(), body_limit(cfg))
    app.middleware("http")(_count)
    app.add_exception_handler(GlyphqError, _glyphq_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


def job_status(job_id: str, cfg: Settings, tenant: str) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: the state, with the completion once it succeeded or the error once it failed.

    Only ``tenant``'s own jobs are found: another key's job, and a job that no key made (a producer's or a
    batch's), are a 404 like an unknown id.
    """
    try:
        check_identifier("job_id", job_id)
    except InvalidJob:
        raise RequestRefused(404, f"no job {job_id[:200]!r}", code="not_found") from None
    missing = RequestRefused(404, f"no job {job_id!r} of this API key (never submitted through the gateway with "
                                  "it, expired, or lost with Redis's data)", code="not_found")
    model = served_name(cfg, job_id, tenant)
    if model is None:
        raise missing
    job = Job(job_id, cfg)
    state = job.state
    if state == "UNKNOWN":
        raise missing
    body: dict[str, Any] = {"id": job_id, "object": "glyphq.job", "state": state}
    if state in ("SUCCESS", "FAILURE", "EXPIRED", "REVOKED"):
        try:
            body["completion"] = chat.completion(_ready_result(job), job_id, model)
        except (JobFailed, JobExpired) as exc:
            status, kind, code, param, _ = _describe(exc)
            body["error"] = chat.error_body(str(exc), kind, param, code, status=status)["error"]
    return body


def check_bind(host: str, cfg: Settings) -> None:
    """Refuse to listen beyond localhost without API keys, unless ``GLYPHQ_GATEWAY_ALLOW_NO_KEYS=on``."""
    if cfg.api_keys or cfg.gateway_allow_no_keys == "on" or host in ("127.0.0.1", "localhost", "::1"):
        return
    from glyphq.producer.errors import ServeUsageError

    raise ServeUsageError(f"refusing to listen on {host} without API keys: set GLYPHQ_API_KEYS, or "
                          "GLYPHQ_GATEWAY_ALLOW_NO_KEYS=on behind a proxy that authenticates")


def serve(host: str | None = None, port: int | None = None, cfg: Settings | None = None) -> None:
    """Run the gateway under uvicorn until it is stopped (``glyphq serve``)."""
    import uvicorn

    from glyphq.tasks.private import header_deadline_protocol

    cfg = cfg or default_settings
    host = host or cfg.gateway_host
    check_bind(host, cfg)
    log.info("glyphq gateway on %s:%d, model %s, %s", host, port or cfg.gateway_port, cfg.model,
             "API keys required" if cfg.api_keys else "no API keys")
    uvicorn.run(create_app(cfg), host=host, port=port or cfg.gateway_port, log_level="info", access_log=False,
                http=header_deadline_protocol(cfg.gateway_header_timeout_s),
                timeout_keep_alive=cfg.gateway_keep_alive_s, limit_concurrency=cfg.gateway_max_concurrency)
