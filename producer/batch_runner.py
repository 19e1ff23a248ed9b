"""The loop of ``glyphq batch``: at most ``window`` jobs in flight, each result written as it comes.

It backs off on ``QueueFull`` and ``BrokerFull``, rides out a Redis outage of up to ``BROKER_GRACE_S``,
submits again a job Redis lost, and stops cleanly on Ctrl-C or on an output it cannot write.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from glyphq.celeryconfig import Settings
from glyphq.producer.batch import BACKOFF_S, BROKER_ERRORS, BROKER_GRACE_S, BadLine, Item, ResultWriter, Summary
from glyphq.producer.errors import BrokerUnavailable, GlyphqError, InvalidJob, JobFailed, JobTimeout
from glyphq.producer.submit import LOST_CHECK_S


@dataclass
class InFlight:
    item: Item
    job: Any  # producer.submit.Job
    since: float
    checked: float = 0.0  # when it was last seen to exist in Redis


class Progress:
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


class StopFlag:
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

    def __enter__(self) -> StopFlag:
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


class Runner:
    """One run of a batch: keeps at most ``window`` jobs in flight and writes each result as it comes."""

    def __init__(self, cfg: Settings, source: Path, out: Path, writer: ResultWriter, summary: Summary,
                 todo: list[Item], window: int, timeout: float | None, bar: Progress, poll_s: float) -> None:
        """``writer`` is the open, locked output; ``run`` closes it."""
        self.cfg, self.source, self.out, self.writer, self.summary = cfg, source, out, writer, summary
        self.window, self.timeout, self.bar, self.poll_s = window, timeout, bar, poll_s
        self.stop = StopFlag()
        self.in_flight: dict[str, InFlight] = {}
        self.queue = iter(todo)
        self.held: Item | None = None  # the next item to submit, kept back after QueueFull or a broker error
        self.lost: list[Item] = []  # submitted, but Redis holds no record of them: submitted again
        self.resume_at = 0.0
        self.broker_down_since: float | None = None
        self.exhausted = False

    def run(self) -> None:
        """Submit, collect and write until every item is done, or a stop (signal, Redis, output) comes."""
        try:
            with self.stop:
                self._loop()
                self.summary.interrupted = self.stop.reason is not None
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once; every line written so far is whole
            self.summary.interrupted = True
        finally:
            self.bar.close()
            self.writer.close()
            self._count_left()

    def _stopping(self) -> bool:
        return bool(self.stop.reason or self.summary.broker_unavailable)

    def _loop(self) -> None:
        while not self._stopping():
            self._fill()
            if self.exhausted and self.held is None and not self.lost and not self.in_flight:
                return
            try:
                progressed = self._poll()
            except BROKER_ERRORS as exc:
                self._broker_error(exc)
                time.sleep(BACKOFF_S)
                continue
            except OSError as exc:  # the results file cannot take another line: a full disk
                self.summary.output_error = f"cannot write to {self.out}: {exc}"
                return
            if not progressed:
                time.sleep(self.poll_s)

    def _count_left(self) -> None:
        self.summary.in_flight = len(self.in_flight)
        unsubmitted = 0 if self.exhausted else sum(1 for _ in self.queue)
        self.summary.not_submitted = unsubmitted + (1 if self.held is not None else 0) + len(self.lost)

    # ---- submitting ---------------------------------------------------------------------------------

    def _next_item(self) -> Item | None:
        item = self.held or (self.lost.pop(0) if self.lost else None)
        if item is None:
            item = next(self.queue, None)
            self.exhausted = item is None
        return item

    def _fill(self) -> None:
        """Submit items until the window is full, the input is exhausted, or submitting must wait."""
        while len(self.in_flight) < self.window and time.monotonic() >= self.resume_at and not self._stopping():
            item = self._next_item()
            if item is None or not self._submit(item):
                return

    def _submit(self, item: Item) -> bool:
        """Submit one item; False when submitting must pause (full queue or Redis, Redis unreachable)."""
        from glyphq.producer.submit import submit

        try:
            image, question, fields = item.job_args(self.cfg)
            with self.stop.protected():
                job = submit(image, question, job_id=item.job_id, settings=self.cfg, **fields)
        except InvalidJob as exc:
            self._skip(item, str(exc))
            return True
        except BROKER_ERRORS as exc:
            self.held = item
            self._broker_error(exc)
            return False
        except GlyphqError as exc:  # QueueFull, BrokerFull: wait for the queue to drain a little
            self.held = item
            now = time.monotonic()
            if self.resume_at <= now:
                self.bar.message(f"glyphq batch: {exc}; waiting")
            self.resume_at = now + BACKOFF_S
            return False
        except (OSError, ValueError) as exc:  # an unreadable image file, a NUL in a path...
            self._skip(item, f"image: cannot read {str(item.image)!r}: {exc}")
            return True
        self.held = None
        self.broker_down_since = None
        self.in_flight[item.job_id] = InFlight(item, job, time.monotonic())
        self.bar.update(self.summary, len(self.in_flight))
        return True

    def _skip(self, item: Item, error: str) -> None:
        """Count a line that ``submit`` refused as bad; the batch goes on."""
        self.held = None
        bad = BadLine(item.line, error)
        self.summary.bad_lines.append(bad)
        self.summary.skipped_bad += 1
        self.bar.message(f"glyphq batch: {self.source}:{bad.line}: skipped: {bad.error}")
        self.bar.update(self.summary, len(self.in_flight), step=1)

    def _broker_error(self, exc: BaseException) -> None:
        """Back off; after ``BROKER_GRACE_S`` of Redis unreachable, stop the batch."""
        now = time.monotonic()
        if self.broker_down_since is None:
            self.broker_down_since = now
            self.bar.message(f"glyphq batch: Redis unreachable ({exc}); retrying for up to {BROKER_GRACE_S:.0f} s")
        self.resume_at = now + BACKOFF_S
        if now - self.broker_down_since > BROKER_GRACE_S:
            self.summary.broker_unavailable = True

    # ---- collecting ---------------------------------------------------------------------------------

    def _poll(self) -> bool:
        """Look at every job in flight once: collect, time out or resubmit it. True if any result came."""
        progressed = False
        for job_id, flight in list(self.in_flight.items()):
            if self.stop.reason:
                break
            progressed = self._check(job_id, flight) or progressed
        if self.broker_down_since is not None and self.held is None:
            self.broker_down_since = None
        return progressed

    def _check(self, job_id: str, flight: InFlight) -> bool:
        """Collect one job if it is ready, drop it past ``timeout``, resubmit it if Redis lost it."""
        now = time.monotonic()
        if flight.job.ready():
            if not self._collect(flight):
                return False
            del self.in_flight[job_id]
            self.bar.update(self.summary, len(self.in_flight), step=1)
            return True
        if self.timeout is not None and now - flight.since > self.timeout:
            del self.in_flight[job_id]
            self.summary.timed_out += 1
            self.summary.timed_out_ids.append(flight.item.id)
            self.bar.message(f"glyphq batch: {self.source}:{flight.item.line}: id {flight.item.id!r} not done "
                             f"after {self.timeout:g} s (job {job_id} keeps its place; rerun to collect it)")
            self.bar.update(self.summary, len(self.in_flight), step=1)
        elif now - flight.checked > LOST_CHECK_S:
            flight.checked = now
            if flight.job.state == "UNKNOWN":  # never queued, or lost with Redis's data
                del self.in_flight[job_id]
                self.lost.append(flight.item)
                self.bar.message(f"glyphq batch: {self.source}:{flight.item.line}: job {job_id} is not in "
                                 "Redis (never queued, or lost with its data); submitting it again")
        return False

    def _collect(self, entry: InFlight) -> bool:
        """Write the result of a job that is ready; False if it was not ready after all."""
        try:
            result = entry.job.result(timeout=10)
        except JobFailed as exc:
            self._write(entry, {"ok": False, "error_type": exc.error_type, "error": exc.message}, ok=False)
            return True
        except JobTimeout:
            return False
        except BrokerUnavailable:
            raise
        except GlyphqError as exc:
            self._write(entry, {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}, ok=False)
            return True
        if isinstance(result, dict):
            self._write(entry, {"ok": True, "result": result}, ok=True)
        else:  # e.g. a revoked job, whose "result" is the revoking exception
            self._write(entry, {"ok": False, "error_type": str(entry.job.state), "error": str(result)}, ok=False)
        return True

    def _write(self, entry: InFlight, record: dict[str, Any], ok: bool) -> None:
        item = entry.item
        self.writer.write(item.record(record, self.cfg))
        if ok:
            self.summary.done += 1
        else:
            self.summary.failed += 1
            self.bar.message(f"glyphq batch: {self.source}:{item.line}: id {item.id!r} failed: "
                             f"{record['error_type']}: {record['error']}")
