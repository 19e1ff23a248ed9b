"""The channel between a GPU worker's main process and one engine child: two pipes and a flag.

The main process makes a new channel for each child it starts (``tasks.engine_process``), so frames
never outlive the child they were meant for.

- ``jobs``: the main process hands over each job it reserved (task id, name, arguments, priority) and
  control frames ("cancel" a job, "last": no more jobs will come). Only the main process writes it,
  and never waits for room: frames the pipe has no room for wait in the main process until the event
  loop finds the pipe writable (:meth:`Channel.write_jobs`), so a child that is still loading its
  model, or busy in a long step, never blocks the worker's event loop.
- ``reports``: the child says when it is ready, when a job started and ended, what its status is, and
  why it leaves. When the child exits the main process reads the rest of the pipe to its end, so no
  report written before the exit is lost.
- ``draining``: set by the main process when the worker stops; the child reads it whatever is still
  queued in the jobs pipe.

Every frame is written with one ``os.write`` of at most ``PIPE_BUF`` bytes, which Linux keeps whole,
and read with a buffer larger than the pipe, so a reader never sees part of a frame. A message longer
than a frame goes as numbered parts. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import struct
import time
from collections import deque
from typing import Any

#: Largest write the kernel keeps whole on a pipe (POSIX PIPE_BUF on Linux).
FRAME_BYTES = 4096
_HEADER = struct.Struct("<IHHI")  # length of the part, part, parts, message number
_READ_BYTES = 1 << 20  # more than a pipe holds: one read takes every whole frame there is


def encode(message: dict[str, Any]) -> bytes:
    """A message as the channel sends it: compact UTF-8 JSON. Lone surrogates, which a JSON message may
    carry as escapes, pass through as ``json.loads`` reads them back."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8",
                                                                                                "surrogatepass")


class Channel:
    """One child's pipes. The main process makes it just before it starts the child; after the start each
    side closes the ends it does not use (:meth:`parent_side`, :meth:`child_side`)."""

    def __init__(self) -> None:
        self.jobs_r, self.jobs_w = os.pipe()
        self.reports_r, self.reports_w = os.pipe()
        for fd in (self.jobs_r, self.jobs_w, self.reports_r, self.reports_w):
            os.set_blocking(fd, False)
        self._draining = mmap.mmap(-1, 1)  # anonymous and MAP_SHARED: the child sees the parent's write
        self._number = 0
        self._parts: dict[int, list[bytes]] = {}
        self._unsent: deque[bytes] = deque()  # report frames not yet written (child)
        self._outbox: deque[bytes] = deque()  # job frames not yet written (main process)
        self.ended = False  # the main process read the end of the reports pipe: the child has gone

    def parent_side(self) -> None:
        """In the main process, once the child has started: close the child's ends."""
        _close(self.jobs_r, self.reports_w)

    def child_side(self) -> None:
        """In the child, as it starts: close the main process's ends."""
        _close(self.jobs_w, self.reports_r)

    def close(self) -> None:
        """In the main process, once the child has gone."""
        _close(self.jobs_w, self.reports_r)
        self._outbox.clear()
        self._draining.close()

    # -- writing --------------------------------------------------------------------------------

    def _frames(self, data: bytes) -> list[bytes]:
        size = FRAME_BYTES - _HEADER.size
        chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        self._number += 1
        return [_HEADER.pack(len(chunk), i, len(chunks), self._number) + chunk for i, chunk in enumerate(chunks)]

    def hand_over(self, message: dict[str, Any] | bytes) -> bool:
        """In the main process: hand one job (or control frame; bytes from :func:`encode`) to the child.
        Never blocks: returns whether every frame is in the pipe; if not, the rest waits for
        :meth:`write_jobs`."""
        data = message if isinstance(message, bytes) else encode(message)
        self._outbox.extend(self._frames(data))
        return self.write_jobs()

    def write_jobs(self) -> bool:
        """In the main process: write what the jobs pipe has room for of the frames waiting. Returns
        whether none is left waiting (the event loop calls it again when the pipe is writable)."""
        try:
            return _write(self.jobs_w, self._outbox)
        except OSError:  # the child has gone: what it did not read is taken back from the report side
            self._outbox.clear()
            return True

    @property
    def waiting_bytes(self) -> int:
        """Bytes of frames waiting in the main process for room in the jobs pipe."""
        return sum(len(frame) for frame in self._outbox)

    def drain(self) -> None:
        """In the main process, as the worker stops: the child starts no new job."""
        with contextlib.suppress(ValueError):  # closed: the child has gone
            self._draining[0] = 1

    def draining(self) -> bool:
        """In the child: whether the worker is stopping."""
        return bool(self._draining[0])

    def report(self, message: dict[str, Any]) -> None:
        """In the child: tell the main process something. Never blocks: what does not fit now waits for
        the next call, or :meth:`flush`."""
        self._unsent.extend(self._frames(encode(message)))
        self.write_reports()

    def write_reports(self) -> None:
        """In the child: write what the pipe has room for of the reports not yet written."""
        _write(self.reports_w, self._unsent)

    def flush(self, timeout: float) -> bool:
        """In the child, before it exits: wait up to ``timeout`` seconds for room for the reports not yet
        written. Returns whether every one was written."""
        end = time.monotonic() + timeout
        while self._unsent and (left := end - time.monotonic()) > 0:
            select.select([], [self.reports_w], [], left)
            self.write_reports()
        return not self._unsent

    # -- reading --------------------------------------------------------------------------------

    def receive(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """In the child: the frames handed over since the last call (waits up to ``timeout`` for one)."""
        self.write_reports()
        if timeout > 0:
            select.select([self.jobs_r], [], [], timeout)
        data, _ = _read_all(self.jobs_r)
        return self._messages(data)

    def reports(self) -> list[dict[str, Any]]:
        """In the main process: every report waiting in the pipe (sets :attr:`ended` at its end)."""
        if self.ended:
            return []
        data, ended = _read_all(self.reports_r)
        self.ended = ended
        return self._messages(data)

    def _messages(self, data: bytes) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, part, parts, number = _HEADER.unpack_from(data, offset)
            chunk = data[offset + _HEADER.size:offset + _HEADER.size + length]
            offset += _HEADER.size + length
            self._parts.setdefault(number, []).append(chunk)
            if part + 1 == parts:
                message = json.loads(b"".join(self._parts.pop(number)))
                if isinstance(message, dict):
                    messages.append(message)
        return messages


def _write(fd: int, frames: deque[bytes]) -> bool:
    """Write what the pipe ``fd`` has room for of ``frames``, taking each off as it is written; returns
    whether none is left."""
    while frames:
        try:
            os.write(fd, frames[0])
        except BlockingIOError:
            return False
        frames.popleft()
    return True


def _read_all(fd: int) -> tuple[bytes, bool]:
    """Everything readable on ``fd`` now, and whether its writer has gone (end of file, or a closed fd)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return data, False
        except OSError:  # closed already
            return data, True
        if not chunk:
            return data, True
        data += chunk


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
