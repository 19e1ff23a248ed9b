"""One engine child of a GPU worker, started, watched and ended by the worker's main process.

The main process starts each child with public ``multiprocessing``, by ``fork``: the main process
has imported torch and transformers without touching CUDA, so the child starts warm and initialises
CUDA itself (``bench/engine_start.py`` compares this with ``forkserver``). Everything the child needs
goes in as the argument of ``tasks.serve.child_main``: its channel, the main process's pid, the settings, and for
a successor its predecessor's pid and the decode steps to warm. Nothing crosses the fork in a module
global. The main process watches the child's sentinel on the event loop that reads its reports
(``tasks.scheduler``). No torch here.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from glyphq.celeryconfig import settings
from glyphq.tasks.channel import Channel
from glyphq.tasks.serve import ChildSpec, child_main

#: How engine children are started (see the module docstring).
START_METHOD = "fork"


class EngineProcess:
    """One engine child: its process, its channel, and what the main process knows of it."""

    def __init__(self, number: int, predecessor: int | None = None, buckets: Sequence[tuple[int, int]] = ()) -> None:
        self.channel = Channel()
        spec = ChildSpec(self.channel, os.getpid(), predecessor, tuple(buckets), settings)
        context: Any = multiprocessing.get_context(START_METHOD)
        self._process: Any = context.Process(target=child_main, args=(spec,), name=f"GpuChild-{number}")
        self.started_at = 0.0  # time.monotonic() of the start
        self.ready = False  # loaded (and, for a successor, took over): jobs may be handed to it
        self.last_sent = False  # told that no more jobs will come
        self.leaving: str | None = None  # why it said it leaves (or is being replaced)
        self.killed = False
        self.status: dict[str, Any] = {}  # what it published, merged
        self._pid = 0
        self._sentinel = -1

    def start(self) -> None:
        """Start the child, and keep only the main process's ends of its channel here."""
        self._process.start()
        self._pid = int(self._process.pid)
        self._sentinel = int(self._process.sentinel)
        self.started_at = time.monotonic()
        self.channel.parent_side()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the child has exited."""
        return self._sentinel

    def exitcode(self, wait: float = 5.0) -> int | None:
        """The child's exit status (negative: the signal that ended it), once it has exited; waits up to
        ``wait`` seconds for that (its sentinel may fire a moment before it can be reaped). Reaps it."""
        self._process.join(timeout=wait)
        return self._process.exitcode  # type: ignore[no-any-return]

    def kill(self) -> None:
        """End the child now (SIGKILL); the main process learns of it through the sentinel."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Once it has exited: release its channel and process handle."""
        self.channel.close()
        self._process.join(timeout=0)
        with contextlib.suppress(ValueError):  # still running: only a kill that has not landed yet
            self._process.close()
