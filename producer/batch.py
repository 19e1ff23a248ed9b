"""``glyphq batch``: run a JSON Lines file of image + question jobs through the queue, resumably.

Each input line is an object ``{"image": path, "question": str, "id"?: str|int, "max_new_tokens"?: int,
"priority"?: int, "thinking_budget"?: int}``; image paths are relative to the input file's folder. At
most ``window`` jobs are in flight at once. Results are appended to the output as they finish, one
JSON object per line, written with a single ``write`` and fsync'd, so a kill leaves whole lines only:

    {"id": ..., "job_id": ..., "line": N, "ok": true, "result": {...}}
    {"id": ..., "job_id": ..., "line": N, "ok": false, "error_type": ..., "error": ...}

Ids: a line's ``"id"`` (a string or an integer, written back as a string), else ``line-<N>`` with N its
1-based line number in the input file. Job ids are ``<prefix>-<id>``; the prefix defaults to ``b`` plus
10 hex digits of a hash of the input and output paths, so a rerun of the same command gives every line
the same job id. ``submit`` enqueues a job id once, so a rerun re-attaches to jobs already queued,
running or finished instead of running them twice; ids already in the output are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis
from kombu.exceptions import OperationalError

from glyphq.celeryconfig import Settings
from glyphq.celeryconfig import settings as default_settings
from glyphq.producer.errors import BatchUsageError, BrokerUnavailable, GlyphqError, InvalidJob, JobFailed, JobTimeout
from glyphq.producer.store import Store, unavailable
from glyphq.producer.submit import LOST_CHECK_S

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 32
FIELDS = ("image", "question", "id", "max_new_tokens", "priority", "thinking_budget")
#: How long the broker may stay unreachable mid-batch before the batch stops (exit 4); rerun to go on.
BROKER_GRACE_S = 300.0
#: Pause before submitting again after QueueFull or a broker error.
BACKOFF_S = 2.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_OUTPUT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 4, 8, 130
_BROKER_ERRORS = (BrokerUnavailable, redis.RedisError, OperationalError, ConnectionError, TimeoutError)




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
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                item = _parse_line(raw, number, base, prefix)
            except ValueError as exc:
                yield BadLine(number, str(exc))
                continue
            if item.id in seen:
                yield BadLine(number, f"duplicate id {item.id!r} (first on line {seen[item.id]})")
                continue
            seen[item.id] = number
            yield item


def _parse_line(raw: bytes, number: int, base: Path, prefix: str) -> Item:
    try:
        data = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise ValueError(f"not valid JSON: {exc}") from None
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


_RECORD_START = b'{"id":'


def read_finished(path: Path, warn: Callable[[str], None]) -> dict[str, bool]:
    """Ids already in the output, mapped to their ``ok``. A trailing partial line (a kill mid-write) is cut off.

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
            record = json.loads(raw)
            finished[str(record["id"])] = bool(record["ok"])
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
    """Appends one JSON line per result: a single ``write`` call per line, then fsync."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        """``record`` must start with ``id``: a partial last line is recognised by that start."""
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(self.fd, data)
        while written < len(data):  # only on a full disk or similar; the next run cuts a partial line
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _InFlight:
    item: Item
    job: Any  # producer.submit.Job
    since: float
    checked: float = 0.0  # when it was last seen to exist in Redis


class _Progress:
    """A tqdm bar on stderr with done, failed, bad and in-flight counts (tqdm adds rate and ETA)."""

    def __init__(self, total: int, enabled: bool, stream: IO[str]) -> None:
        self.stream = stream
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            tty = hasattr(stream, "isatty") and stream.isatty()
            self.bar = tqdm(total=total, file=stream, unit="job", dynamic_ncols=True, mininterval=0.2 if tty else 10,
                            ascii=not tty, smoothing=0.05)

    def update(self, summary: Summary, in_flight: int, step: int = 0) -> None:
        if self.bar is not None:
            self.bar.set_postfix(done=summary.done, failed=summary.failed, bad=summary.skipped_bad,
                                 in_flight=in_flight, refresh=False)
            self.bar.update(step)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StopFlag:
    """Set by the first SIGINT/SIGTERM; a second SIGINT raises KeyboardInterrupt, but never inside ``submit``.

    ``submit`` claims the job id, stores the blob and then sends the message; stopping between the
    claim and the send would leave a claimed id that a rerun re-attaches to and waits on forever.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.forced = False
        self._critical = False
        self._saved: dict[int, Any] = {}

    @contextlib.contextmanager
    def protected(self) -> Iterator[None]:
        """Delay a second Ctrl-C until the block is done."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self.forced:
            raise KeyboardInterrupt

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            self.forced = True
            if not self._critical:
                raise KeyboardInterrupt
            return
        self.reason = signal.Signals(signum).name


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
    from glyphq.producer.submit import submit

    cfg = settings or default_settings
    err = stderr or sys.stderr
    source, out = Path(input_path), Path(output_path)
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
    prefix = job_prefix or default_job_prefix(source, out)
    if not _SAFE_ID.match(prefix) or len(prefix) > 24:
        raise BatchUsageError(f"--job-prefix must be 1-24 of A-Z a-z 0-9 . _ : -, got {prefix!r}")
    try:
        Store(cfg).redis.ping()
    except redis.RedisError as exc:
        raise unavailable(cfg, exc) from exc

    start = time.monotonic()
    summary = Summary(input=str(source), output=str(out), job_prefix=prefix)

    def warn(text: str) -> None:
        print(f"glyphq batch: {text}", file=err, flush=True)

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

    bar = _Progress(len(todo), progress, err)
    try:
        writer = ResultWriter(out)
    except OSError as exc:
        raise BatchUsageError(f"cannot open {out} for writing: {exc}") from None
    in_flight: dict[str, _InFlight] = {}
    queue = iter(todo)
    held: Item | None = None  # the next item to submit, kept back after QueueFull or a broker error
    lost: list[Item] = []  # submitted, but Redis holds no record of them: submitted again
    resume_at = 0.0
    broker_down_since: float | None = None
    exhausted = False

    def broker_error(exc: BaseException) -> None:
        nonlocal broker_down_since, resume_at
        now = time.monotonic()
        if broker_down_since is None:
            broker_down_since = now
            bar.message(f"glyphq batch: Redis unreachable ({exc}); retrying for up to {BROKER_GRACE_S:.0f} s")
        resume_at = now + BACKOFF_S
        if now - broker_down_since > BROKER_GRACE_S:
            summary.broker_unavailable = True

    def write(entry: _InFlight, record: dict[str, Any], ok: bool) -> None:
        writer.write({"id": entry.item.id, "job_id": entry.item.job_id, "line": entry.item.line, **record})
        if ok:
            summary.done += 1
        else:
            summary.failed += 1
            bar.message(f"glyphq batch: {source}:{entry.item.line}: id {entry.item.id!r} failed: "
                        f"{record['error_type']}: {record['error']}")

    def collect(entry: _InFlight) -> bool:
        """Write the result of a job that is ready; False if it was not ready after all."""
        try:
            result = entry.job.result(timeout=10)
        except JobFailed as exc:
            write(entry, {"ok": False, "error_type": exc.error_type, "error": exc.message}, ok=False)
            return True
        except JobTimeout:
            return False
        except GlyphqError as exc:
            if isinstance(exc, BrokerUnavailable):
                raise
            write(entry, {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}, ok=False)
            return True
        if isinstance(result, dict):
            write(entry, {"ok": True, "result": result}, ok=True)
        else:  # e.g. a revoked job, whose "result" is the revoking exception
            write(entry, {"ok": False, "error_type": str(entry.job.state), "error": str(result)}, ok=False)
        return True

    try:
        with _StopFlag() as stop:
            while not (stop.reason or summary.broker_unavailable):
                now = time.monotonic()
                # Fill the window.
                while (len(in_flight) < window and now >= resume_at and not stop.reason
                       and not summary.broker_unavailable):
                    item = held or (lost.pop(0) if lost else None)
                    if item is None:
                        item = next(queue, None)
                        if item is None:
                            exhausted = True
                            break
                    try:
                        with stop.protected():
                            job = submit(item.image, item.question, max_new_tokens=item.max_new_tokens,
                                         thinking_budget=item.thinking_budget, priority=item.priority,
                                         job_id=item.job_id, settings=cfg)
                    except InvalidJob as exc:
                        held = None
                        bad = BadLine(item.line, str(exc))
                        summary.bad_lines.append(bad)
                        summary.skipped_bad += 1
                        bar.message(f"glyphq batch: {source}:{bad.line}: skipped: {bad.error}")
                        bar.update(summary, len(in_flight), step=1)
                        continue
                    except _BROKER_ERRORS as exc:
                        held = item
                        broker_error(exc)
                        break
                    except GlyphqError as exc:  # QueueFull, BrokerFull: wait for the queue to drain a little
                        held = item
                        if resume_at <= now:
                            bar.message(f"glyphq batch: {exc}; waiting")
                        resume_at = now + BACKOFF_S
                        break
                    except (OSError, ValueError) as exc:  # an unreadable image file, a NUL in a path...
                        held = None
                        bad = BadLine(item.line, f"image: cannot read {str(item.image)!r}: {exc}")
                        summary.bad_lines.append(bad)
                        summary.skipped_bad += 1
                        bar.message(f"glyphq batch: {source}:{bad.line}: skipped: {bad.error}")
                        bar.update(summary, len(in_flight), step=1)
                        continue
                    held = None
                    broker_down_since = None
                    in_flight[item.job_id] = _InFlight(item, job, time.monotonic())
                    bar.update(summary, len(in_flight))
                if exhausted and held is None and not lost and not in_flight:
                    break

                # Collect what has finished.
                progressed = False
                try:
                    for job_id, flight in list(in_flight.items()):
                        if stop.reason:
                            break
                        if flight.job.ready():
                            if collect(flight):
                                del in_flight[job_id]
                                progressed = True
                                bar.update(summary, len(in_flight), step=1)
                        elif timeout is not None and time.monotonic() - flight.since > timeout:
                            del in_flight[job_id]
                            summary.timed_out += 1
                            summary.timed_out_ids.append(flight.item.id)
                            bar.message(f"glyphq batch: {source}:{flight.item.line}: id {flight.item.id!r} not done "
                                        f"after {timeout:g} s (job {job_id} keeps its place; rerun to collect it)")
                            bar.update(summary, len(in_flight), step=1)
                        elif time.monotonic() - flight.checked > LOST_CHECK_S:
                            flight.checked = time.monotonic()
                            if flight.job.state == "UNKNOWN":  # never queued, or lost with Redis's data
                                del in_flight[job_id]
                                lost.append(flight.item)
                                bar.message(f"glyphq batch: {source}:{flight.item.line}: job {job_id} is not in "
                                            "Redis (never queued, or lost with its data); submitting it again")
                    if broker_down_since is not None and held is None:
                        broker_down_since = None
                except _BROKER_ERRORS as exc:
                    broker_error(exc)
                    time.sleep(BACKOFF_S)
                    continue
                except OSError as exc:  # the results file cannot take another line: a full disk
                    summary.output_error = f"cannot write to {out}: {exc}"
                    break
                if not progressed:
                    time.sleep(poll_s)
            summary.interrupted = stop.reason is not None
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once; every line written so far is whole
        summary.interrupted = True
    finally:
        bar.close()
        writer.close()
        summary.in_flight = len(in_flight)
        summary.not_submitted = ((0 if exhausted else sum(1 for _ in queue)) + (1 if held is not None else 0)
                                 + len(lost))
        summary.elapsed = time.monotonic() - start

    if summary.interrupted or summary.broker_unavailable or summary.output_error or summary.in_flight \
            or summary.timed_out:
        why = "interrupted" if summary.interrupted else ("Redis unreachable" if summary.broker_unavailable else (
            summary.output_error or "some jobs not finished in time"))
        command = ["glyphq", "batch", str(source), "--out", str(out)]
        if job_prefix:
            command += ["--job-prefix", job_prefix]
        warn(f"{why}: {summary.in_flight + summary.timed_out} job(s) still queued or running keep their place "
             f"and {summary.not_submitted} line(s) were not submitted. Resume with the same command; it skips "
             f"the {summary.done + summary.failed + summary.already_done} ids already in {out} and re-attaches "
             f"to the queued jobs:\n  {shlex.join(command)}")
    return summary
