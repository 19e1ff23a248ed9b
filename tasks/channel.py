"""The channel between a GPU worker's main process and its child: two pipes and a flag made before the pool forks.

- ``jobs``: the main process hands over each job it reserved (task id, name, arguments, priority)
  while the child is serving. Only the main process writes it, and never waits for room: frames the
  pipe has no room for wait in the main process until the event loop finds the pipe writable
  (:meth:`Channel.write_jobs`), so a child that is still loading its model, or busy in a long step,
  never blocks the worker's event loop.
- ``reports``: the child says when a job started and when it ended. Only the child that serves writes it.
- ``draining``: set by the main process when the worker stops; every child reads it, whatever is still
  queued in the jobs pipe.

Every frame is written with one ``os.write`` of at most ``PIPE_BUF`` bytes, which Linux keeps whole,
and read with a buffer larger than the pipe, so a reader never sees part of a frame, even when the
child that read before it was killed. A message longer than a frame goes as numbered parts.
Each hand-over belongs to one serving ``epoch``: a child skips frames of another epoch, which are
jobs the main process already took back from a child that died or stopped serving.
No torch here.
"""

from __future__ import annotations

import errno
import fcntl
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
_HEADER = struct.Struct("<IIHHI")  # length of the part, epoch, part, parts, message number
_READ_BYTES = 1 << 20  # more than a pipe holds: one read takes every whole frame there is


def encode(message: dict[str, Any]) -> bytes:
    """A message as the channel sends it: compact UTF-8 JSON. Lone surrogates, which a JSON message may
    carry as escapes, pass through as ``json.loads`` reads them back."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8",
                                                                                                "surrogatepass")


class Channel:
    """Both pipes. Make it in the main process before the pool forks (``tasks.signals``)."""

    def __init__(self) -> None:
        self.jobs_r, self.jobs_w = os.pipe()
        self.reports_r, self.reports_w = os.pipe()
        for fd in (self.jobs_r, self.jobs_w, self.reports_r, self.reports_w):
            os.set_blocking(fd, False)
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) & ~fcntl.FD_CLOEXEC)
        self._draining = mmap.mmap(-1, 1)  # anonymous and MAP_SHARED: the children see the parent's write
        self._number = 0
        self._parts: dict[tuple[int, int], list[bytes]] = {}
        self._unsent: list[bytes] = []
        self._outbox: deque[tuple[int, bytes]] = deque()  # (epoch, frame) not yet written to the jobs pipe

    # -- writing --------------------------------------------------------------------------------

    def _frames(self, epoch: int, data: bytes) -> list[bytes]:
        size = FRAME_BYTES - _HEADER.size
        chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        self._number += 1
        return [_HEADER.pack(len(chunk), epoch, i, len(chunks), self._number) + chunk
                for i, chunk in enumerate(chunks)]

    def hand_over(self, epoch: int, message: dict[str, Any] | bytes) -> bool:
        """In the main process: hand one job (or control frame; bytes from :func:`encode`) to the child
        serving ``epoch``. Never blocks: returns whether every frame is in the pipe; if not, the rest
        waits for :meth:`write_jobs`."""
        data = message if isinstance(message, bytes) else encode(message)
        self._outbox.extend((epoch, frame) for frame in self._frames(epoch, data))
        return self.write_jobs()

    def write_jobs(self) -> bool:
        """In the main process: write what the jobs pipe has room for of the frames waiting. Returns
        whether none is left waiting (the event loop calls it again when the pipe is writable)."""
        while self._outbox:
            try:
                os.write(self.jobs_w, self._outbox[0][1])
            except BlockingIOError:
                return False
            self._outbox.popleft()
        return True

    def forget(self, epoch: int) -> None:
        """In the main process: drop the frames still waiting for ``epoch``, whose child stopped serving, and
        the parts of a report that child wrote only in part (the next child, forked from this process, numbers
        its reports from the same count, so a part left here would be joined to one of its reports)."""
        self._outbox = deque(item for item in self._outbox if item[0] != epoch)
        self._parts.clear()  # the main process reads only reports

    @property
    def waiting_bytes(self) -> int:
        """Bytes of frames waiting in the main process for room in the jobs pipe."""
        return sum(len(frame) for _epoch, frame in self._outbox)

    def drain(self) -> None:
        """In the main process, as the worker stops: every child starts no new job."""
        self._draining[0] = 1

    def draining(self) -> bool:
        """In a child: whether the worker is stopping."""
        return bool(self._draining[0])

    def report(self, message: dict[str, Any]) -> None:
        """In the child: tell the main process about a job. Never blocks: what does not fit now waits
        for the next call or :meth:`unsent`."""
        self._unsent += self._frames(0, encode(message))
        self._write_pending()

    def flush(self, timeout: float) -> bool:
        """In the child, before it exits: wait up to ``timeout`` seconds for room for the reports not
        yet written. Returns whether every one was written."""
        end = time.monotonic() + timeout
        while self._unsent and (left := end - time.monotonic()) > 0:
            select.select([], [self.reports_w], [], left)
            self._write_pending()
        return not self._unsent

    def _write_pending(self) -> None:
        """Write what the pipe has room for of the reports not yet written."""
        while self._unsent:
            try:
                os.write(self.reports_w, self._unsent[0])
            except BlockingIOError:
                return
            self._unsent.pop(0)

    def unsent(self) -> bytes:
        """In the child, as it stops serving: the frames of the reports the pipe had no room for, sent another
        way to the main process, which reads them with :meth:`handed_back` (a report's first parts may be in
        the pipe already)."""
        frames, self._unsent = self._unsent, []
        return b"".join(frames)

    # -- reading --------------------------------------------------------------------------------

    def receive(self, epoch: int, timeout: float = 0.0) -> list[dict[str, Any]]:
        """In the child: the jobs handed to ``epoch`` since the last call (waits up to ``timeout`` for one)."""
        return self._read(self.jobs_r, epoch, timeout)

    def reports(self) -> list[dict[str, Any]]:
        """In the main process: every report waiting in the pipe."""
        return self._read(self.reports_r, None, 0.0)

    def handed_back(self, frames: bytes) -> list[dict[str, Any]]:
        """In the main process, after :meth:`reports`: the reports in a child's :meth:`unsent` frames."""
        return self._messages(frames, None)

    def _read(self, fd: int, epoch: int | None, timeout: float) -> list[dict[str, Any]]:
        if timeout > 0:
            select.select([fd], [], [], timeout)
        data = b""
        while True:
            try:
                chunk = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:  # pragma: no cover  (a closed pipe)
                if exc.errno == errno.EBADF:
                    break
                raise
            if not chunk:
                break
            data += chunk
        return self._messages(data, epoch)

    def _messages(self, data: bytes, epoch: int | None) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, frame_epoch, part, parts, number = _HEADER.unpack_from(data, offset)
            chunk = data[offset + _HEADER.size:offset + _HEADER.size + length]
            offset += _HEADER.size + length
            if epoch is not None and frame_epoch != epoch:
                continue  # taken back from an earlier child
            key = (frame_epoch, number)
            self._parts.setdefault(key, []).append(chunk)
            if part + 1 == parts:
                message = json.loads(b"".join(self._parts.pop(key)))
                if isinstance(message, dict):
                    messages.append(message)
        return messages


_channel: Channel | None = None


def create() -> Channel:
    """In the main process, before the pool forks: the worker's channel (made once)."""
    global _channel
    if _channel is None:
        _channel = Channel()
    return _channel


def current() -> Channel | None:
    """The channel made by :func:`create` (inherited by every child), or None outside a GPU worker."""
    return _channel
