"""Keep a worker alive when Redis drops while its channel waits on BRPOP with jobs unacknowledged.

kombu 5.7's Redis channel reads the pending BRPOP reply first when it closes. On a lost connection
that read raises, so the channel stays open; Celery ignores the error and drops the transport, and
its second attempt to close the channel then fails with ``AttributeError`` while it restores the
unacknowledged messages. Celery calls that an unrecoverable error and the worker exits. A worker
that batches is nearly always in that state (it reserves more jobs than it runs), so a Redis
restart would stop it.

:func:`apply` makes the close finish on the first attempt, while the transport can still build a
client: the unacknowledged messages go back to the queue, or, if Redis is still down, stay in its
unacked hash until the visibility sweep restores them.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

_original_close = kombu_redis.Channel.close


def _close(channel: Any) -> None:
    try:
        _original_close(channel)
    except channel.connection_errors:
        if channel.closed:
            raise
        _original_close(channel)  # the BRPOP reply is gone now; this time the close runs to the end


def apply() -> None:
    """Install the close above on kombu's Redis channel (and its Sentinel subclass). Idempotent."""
    kombu_redis.Channel.close = _close  # type: ignore[method-assign]
