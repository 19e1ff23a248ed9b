"""A job's text as it is written: the worker appends it to a Redis stream, readers follow it.

A job submitted with ``stream=True`` gets the stream ``glyphq:stream:<job id>``. While the job decodes,
its worker child appends an entry at most every ``PUBLISH_EVERY_S`` (``tasks.serve``) with the
reasoning and answer text added since the last one (fields ``r`` and ``a``) and the entry's number
in this run of the job (``n``, from 1); when the job has ended and its outcome is stored, a last entry
``end`` with the job's state. Every append refreshes the key's TTL (``STREAM_TTL_S``, ``STREAM_END_TTL_S``
after the end), and ``MAXLEN`` caps it, so no stream outlives its job by long.

Why a stream and not pub/sub: a stream keeps what was written, so a reader that comes late, or
reconnects, reads the text from the start, and a reader never misses the end; a pub/sub message
reaches only the subscribers of that moment.

:class:`Follower` turns entries into :class:`StreamEvent` objects. A job run again (its child died, so
Redis redelivered it) starts over at ``n`` 1: the follower gives only text past what it gave already,
so a reader sees each character once. Once the job has ended, :meth:`Follower.settle` gives whatever
the entries did not, from the stored result; put together, a kind's events are exactly the result's
``reasoning`` or ``answer``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from glyphq.producer.store import stream_key

log = logging.getLogger(__name__)

#: The stream lives this long after its last entry while its job runs, and this long after its end.
STREAM_TTL_S, STREAM_END_TTL_S = 600, 60
#: Entries kept per stream (trimmed approximately). A job appends one per decode chunk at most: 8,192
#: new tokens in chunks of 16 steps make 512.
STREAM_MAXLEN = 2048
#: Shortest pause between two appends of one worker child: its decode loop pays one round trip to
#: Redis per pause at most, whatever its number of streamed rows.
PUBLISH_EVERY_S = 0.05
REASONING, ANSWER, RESULT = "reasoning", "answer", "result"


@dataclass(frozen=True)
class StreamEvent:
    """One piece of a job's streamed text: ``kind`` "reasoning" or "answer" with its ``text``, or, last,
    "result" with the job's ``result`` dict."""

    kind: str
    text: str = ""
    result: dict[str, Any] | None = None


def publish(client: redis.Redis, entries: list[tuple[str, dict[str, str]]]) -> None:
    """Append each ``(job_id, fields)`` to its job's stream, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for job_id, fields in entries:
        key = stream_key(job_id)
        pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        pipe.expire(key, STREAM_END_TTL_S if "end" in fields else STREAM_TTL_S)
    pipe.execute()


class Publisher:
    """Appends entries from a thread of its own, in the order they are sent, so that a decode loop never
    waits for Redis: :meth:`send` only queues them. A failed append is logged once, until one succeeds;
    readers then take the text from the result."""

    def __init__(self, client: Callable[[], redis.Redis]) -> None:
        self._client = client
        self._queue: queue.SimpleQueue[list[tuple[str, dict[str, str]]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failing = False

    def send(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Queue ``(job_id, fields)`` entries for appending."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glyphq-stream", daemon=True)
            self._thread.start()
        self._queue.put(entries)

    def close(self, timeout: float) -> None:
        """Append what is queued (waiting up to ``timeout`` seconds), then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while (entries := self._queue.get()) is not None:
            while True:  # what queued up meanwhile goes in the same round trip
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                entries += more
            try:
                publish(self._client(), entries)
            except Exception as exc:  # noqa: BLE001  (Redis away: the results carry the text)
                if not self._failing:
                    log.warning("could not publish streamed text (%s: %s); it comes with the results",
                                type(exc).__name__, exc)
                self._failing = True
                continue
            if self._failing:
                log.info("publishing streamed text again")
                self._failing = False


def text_entry(number: int, reasoning: str, answer: str) -> dict[str, str]:
    """The fields of a stream entry of new text (only the kinds that have some)."""
    fields = {"n": str(number)}
    if reasoning:
        fields["r"] = reasoning
    if answer:
        fields["a"] = answer
    return fields


def end_entry(state: str) -> dict[str, str]:
    """The fields of a stream's last entry: the job's final state."""
    return {"end": state}


def read(client: redis.Redis, job_id: str, after: str, block_ms: int | None = None) -> list[tuple[Any, Any]]:
    """The entries of a job's stream after entry id ``after`` ("0-0": all), waiting up to ``block_ms``
    for one if there is none (None: not at all)."""
    found: Any = client.xread({stream_key(job_id): after}, count=1024, block=block_ms)
    return list(found[0][1]) if found else []


class Follower:
    """Turns a job's stream entries into events, each character once, across runs of the job."""

    def __init__(self) -> None:
        self.last_id = "0-0"
        self.ended = False
        self.given = {REASONING: "", ANSWER: ""}  # the text given out so far
        self._run: dict[str, str] | None = None  # this run's text so far; None: its start is missing
        self._next = 1

    def take(self, entries: list[tuple[Any, Any]]) -> list[StreamEvent]:
        """The events of ``entries`` (as ``read`` returns them)."""
        events: list[StreamEvent] = []
        for entry_id, raw in entries:
            self.last_id = _text(entry_id)
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if "end" in fields:
                self.ended = True
                continue
            number = int(fields.get("n", "0"))
            if number == 1:
                self._run = {REASONING: "", ANSWER: ""}
            elif number != self._next:
                self._run = None  # trimmed or lost: the rest of this run comes from the result
            self._next = number + 1
            if self._run is not None:
                self._run[REASONING] += fields.get("r", "")
                self._run[ANSWER] += fields.get("a", "")
                events += self._advance(self._run)
        return events

    def settle(self, result: dict[str, Any]) -> list[StreamEvent]:
        """What the entries did not give of the job's final ``result``, then the result event."""
        final = {REASONING: result.get("reasoning") or "", ANSWER: result.get("answer") or ""}
        return [*self._advance(final), StreamEvent(RESULT, result=result)]

    def _advance(self, texts: dict[str, str]) -> list[StreamEvent]:
        events = []
        for kind in (REASONING, ANSWER):
            text, given = texts[kind], self.given[kind]
            if len(text) > len(given) and text.startswith(given):
                events.append(StreamEvent(kind, text[len(given):]))
                self.given[kind] = text
        return events


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
