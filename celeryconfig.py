"""Every glyphq setting, read once from ``GLYPHQ_*`` environment variables.

Celery loads this module by name (``app.config_from_object("glyphq.celeryconfig")``), so the lower-case names
at the bottom are Celery settings. ``settings`` is the typed object the producer and the worker read.
Nothing else in the project reads ``os.environ``. Standard library only: a web backend imports this
without torch.

The root of glyphq's exceptions, ``GlyphqError``, is defined here, so that a bad setting raises a
``GlyphqError`` too (``producer.errors`` holds the rest of the tree and exports both). A bad setting
found while this module is imported by the ``glyphq`` command or a ``celery`` command (a worker,
Flower) ends that process with one line naming the variable and its limit, and exit status 2, instead
of a traceback; any other importer gets the ``SettingsError``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

DAY_S = 24 * 3600
#: Exit status of the ``glyphq`` command and of a ``celery`` command that stop on a bad setting; the
#: CLI's "refused (bad input)".
EXIT_BAD_SETTING = 2


class GlyphqError(Exception):
    """Raised for any glyphq failure; catch this to catch them all."""


class SettingsError(GlyphqError, ValueError):
    """Raised when a ``GLYPHQ_*`` environment variable has a value glyphq cannot use; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={value}: must be at most {maximum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if not minimum <= value <= maximum:
        raise SettingsError(f"{name}={value}: must be from {minimum} to {maximum}")
    return value


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    return default if raw is None or raw.strip() == "" else raw.strip()


def _auto_int(env: Mapping[str, str], name: str, default: int) -> int:
    """A count of at least 0, or ``auto`` (-1)."""
    if _str(env, name, "").lower() == "auto":
        return -1
    return _int(env, name, default)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(env, name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """``GLYPHQ_API_KEYS``: comma-separated bearer tokens the gateway accepts; each at least 16 characters."""
    keys = tuple(k.strip() for k in env.get("GLYPHQ_API_KEYS", "").split(",") if k.strip())
    short = [k for k in keys if len(k) < 16]
    if short:
        raise SettingsError(f"GLYPHQ_API_KEYS: {len(short)} key(s) shorter than 16 characters; use long random keys")
    return keys


def default_served_name(model: str) -> str:
    """The name the gateway answers to by default: the last part of ``GLYPHQ_MODEL``, lower-case
    (``zai-org/Glyph`` -> ``glyph``, as Glyph's own scripts call it; a local path gives its folder's name)."""
    return model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower() or "model"


def _served_model_names(env: Mapping[str, str], model: str) -> tuple[str, ...]:
    """``GLYPHQ_SERVED_MODEL_NAME``: comma-separated model names the gateway answers to, the first one the main."""
    names = tuple(n.strip() for n in env.get("GLYPHQ_SERVED_MODEL_NAME", "").split(",") if n.strip())
    return names or (default_served_name(model),)


def _broker_url(env: Mapping[str, str], name: str, default: str) -> str:
    """A Redis URL setting; one without a scheme (``127.0.0.1:6379``) is refused, naming the variable."""
    url = _str(env, name, default)
    if "://" not in url:
        raise SettingsError(f"{name}={url!r}: expected a Redis URL with its scheme, such as "
                            "redis://127.0.0.1:6379/0 (or rediss://, unix://, sentinel://)")
    return url


def parse_box(text: str, name: str = "GLYPHQ_MAX_IMAGE_SIZE") -> tuple[int, int]:
    """Parse ``"1280x720"`` into ``(1280, 720)``."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise SettingsError(f"{name}={text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if width < 1 or height < 1:
        raise SettingsError(f"{name}={text!r}: both sides must be at least 1 pixel")
    return width, height


#: Vision tokens of one A4 page rendered at Glyph's 72 dpi (630 on GLM-4.1V), with its image tags and
#: some room: what ``GLYPHQ_DECODE_MAX_TOKENS`` (the most tokens of one job) counts per page of ``GLYPHQ_MAX_PAGES``.
A4_PAGE_TOKENS = 640
#: Room in a GPU job's message for everything but its question and history: ids, keys, sizes, options.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
#: The most bytes one character of a question or history takes in the handed-over JSON: a control
#: character is written as a ``\u0001`` escape (any other takes 4 UTF-8 bytes at most).
MESSAGE_BYTES_PER_CHAR = 6
#: Room in a job's tokens for the chat template, the question and up to three earlier turns.
PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class Settings:
    """glyphq's settings. Build with :meth:`from_env`; every field has a default."""

    broker_url: str = "redis://localhost:6379/0"
    result_backend: str = "redis://localhost:6379/0"
    sentinel_master: str = ""
    sentinel_password: str = ""
    model: str = "zai-org/Glyph"
    served_model_names: tuple[str, ...] = ("glyph",)
    device: str = "auto"
    max_image_size: tuple[int, int] = (1280, 720)
    max_tasks_per_child: int = 1000
    recycle_overlap_s: int = 30
    max_batch: int = 64
    decode: str = "auto"
    decode_max_tokens: int = 40 * A4_PAGE_TOKENS + PROMPT_TOKENS + 8192  # max_pages pages + prompt + new tokens
    kv_cache_tokens: int = 0  # 0: auto (worker.paged: a fixed count on the CPU, the card's free memory on CUDA)
    gpu_memory_utilization: float = 0.9
    prefill_chunk: int = 0  # 0: auto (worker.paged.prefill_chunk_for: by the card's memory)
    decode_compile: str = "on"
    prefix_cache: str = "on"  # keep the KV blocks of prompts' full blocks for later rows with the same start
    encoder_cache_mb: int = -1  # -1: auto (worker.budget.encoder_cache_bytes); 0: off
    compile_cache_dir: str = ""
    max_memory_per_child_mb: int = 16384
    gpu_guard_mb: int = 0
    history_turns: int = 3
    max_history_chars: int = 16_000
    # 8,192 new tokens at the longest step measured on an H200 (batch 16 over the earlier static cache,
    # 15.8 ms) take 130 s, plus the prompt pass of 16 documents of 40 pages (about 2 s each).
    soft_time_limit_s: int = 300
    time_limit_s: int = 360
    visibility_timeout_s: int = 1020
    model_load_timeout_s: int = 600
    max_deliveries: int = 3
    result_expires_s: int = 7 * DAY_S
    blob_ttl_s: int = 7 * DAY_S
    session_ttl_s: int = DAY_S
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_aspect_ratio: int = 200
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
    max_question_chars: int = 2000
    # Largest GPU job message the worker hands to its child (UTF-8 JSON): a job within every other
    # limit is far below it (2,000 + 16,000 characters of at most 4 bytes each, plus keys and sizes).
    max_message_bytes: int = 1024 * 1024
    max_document_chars: int = 1_000_000
    max_pages: int = 40
    render_config: str = ""
    # Glyph's README and scripts run it with up to 8,192 new tokens: room to reason, then answer.
    default_max_new_tokens: int = 8192
    max_new_tokens_limit: int = 8192
    # Reasoning stops here, leaving 2,048 of the default 8,192 new tokens for the answer.
    thinking_budget: int = 6144
    # Glyph's own setting (scripts/vlm_inference.py); near-greedy decoding loops without one.
    repetition_penalty: float = 1.1
    default_priority: int = 5
    max_queue: int = 100_000
    redis_reserve_pct: int = 10
    allow_eviction: str = "off"
    metrics_port: int = 9808
    metrics_host: str = "127.0.0.1"  # /metrics has no login: localhost unless widened on purpose
    metrics_dir: str = ""
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: kept out of logs
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_timeout_s: int = 600
    gateway_allow_no_keys: str = "off"
    gateway_header_timeout_s: int = 10
    gateway_body_timeout_s: int = 60
    gateway_keep_alive_s: int = 5
    gateway_max_concurrency: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``GLYPHQ_*`` variable from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        broker = _broker_url(env, "GLYPHQ_BROKER_URL", cls.broker_url)
        model = _str(env, "GLYPHQ_MODEL", cls.model)
        time_limit = _int(env, "GLYPHQ_TIME_LIMIT", cls.time_limit_s, minimum=1)
        soft_limit = _int(env, "GLYPHQ_SOFT_TIME_LIMIT", min(cls.soft_time_limit_s, time_limit), minimum=1)
        if soft_limit > time_limit:
            raise SettingsError(
                f"GLYPHQ_SOFT_TIME_LIMIT={soft_limit} must not exceed GLYPHQ_TIME_LIMIT={time_limit}"
            )
        # Redis redelivers any message unacked for this long, so it must outlast what an unacked job can
        # take or a long job runs twice (celery#5935). With batching a job may wait behind the batch that
        # is running and then run in its own, each up to the hard limit.
        max_batch = _int(env, "GLYPHQ_MAX_BATCH", cls.max_batch, minimum=1, maximum=256)
        batches = 2 if max_batch > 1 else 1
        visibility = _int(env, "GLYPHQ_VISIBILITY_TIMEOUT", batches * time_limit + 300, minimum=1)
        if visibility <= batches * time_limit:
            raise SettingsError(
                f"GLYPHQ_VISIBILITY_TIMEOUT={visibility} must be longer than GLYPHQ_TIME_LIMIT={time_limit}"
                + (f" times 2 (GLYPHQ_MAX_BATCH={max_batch}: a job may wait behind one batch, then run in its own)"
                   if batches == 2 else "")
            )
        max_new_limit = _int(env, "GLYPHQ_MAX_NEW_TOKENS_LIMIT", cls.max_new_tokens_limit, minimum=1)
        max_pages = _int(env, "GLYPHQ_MAX_PAGES", cls.max_pages, minimum=1)
        # Sized so that a document of max_pages A4 pages, its question and every new token fit the cache.
        decode_max_tokens = _int(env, "GLYPHQ_DECODE_MAX_TOKENS",
                                 max_pages * A4_PAGE_TOKENS + PROMPT_TOKENS + max_new_limit, minimum=16)
        sentinel_master = _str(env, "GLYPHQ_SENTINEL_MASTER", cls.sentinel_master)
        if broker.startswith("sentinel://") and not sentinel_master:
            raise SettingsError("GLYPHQ_BROKER_URL is a sentinel:// URL: set GLYPHQ_SENTINEL_MASTER to its master")
        formats = _str(env, "GLYPHQ_IMAGE_FORMATS", ",".join(cls.image_formats))
        max_question = _int(env, "GLYPHQ_MAX_QUESTION_CHARS", cls.max_question_chars, minimum=1)
        max_history = _int(env, "GLYPHQ_MAX_HISTORY_CHARS", cls.max_history_chars)
        needed = MESSAGE_BYTES_PER_CHAR * (max_question + max_history) + MESSAGE_OVERHEAD_BYTES
        max_message = _int(env, "GLYPHQ_MAX_MESSAGE_BYTES", max(cls.max_message_bytes, needed))
        if max_message < needed:
            raise SettingsError(f"GLYPHQ_MAX_MESSAGE_BYTES={max_message} must be at least {needed}: a job within "
                                f"GLYPHQ_MAX_QUESTION_CHARS and GLYPHQ_MAX_HISTORY_CHARS can be that large")
        return cls(
            broker_url=broker,
            result_backend=_broker_url(env, "GLYPHQ_RESULT_BACKEND", broker),
            sentinel_master=sentinel_master,
            sentinel_password=_str(env, "GLYPHQ_SENTINEL_PASSWORD", cls.sentinel_password),
            model=model,
            served_model_names=_served_model_names(env, model),
            device=_str(env, "GLYPHQ_DEVICE", cls.device),
            max_image_size=parse_box(_str(env, "GLYPHQ_MAX_IMAGE_SIZE", "1280x720")),
            max_tasks_per_child=_int(env, "GLYPHQ_MAX_TASKS_PER_CHILD", cls.max_tasks_per_child, minimum=1),
            recycle_overlap_s=_int(env, "GLYPHQ_RECYCLE_OVERLAP_S", cls.recycle_overlap_s, maximum=DAY_S),
            max_batch=max_batch,
            decode=_choice(env, "GLYPHQ_DECODE", cls.decode, ("auto", "static", "generate")),
            decode_max_tokens=decode_max_tokens,
            kv_cache_tokens=_int(env, "GLYPHQ_KV_CACHE_TOKENS", cls.kv_cache_tokens),
            gpu_memory_utilization=_float(env, "GLYPHQ_GPU_MEMORY_UTILIZATION", cls.gpu_memory_utilization, 0.05, 0.99),
            prefill_chunk=_int(env, "GLYPHQ_PREFILL_CHUNK", cls.prefill_chunk),
            decode_compile=_choice(env, "GLYPHQ_DECODE_COMPILE", cls.decode_compile, ("on", "off")),
            prefix_cache=_choice(env, "GLYPHQ_PREFIX_CACHE", cls.prefix_cache, ("on", "off")),
            encoder_cache_mb=_auto_int(env, "GLYPHQ_ENCODER_CACHE_MB", cls.encoder_cache_mb),
            compile_cache_dir=_str(env, "GLYPHQ_COMPILE_CACHE_DIR", cls.compile_cache_dir),
            max_memory_per_child_mb=_int(env, "GLYPHQ_MAX_MEMORY_PER_CHILD_MB", cls.max_memory_per_child_mb),
            gpu_guard_mb=_int(env, "GLYPHQ_GPU_GUARD_MB", cls.gpu_guard_mb),
            history_turns=_int(env, "GLYPHQ_HISTORY_TURNS", cls.history_turns),
            max_history_chars=max_history,
            soft_time_limit_s=soft_limit,
            time_limit_s=time_limit,
            visibility_timeout_s=visibility,
            model_load_timeout_s=_int(env, "GLYPHQ_MODEL_LOAD_TIMEOUT", cls.model_load_timeout_s, minimum=1),
            max_deliveries=_int(env, "GLYPHQ_MAX_DELIVERIES", cls.max_deliveries, minimum=1),
            result_expires_s=_int(env, "GLYPHQ_RESULT_EXPIRES", cls.result_expires_s, minimum=1),
            blob_ttl_s=_int(env, "GLYPHQ_BLOB_TTL", cls.blob_ttl_s, minimum=1),
            session_ttl_s=_int(env, "GLYPHQ_SESSION_TTL", cls.session_ttl_s, minimum=1),
            max_image_bytes=_int(env, "GLYPHQ_MAX_IMAGE_BYTES", cls.max_image_bytes, minimum=1),
            max_image_pixels=_int(env, "GLYPHQ_MAX_IMAGE_PIXELS", cls.max_image_pixels, minimum=1),
            max_aspect_ratio=_int(env, "GLYPHQ_MAX_ASPECT_RATIO", cls.max_aspect_ratio, minimum=1),
            image_formats=tuple(f.strip().upper() for f in formats.split(",") if f.strip()),
            max_question_chars=max_question,
            max_message_bytes=max_message,
            max_document_chars=_int(env, "GLYPHQ_MAX_DOCUMENT_CHARS", cls.max_document_chars, minimum=1),
            max_pages=max_pages,
            render_config=_str(env, "GLYPHQ_RENDER_CONFIG", cls.render_config),
            default_max_new_tokens=min(
                _int(env, "GLYPHQ_DEFAULT_MAX_NEW_TOKENS", cls.default_max_new_tokens, minimum=1),
                max_new_limit,
            ),
            max_new_tokens_limit=max_new_limit,
            thinking_budget=_int(env, "GLYPHQ_THINKING_BUDGET", cls.thinking_budget),
            repetition_penalty=_float(env, "GLYPHQ_REPETITION_PENALTY", cls.repetition_penalty, 1.0, 2.0),
            default_priority=_int(env, "GLYPHQ_DEFAULT_PRIORITY", cls.default_priority, maximum=9),
            max_queue=_int(env, "GLYPHQ_MAX_QUEUE", cls.max_queue),
            redis_reserve_pct=_int(env, "GLYPHQ_REDIS_RESERVE_PCT", cls.redis_reserve_pct, maximum=90),
            allow_eviction=_choice(env, "GLYPHQ_ALLOW_EVICTION", cls.allow_eviction, ("on", "off")),
            metrics_port=_int(env, "GLYPHQ_METRICS_PORT", cls.metrics_port, maximum=65535),
            metrics_host=_str(env, "GLYPHQ_METRICS_HOST", cls.metrics_host),
            metrics_dir=_str(env, "GLYPHQ_METRICS_DIR", cls.metrics_dir),
            api_keys=_api_keys(env),
            gateway_host=_str(env, "GLYPHQ_GATEWAY_HOST", cls.gateway_host),
            gateway_port=_int(env, "GLYPHQ_GATEWAY_PORT", cls.gateway_port, minimum=1, maximum=65535),
            gateway_timeout_s=_int(env, "GLYPHQ_GATEWAY_TIMEOUT", cls.gateway_timeout_s, minimum=1),
            gateway_allow_no_keys=_choice(env, "GLYPHQ_GATEWAY_ALLOW_NO_KEYS", cls.gateway_allow_no_keys,
                                          ("on", "off")),
            gateway_header_timeout_s=_int(env, "GLYPHQ_GATEWAY_HEADER_TIMEOUT", cls.gateway_header_timeout_s,
                                          minimum=1),
            gateway_body_timeout_s=_int(env, "GLYPHQ_GATEWAY_BODY_TIMEOUT", cls.gateway_body_timeout_s, minimum=1),
            gateway_keep_alive_s=_int(env, "GLYPHQ_GATEWAY_KEEP_ALIVE", cls.gateway_keep_alive_s, minimum=1),
            gateway_max_concurrency=_int(env, "GLYPHQ_GATEWAY_MAX_CONCURRENCY", cls.gateway_max_concurrency,
                                         minimum=1),
        )


def _started_as_a_command() -> bool:
    """True in the ``glyphq`` command and in ``celery`` commands (worker, Flower, inspect), which Celery's own
    command line module gives away; a web backend or a script imports neither."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "glyphq" or "celery.bin.celery" in sys.modules


def _settings_at_start() -> Settings:
    """``Settings.from_env()``; in a command, a bad setting ends the process with one line (see the docstring)."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        if not _started_as_a_command():
            raise
        if os.path.basename(sys.argv[0]) == "glyphq":  # every glyphq outcome is JSON on stdout
            print(json.dumps({"ok": False, "error_type": "SettingsError", "error": str(exc)}))
        print(f"glyphq: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_SETTING) from None


settings = _settings_at_start()

#: Every Redis key glyphq or Celery writes starts with this.
KEY_PREFIX = "glyphq:"
#: The queue of the GPU workers (image and page jobs), and the CPU queue that renders documents into pages.
GPU_QUEUE = "gpu"
RENDER_QUEUE = "render"
#: A GPU queue: ``gpu``, or ``gpu.<name>`` that one worker consumes beside ``gpu`` (``-Q gpu,gpu.<name>``),
#: so that a producer can send related jobs to that worker (docs/scaling.md).
GPU_QUEUE_PATTERN = re.compile(r"gpu(\.[a-z0-9_-]{1,64})?")


def is_gpu_queue(name: object) -> bool:
    """True for ``gpu`` and ``gpu.<name>`` (name: 1 to 64 of ``a-z 0-9 _ -``), the queues GPU workers serve."""
    return isinstance(name, str) and GPU_QUEUE_PATTERN.fullmatch(name) is not None


#: Task names: an image job, a document's pages (after rendering), and the render step.
ANSWER_TASK = "glyphq.answer"
ANSWER_PAGES_TASK = "glyphq.answer_pages"
RENDER_TASK = "glyphq.render"
#: Priorities as glyphq users see them: 0 (lowest) .. 9 (most urgent).
PRIORITY_LEVELS = 10

# ---- Celery settings (lower-case names are read by Celery) -------------------------------------

broker_url = settings.broker_url
result_backend = settings.result_backend

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]  # pickle is refused, from the broker and the result backend alike
result_accept_content = ["json"]

task_default_queue = GPU_QUEUE
task_routes = {
    ANSWER_TASK: {"queue": GPU_QUEUE},
    ANSWER_PAGES_TASK: {"queue": GPU_QUEUE},
    RENDER_TASK: {"queue": RENDER_QUEUE},  # served by `celery -A glyphq.tasks worker -Q render -c <cores>`
}
# Redis pops the lowest number first: glyphq priority p is sent as 9 - p (see producer.submit).
task_default_priority = PRIORITY_LEVELS - 1 - settings.default_priority

# A job is acknowledged only after it finished; a child that dies mid-job puts it back on the queue.
task_acks_late = True
task_reject_on_worker_lost = True
worker_deduplicate_successful_tasks = True

# Render workers run Celery's prefork pool. A GPU worker runs the solo pool whatever this says: glyphq
# starts, watches and replaces its engine child itself (tasks.engine_process, tasks.private point 3), and
# counts GLYPHQ_MAX_TASKS_PER_CHILD, GLYPHQ_MAX_MEMORY_PER_CHILD_MB and GLYPHQ_MODEL_LOAD_TIMEOUT there.
worker_pool = "prefork"
# Celery's consumer, guarded against a message for an unknown task without an id (``tasks.private``).
worker_consumer = "glyphq.tasks.private:GuardedConsumer"
worker_concurrency = 1
worker_prefetch_multiplier = 1
# For a render worker's prefork children.
worker_max_tasks_per_child = settings.max_tasks_per_child
worker_max_memory_per_child = (settings.max_memory_per_child_mb or 2**40) * 1024
worker_proc_alive_timeout = settings.model_load_timeout_s

task_soft_time_limit = settings.soft_time_limit_s
task_time_limit = settings.time_limit_s

_redis_options: dict[str, object] = {
    "global_keyprefix": KEY_PREFIX,
    "visibility_timeout": settings.visibility_timeout_s,
}
if settings.sentinel_master:  # GLYPHQ_BROKER_URL="sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0"
    _redis_options["master_name"] = settings.sentinel_master
    if settings.sentinel_password:
        _redis_options["sentinel_kwargs"] = {"password": settings.sentinel_password}
broker_transport_options = {
    **_redis_options,
    "queue_order_strategy": "priority",
    "priority_steps": list(range(PRIORITY_LEVELS)),
    "sep": ":",
    # Look for messages whose visibility timeout has passed every 5 s (kombu's default is about every
    # 100 s), so a job lost with its worker comes back soon after GLYPHQ_VISIBILITY_TIMEOUT.
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
}
result_backend_transport_options = dict(_redis_options)
visibility_timeout = settings.visibility_timeout_s

result_expires = settings.result_expires_s
result_extended = True
# Retry result reads and writes through a short Redis outage (about 17 s in all) instead of failing
# at once. Without this, a job cancelled by a lost connection cannot record that it must run again,
# and after the reconnect Celery takes it as revoked and acknowledges it: the job would be lost.
result_backend_always_retry = True
result_backend_max_retries = 15
result_backend_max_sleep_between_retries_ms = 2000

worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

broker_connection_retry_on_startup = True
broker_connection_max_retries = None
# On a lost broker connection the unacked job goes back to the queue; stop running it here so it
# doesn't run twice (once here, once on redelivery).
worker_cancel_long_running_tasks_on_connection_loss = True
