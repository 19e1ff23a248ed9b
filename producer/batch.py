"""``glyphq batch``: run a JSON Lines file of image + question jobs through the queue, resumably.

Each input line is an object ``{"image": path, "question": str, "id"?: str|int, "max_new_tokens"?: int,
"priority"?: int, "thinking_budget"?: int}``; image paths are relative to the input file's folder. At
most ``window`` jobs are in flight at once. Results are appended to the output as they finish, one
JSON object per line, written with a single ``write`` and fsync'd, so a kill leaves whole lines only
(a run locks the output, so a second run on it is refused):

    {"id": ..., "job_id": ..., "line": N, "ok": true, "result": {...}}
    {"id": ..., "job_id": ..., "line": N, "ok": false, "error_type": ..., "error": ...}

Ids: a line's ``"id"`` (a string or an integer, written back as a string), else ``line-<N>`` with N its
1-based line number in the input file. Job ids are ``<prefix>-<id>``; the prefix defaults to ``b`` plus
10 hex digits of a hash of the input and output paths, so a rerun of the same command gives every line
the same job id. ``submit`` enqueues a job id once, so a rerun re-attaches to jobs already queued,
running or finished instead of running them twice; ids already in the output are skipped.

An OpenAI Batch file (``{"custom_id", "method", "url", "body"}`` lines) is read as well, detected per
file, and gets OpenAI Batch output lines (``producer.batch_openai``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
from kombu.exceptions import OperationalError

from glyphq.celeryconfig import Settings
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer import batch_openai
from glyphq.producer.errors import BatchUsageError, BrokerUnavailable
from glyphq.producer.store import Store, unavailable

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 32
#: The most levels of lists and objects a line may nest; a chat completion request with an image needs 7.
MAX_NESTING = 64
FIELDS = ("image", "question", "id", "max_new_tokens", "priority", "thinking_budget")
#: How long the broker may stay unreachable mid-batch before the batch stops (exit 4); rerun to go on.
BROKER_GRACE_S = 300.0
#: Pause before submitting again after QueueFull or a broker error.
BACKOFF_S = 2.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_OUTPUT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 4, 8, 130
BROKER_ERRORS = (BrokerUnavailable, redis.RedisError, OperationalError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Item:
    """One valid input line."""

    line: int
    id: str
    job_id: str
    image: Path
    question: Any
    max_new_tokens: Any = None
    priority: Any = None
    thinking_budget: Any = None
    offset: int | None = None  # an OpenAI Batch line: where it starts in the input; its body is read at submit

    def job_args(self, cfg: Settings) -> tuple[Path | bytes, Any, dict[str, Any]]:
        """(image, question, other ``submit`` arguments); an OpenAI line's body is read and checked now."""
        if self.offset is None:
            return self.image, self.question, {"max_new_tokens": self.max_new_tokens, "priority": self.priority,
                                               "thinking_budget": self.thinking_budget}
        return batch_openai.job_args(self._openai_line(), cfg)

    def record(self, outcome: dict[str, Any], cfg: Settings) -> dict[str, Any]:
        """The output line of this item: glyphq's own, or an OpenAI Batch output line (its completion under
        the served model name its body asked for)."""
        if self.offset is None:
            return {"id": self.id, "job_id": self.job_id, "line": self.line, **outcome}
        if outcome["ok"]:
            model = batch_openai.served_model(self._openai_line(), cfg)
            return batch_openai.success(self.id, self.job_id, outcome["result"], model)
        return batch_openai.failure(self.id, self.job_id, outcome["error_type"], outcome["error"])

    def _openai_line(self) -> bytes:
        """This OpenAI Batch line as the input holds it."""
        assert self.offset is not None
        with self.image.open("rb") as handle:
            handle.seek(self.offset)
            return handle.readline()


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot become a job, and why."""

    line: int
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "error": self.error}


@dataclass
class Summary:
    """What a batch run did; printed as JSON at the end of ``glyphq batch``."""

    input: str
    output: str
    job_prefix: str
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped_bad: int = 0
    already_done: int = 0
    previously_failed: int = 0
    timed_out: int = 0
    not_submitted: int = 0
    in_flight: int = 0
    interrupted: bool = False
    broker_unavailable: bool = False
    output_error: str | None = None
    elapsed: float = 0.0
    bad_lines: list[BadLine] = field(default_factory=list)
    timed_out_ids: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every input line has a successful result in the output."""
        return self.done + self.already_done - self.previously_failed == self.total

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.broker_unavailable:
            return EXIT_UNAVAILABLE
        if self.output_error:
            return EXIT_OUTPUT_ERROR
        return EXIT_OK if self.complete else EXIT_INCOMPLETE

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "job_prefix": self.job_prefix,
            "total": self.total, "done": self.done, "failed": self.failed, "skipped_bad": self.skipped_bad,
            "already_done": self.already_done, "previously_failed": self.previously_failed,
            "timed_out": self.timed_out, "not_submitted": self.not_submitted, "in_flight": self.in_flight,
            "interrupted": self.interrupted, "broker_unavailable": self.broker_unavailable,
            "output_error": self.output_error,
            "elapsed": round(self.elapsed, 3),
            "bad_lines": [b.to_dict() for b in sorted(self.bad_lines, key=lambda b: b.line)],
            "timed_out_ids": self.timed_out_ids,
        }


def default_job_prefix(input_path: Path, output_path: Path) -> str:
    """``b`` + 10 hex digits naming this (input, output) pair: stable across reruns of the same command."""
    key = f"{input_path.resolve()}\0{output_path.resolve()}".encode()
    return "b" + hashlib.sha256(key).hexdigest()[:10]


def job_id_for(prefix: str, item_id: str) -> str:
    """``<prefix>-<id>``; an id that is not 1-100 of ``A-Z a-z 0-9 . _ : -`` is replaced by a hash of it."""
    safe = item_id if _SAFE_ID.match(item_id) else "h" + hashlib.sha256(item_id.encode()).hexdigest()[:32]
    return f"{prefix}-{safe}"


def parse_lines(path: Path, prefix: str) -> Iterator[Item | BadLine]:
    """Every non-blank line of the input as an ``Item`` or a ``BadLine`` (bad JSON, bad fields, duplicate id)."""
    base = path.parent
    seen: dict[str, int] = {}
    openai = batch_openai.is_openai_file(path)
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                item = _parse_openai_line(raw, number, start, path, prefix) if openai else \
                    _parse_line(raw, number, base, prefix)
            except ValueError as exc:
                yield BadLine(number, str(exc))
                continue
            if item.id in seen:
                yield BadLine(number, f"duplicate id {item.id!r} (first on line {seen[item.id]})")
                continue
            seen[item.id] = number
            yield item


def _load_json(raw: bytes) -> Any:
    """The JSON value of one line; ``ValueError`` if it is not UTF-8 JSON or nests more than ``MAX_NESTING`` deep.

    Deep nesting makes ``json`` raise ``RecursionError``, and a line that only just parses here could fail
    when read again deeper in the stack (an OpenAI Batch line is, at submit), so the limit is far below that.
    """
    too_deep = f"nested more than {MAX_NESTING} levels deep"
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise ValueError(f"not valid JSON: {exc}") from None
    if _nesting(data) > MAX_NESTING:
        raise ValueError(too_deep)
    return data


def _nesting(value: Any) -> int:
    """How many levels of lists and objects ``value`` has (0 for a string or number), found without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, level = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in children)
    return deepest


def _parse_line(raw: bytes, number: int, base: Path, prefix: str) -> Item:
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    for name in ("image", "question"):
        if name not in data:
            raise ValueError(f"missing field {name!r}")
    image = data["image"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"image: must be a non-empty path string, got {image!r}")
    raw_id = data.get("id")
    if raw_id is None:
        item_id = f"line-{number}"
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or raw_id == "":
        raise ValueError(f"id: must be a non-empty string or an integer, got {raw_id!r}")
    else:
        item_id = str(raw_id)
    return Item(line=number, id=item_id, job_id=job_id_for(prefix, item_id), image=base / image,
                question=data["question"], max_new_tokens=data.get("max_new_tokens"),
                priority=data.get("priority"), thinking_budget=data.get("thinking_budget"))


def _parse_openai_line(raw: bytes, number: int, offset: int, path: Path, prefix: str) -> Item:
    custom_id = batch_openai.check_envelope(_load_json(raw))
    return Item(line=number, id=custom_id, job_id=job_id_for(prefix, custom_id), image=path, question=None,
                offset=offset)


_RECORD_START = b'{"id":'


def read_finished(path: Path, warn: Callable[[str], None]) -> dict[str, bool]:
    """Ids already in the output, mapped to whether they succeeded (``"ok": true`` exactly). A trailing partial
    line (a kill mid-write) is cut off.

    A file that is not a results file of ``glyphq batch`` raises ``BatchUsageError`` and is left alone.
    """
    finished: dict[str, bool] = {}
    if not path.exists():
        return finished
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = _load_json(raw)
            if "custom_id" in record:
                done, ok = batch_openai.finished(record)
                finished[done] = ok
            else:
                finished[str(record["id"])] = record["ok"] is True
        except (ValueError, KeyError, TypeError):
            raise BatchUsageError(f"{path} is not a results file of glyphq batch (line {number}); "
                                  "choose another --out") from None
    if end < len(data):
        if not data[end:].startswith(_RECORD_START[: len(data) - end]):
            raise BatchUsageError(f"{path} is not a results file of glyphq batch (its last line); choose another --out")
        warn(f"{path}: dropping a partial last line ({len(data) - end} bytes) left by an interrupted write")
        os.truncate(path, end)
    return finished


class ResultWriter:
    """Appends one JSON line per result: a single ``write`` call per line, then fsync.

    It holds an exclusive lock (``flock``) on the file until closed, so two runs never write to one output:
    the second is refused with ``BatchUsageError``. The kernel drops the lock when the process ends, however
    it ends.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BatchUsageError(f"--out {path} is in use by another glyphq batch run; wait for it to end "
                                  "or choose another --out") from None
        except OSError:
            os.close(self.fd)
            raise

    def write(self, record: dict[str, Any]) -> None:
        """``record`` must start with ``id``: a partial last line is recognised by that start."""
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(self.fd, data)
        while written < len(data):  # only on a full disk or similar; the next run cuts a partial line
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def run_batch(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *,
              window: int = DEFAULT_WINDOW, timeout: float | None = None, job_prefix: str | None = None,
              progress: bool = True, stderr: IO[str] | None = None, poll_s: float = 0.2,
              settings: Settings | None = None) -> Summary:
    """Run every line of ``input_path`` and append results to ``output_path``; see the module docstring.

    ``timeout`` is the most seconds to wait for one job, counted from when this run submitted (or
    re-attached to) it; a job past it is left running, not written, and collected by a rerun.
    Raises ``BatchUsageError`` for a batch that cannot start and ``BrokerUnavailable`` when Redis
    cannot be reached at the start.
    """
    cfg = settings or default_settings
    err = stderr or sys.stderr
    source, out = Path(input_path), Path(output_path)
    prefix = _check_usage(source, out, window, timeout, job_prefix)
    _check_reachable(cfg)
    start = time.monotonic()
    summary = Summary(input=str(source), output=str(out), job_prefix=prefix)
    writer = _open_output(out)  # before reading it: the lock keeps a second run from reading or writing it
    try:
        todo = _plan(source, out, prefix, summary, lambda text: _warn(err, text))
    except BaseException:
        writer.close()
        raise
    from glyphq.producer.batch_runner import Progress, Runner

    Runner(cfg, source, out, writer, summary, todo, window, timeout, Progress(len(todo), progress, err),
           poll_s).run()
    summary.elapsed = time.monotonic() - start
    if summary.interrupted or summary.broker_unavailable or summary.output_error or summary.in_flight \
            or summary.timed_out:
        _warn(err, _resume_hint(summary, source, out, job_prefix))
    return summary


def _warn(stream: IO[str], text: str) -> None:
    print(f"glyphq batch: {text}", file=stream, flush=True)


def _check_usage(source: Path, out: Path, window: int, timeout: float | None, job_prefix: str | None) -> str:
    """The job prefix of a batch that can start; ``BatchUsageError`` naming what stops it otherwise."""
    if window < 1:
        raise BatchUsageError(f"--window must be at least 1, got {window}")
    if timeout is not None and timeout <= 0:
        raise BatchUsageError(f"--timeout must be positive, got {timeout}")
    if not source.is_file():
        raise BatchUsageError(f"no such input file: {source}")
    if out.exists() and out.resolve() == source.resolve():
        raise BatchUsageError("the output file must not be the input file")
    if not out.parent.is_dir():
        raise BatchUsageError(f"the output's folder does not exist: {out.parent}")
    _check_output_kind(out)
    prefix = job_prefix or default_job_prefix(source, out)
    if not _SAFE_ID.match(prefix) or len(prefix) > 24:
        raise BatchUsageError(f"--job-prefix must be 1-24 of A-Z a-z 0-9 . _ : -, got {prefix!r}")
    return prefix


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _check_output_kind(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a regular file: reading a device such as /dev/zero never
    ends, and opening a FIFO blocks."""
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:  # a new path (or a link to one): created when opened
        return
    except OSError as exc:
        raise BatchUsageError(f"--out: cannot use {out}: {exc}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
        raise BatchUsageError(f"--out must be a regular file or a new path; {out} is {kind}")


def _open_output(out: Path) -> ResultWriter:
    """The locked writer of ``out``; ``BatchUsageError`` if another run holds it or it cannot be opened."""
    try:
        return ResultWriter(out)
    except OSError as exc:
        raise BatchUsageError(f"cannot open {out} for writing: {exc}") from None


def _check_reachable(cfg: Settings) -> None:
    try:
        Store(cfg).redis.ping()
    except redis.RedisError as exc:
        raise unavailable(cfg, exc) from exc


def _plan(source: Path, out: Path, prefix: str, summary: Summary, warn: Callable[[str], None]) -> list[Item]:
    """The items still to run: every good line whose id is not in the output yet. Counts the rest."""
    finished = read_finished(out, warn)
    entries = list(parse_lines(source, prefix))
    summary.total = len(entries)
    todo: list[Item] = []
    for parsed in entries:
        if isinstance(parsed, BadLine):
            summary.bad_lines.append(parsed)
        elif parsed.id in finished:
            summary.already_done += 1
            summary.previously_failed += 0 if finished[parsed.id] else 1
        else:
            todo.append(parsed)
    for bad in summary.bad_lines:
        warn(f"{source}:{bad.line}: skipped: {bad.error}")
    summary.skipped_bad = len(summary.bad_lines)
    if summary.already_done:
        warn(f"resuming: {summary.already_done} of {summary.total} ids are already in {out}")
    return todo


def _resume_hint(summary: Summary, source: Path, out: Path, job_prefix: str | None) -> str:
    """Why the batch stopped early, what is left, and the command that resumes it."""
    why = "interrupted" if summary.interrupted else ("Redis unreachable" if summary.broker_unavailable else (
        summary.output_error or "some jobs not finished in time"))
    command = ["glyphq", "batch", str(source), "--out", str(out)]
    if job_prefix:
        command += ["--job-prefix", job_prefix]
    return (f"{why}: {summary.in_flight + summary.timed_out} job(s) still queued or running keep their place "
            f"and {summary.not_submitted} line(s) were not submitted. Resume with the same command; it skips "
            f"the {summary.done + summary.failed + summary.already_done} ids already in {out} and re-attaches "
            f"to the queued jobs:\n  {shlex.join(command)}")
