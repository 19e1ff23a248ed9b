"""The ``glyphq`` command: thin commands over the producer library. Every command prints JSON (``--stream``:
JSON Lines of text as it comes, then the result).

Exit codes: 0 done, 1 the job failed (or expired), 2 refused (bad input, a bad GLYPHQ_* setting, a missing
extra), 3 not finished yet, 4 Redis unreachable (or evicting keys), 5 the queue is full, 6 Redis is full
(maxmemory), 7 no such job (never submitted, expired or lost with Redis's data; ``status`` and ``result``).
``health``: 0 healthy, 4 Redis unreachable, 1 any other failed check.
``check-model``: 0 the parser knows the model's format (or it has none), 1 it has reasoning tags the parser
does not recognise. ``batch``: 0 every line done, 1 some line failed, bad or unfinished, 2 usage error,
4 Redis unreachable, 8 the results file cannot be written (a full disk), 130 interrupted (rerun to resume).
``serve``: runs until stopped; 2 when it cannot start (beyond localhost without GLYPHQ_API_KEYS, no gateway extra).
The table per command is in docs/submitting.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import Any

from glyphq.celeryconfig import EXIT_BAD_SETTING, GPU_QUEUE, RENDER_QUEUE
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer.errors import (
    BatchUsageError,
    BrokerEvicts,
    BrokerFull,
    BrokerUnavailable,
    GlyphqError,
    InvalidJob,
    InvalidRenderConfig,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    MissingExtra,
    QueueFull,
    ServeUsageError,
    SettingsError,
)
from glyphq.producer.store import check_broker
from glyphq.producer.submit import Job, submit

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_NOT_READY, EXIT_UNAVAILABLE, EXIT_QUEUE_FULL = 0, 1, 2, 3, 4, 5
EXIT_BROKER_FULL, EXIT_NO_SUCH_JOB = 6, 7


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _error(command: str, exc: GlyphqError, **fields: Any) -> None:
    """Print an error in the documented shape: JSON on stdout (``ok: false`` and ``fields``), one line on stderr."""
    _print({"ok": False, "error_type": type(exc).__name__, "error": str(exc), **fields})
    print(f"glyphq {command}: {exc}", file=sys.stderr)


def _wait(job: Job, timeout: float | None, command: str, stream: bool = False) -> int:
    try:
        if stream:
            _print(_follow(job, timeout))
        else:
            _print(job.result(timeout=timeout))
        return EXIT_OK
    except JobFailed as exc:
        _error(command, exc, error_type=exc.error_type, job_id=job.id, state="FAILURE")
        return EXIT_FAILED
    except JobExpired as exc:
        _error(command, exc, job_id=job.id, state="EXPIRED")
        return EXIT_FAILED
    except JobTimeout:
        _print({"job_id": job.id, "state": job.state})
        return EXIT_NOT_READY
    except JobLost as exc:
        _error(command, exc, job_id=job.id, state="UNKNOWN")
        return EXIT_NO_SUCH_JOB


def _no_such_job(command: str, job_id: str) -> int:
    _error(command, JobLost(f"no job {job_id!r}: never submitted, expired, or lost with Redis's data"),
           job_id=job_id, state="UNKNOWN")
    return EXIT_NO_SUCH_JOB


def _follow(job: Job, timeout: float | None) -> dict[str, Any]:
    """Print each piece of the job's text as a JSON line as it comes; the result once it ends."""
    result: dict[str, Any] = {}
    for event in job.stream(timeout=timeout):
        if event.result is not None:
            result = event.result
        else:
            print(json.dumps({"kind": event.kind, "text": event.text}, ensure_ascii=False), flush=True)
    return result


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit one image + question job; with --wait, print its result; with --stream, its text first."""
    job = submit(args.image, args.question, max_new_tokens=args.max_new_tokens, priority=args.priority,
                 session=args.session, job_id=args.job_id, deadline=args.deadline,
                 thinking_budget=args.thinking_budget, stream=args.stream, queue=args.queue)
    if args.wait or args.stream:
        return _wait(job, args.timeout, "submit", args.stream)
    _print({"job_id": job.id, "state": job.state})
    return EXIT_OK


def cmd_ask_doc(args: argparse.Namespace) -> int:
    """Submit a question about a text file, rendered into pages on the render queue."""
    from glyphq.producer.documents import submit_document

    text = _read_text(args.file)
    job = submit_document(text, args.question, render=args.render_config, max_new_tokens=args.max_new_tokens,
                          priority=args.priority, session=args.session, job_id=args.job_id, deadline=args.deadline,
                          thinking_budget=args.thinking_budget, stream=args.stream, queue=args.queue)
    if args.wait or args.stream:
        return _wait(job, args.timeout, "ask-doc", args.stream)
    _print({"job_id": job.id, "state": job.state})
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """Render a text file into page PNGs locally, to see what the model will read."""
    from glyphq.producer.documents import check_render, check_text

    try:
        from glyphq.worker.render import RenderConfig, png_bytes, render_pages
    except ImportError as exc:  # reportlab and pypdfium2 are the render extra
        raise MissingExtra(f"needs the render extra (pip install 'glyphq[render]'): {exc}") from None

    text = check_text(_read_text(args.file), default_settings)
    config = RenderConfig.from_dict(check_render(args.render_config))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for number, page in enumerate(render_pages(text, config), start=1):
        path = out / f"page-{number:03d}.png"
        path.write_bytes(png_bytes(page))
        files.append(str(path))
    _print({"pages": len(files), "files": files})
    return EXIT_OK


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidJob("text", f"cannot read {path}: {exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    """Print a job's state; exit 7 when Redis holds no record of it."""
    state = Job(args.job_id).state
    if state == "UNKNOWN":
        return _no_such_job("status", args.job_id)
    _print({"job_id": args.job_id, "state": state})
    return EXIT_OK


def cmd_result(args: argparse.Namespace) -> int:
    """Print a job's result, waiting for it with --wait."""
    job = Job(args.job_id)
    if not args.wait and not job.ready():
        state = job.state
        if state == "UNKNOWN":
            return _no_such_job("result", job.id)
        _print({"job_id": job.id, "state": state})
        return EXIT_NOT_READY
    return _wait(job, args.timeout if args.wait else 10.0, "result")


def cmd_health(args: argparse.Namespace) -> int:
    """Check the broker, a live worker on the queue and (queue gpu) its model; exit 0 only if all pass."""
    from glyphq.producer.health import check_health

    report = check_health(args.queue, timeout=args.timeout, node=args.node, broker_only=args.broker_only)
    _print(report.to_dict())
    if report.ok:
        return EXIT_OK
    return EXIT_UNAVAILABLE if report.broker_unreachable else EXIT_FAILED


def cmd_check_model(args: argparse.Namespace) -> int:
    """Print how glyphq will talk to a model: its chat template, end and reasoning tokens, eos set,
    pixel limits, and whether the answer parser knows its format. Loads no weights."""
    try:
        from glyphq.worker.check import check_model
    except ImportError as exc:  # a producer install has no transformers
        message = f"needs the worker extra (pip install 'glyphq[worker]'): {exc}"
        _print({"ok": False, "error_type": "ImportError", "error": message})
        print(f"glyphq check-model: {message}", file=sys.stderr)
        return EXIT_FAILED
    try:
        report = check_model(args.model)
    except (OSError, ValueError) as exc:  # no such model, or files transformers cannot read
        raise InvalidJob("model", f"cannot read {args.model!r}: {exc}") from None
    _print(report)
    return EXIT_OK if report["parser"]["recognised"] or report["format"] == "plain" else EXIT_FAILED


def cmd_batch(args: argparse.Namespace) -> int:
    """Run a JSON Lines file of jobs with a bounded window; resumable. Prints a summary."""
    from glyphq.producer.batch import run_batch

    summary = run_batch(args.file, args.out, window=args.window, timeout=args.timeout,
                        job_prefix=args.job_prefix, progress=not args.no_progress)
    _print(summary.to_dict())
    return summary.exit_code()


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible HTTP gateway until stopped."""
    try:
        from glyphq.producer.gateway import serve
    except ImportError as exc:  # fastapi/uvicorn are the gateway extra
        raise ServeUsageError(f"needs the gateway extra (pip install 'glyphq[gateway]'): {exc}") from None
    serve(args.host, args.port)
    return EXIT_OK


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the answer and print the result")
    p.add_argument("--stream", action="store_true",
                   help='print the text as it is written, one JSON line each ({"kind": "reasoning" or "answer", '
                        '"text"}), then the result')
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait or --stream (default 600)")
    p.add_argument("--priority", type=int, help="0 (lowest) to 9 (most urgent)")
    p.add_argument("--session", help="make the job a turn of this conversation")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--thinking-budget", type=int,
                   help="new tokens of reasoning before the model must answer (0: none; GLYPHQ_THINKING_BUDGET)")
    p.add_argument("--job-id", help="your own id; submitting the same id again runs it once")
    p.add_argument("--deadline", type=float, help="seconds by which the job must start, or it never runs")
    p.add_argument("--queue", help=f"{GPU_QUEUE} (default) or {GPU_QUEUE}.<name>: the GPU queue that answers the job, "
                                   "e.g. one worker's own (docs/scaling.md)")


def _version() -> str:
    try:
        return importlib.metadata.version("glyphq")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``glyphq`` command."""
    parser = argparse.ArgumentParser(prog="glyphq", description="Submit image + question jobs and read results.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    parser.add_argument("--version", action="version", version=f"glyphq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit an image + question job")
    p.add_argument("image", help="path of the image file")
    p.add_argument("question")
    _add_job_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("ask-doc", help="ask a question about a long text file (rendered into pages first)")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("question")
    p.add_argument("--render-config", help="JSON file of Glyph render settings (config_en.json keys)")
    _add_job_options(p)
    p.set_defaults(func=cmd_ask_doc)

    p = sub.add_parser("render", help="render a text file into page PNGs, as the render queue would")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--out", required=True, help="folder for page-001.png, page-002.png, ...")
    p.add_argument("--render-config", help="JSON file of Glyph render settings (config_en.json keys)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("status", help="print a job's state")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("result", help="print a job's result")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="wait until the job has finished")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default 600)")
    p.set_defaults(func=cmd_result)

    p = sub.add_parser("health", help="exit 0 if the broker, a worker on the queue and its model are up")
    p.add_argument("--queue", default=GPU_QUEUE,
                   help=f"queue to check: {GPU_QUEUE} (default; checks the model too), {GPU_QUEUE}.<name> "
                        f"(a worker's own; checks the model too) or {RENDER_QUEUE}")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for worker replies (default 3)")
    p.add_argument("--node", help="check only this worker, e.g. gpu0@$HOSTNAME (default: any worker)")
    p.add_argument("--broker-only", action="store_true", help="check only that Redis answers")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("check-model", help="check a downloaded model's template and tokens (loads no weights)")
    p.add_argument("model", help="hub id (from the local cache) or local path, as GLYPHQ_MODEL")
    p.set_defaults(func=cmd_check_model)

    p = sub.add_parser("batch", help="run a JSON Lines file of jobs, resumably; results go to --out")
    p.add_argument("file", help='JSON Lines: {"image": path, "question": ..., "id"?, "max_new_tokens"?, "priority"?, '
                                '"thinking_budget"?}, or an OpenAI Batch file ({"custom_id", "method", "url", "body"})')
    p.add_argument("--out", required=True, help="results file (JSON Lines, appended; ids already in it are skipped)")
    p.add_argument("--window", type=int, default=32, help="most jobs in flight at once (default 32)")
    p.add_argument("--timeout", type=float, help="most seconds to wait for one job (default: no limit)")
    p.add_argument("--job-prefix", help="job ids are PREFIX-<id> (default: derived from the input and output paths)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("serve", help="serve the OpenAI chat completions API over HTTP (needs glyphq[gateway])")
    p.add_argument("--host", help="address to listen on (default GLYPHQ_GATEWAY_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default GLYPHQ_GATEWAY_PORT, 8000)")
    p.set_defaults(func=cmd_serve)
    return parser


#: The exit status of a command that ends with one of glyphq's errors (the first match counts); any
#: other glyphq error exits 1.
EXIT_FOR_ERROR: tuple[tuple[type[GlyphqError], int], ...] = (
    (InvalidJob, EXIT_REFUSED), (InvalidRenderConfig, EXIT_REFUSED), (BatchUsageError, EXIT_REFUSED),
    (ServeUsageError, EXIT_REFUSED), (MissingExtra, EXIT_REFUSED), (BrokerEvicts, EXIT_UNAVAILABLE),
    (BrokerFull, EXIT_BROKER_FULL), (BrokerUnavailable, EXIT_UNAVAILABLE), (QueueFull, EXIT_QUEUE_FULL),
    (JobLost, EXIT_NO_SUCH_JOB), (SettingsError, EXIT_BAD_SETTING),
)
#: Commands that need Redis before anything else; they fail fast when it does not answer.
NEEDS_BROKER = frozenset({"submit", "ask-doc", "status", "result"})
BROKER_CHECK_TIMEOUT_S = 2.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``glyphq`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command in NEEDS_BROKER:
            check_broker(default_settings, BROKER_CHECK_TIMEOUT_S)
        return int(args.func(args))
    except GlyphqError as exc:
        _error(args.command, exc)
        return next((code for kind, code in EXIT_FOR_ERROR if isinstance(exc, kind)), EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
