"""What the engine child is handed of a Celery request, and what the result backend records of it.

No torch here, and nothing of the worker's processes: the main process and the engine child both use it.
"""

from __future__ import annotations

from typing import Any

from celery.app.task import Context

from glyphq.producer.errors import InvalidJob
from glyphq.tasks.channel import encode


def redis_priority(request: Any) -> int:
    """The message's Redis priority (0 is most urgent, see ``producer.submit``)."""
    priority = (request.delivery_info or {}).get("priority")
    return int(priority) if isinstance(priority, int) else 9


def job_message(request: Any) -> dict[str, Any]:
    """What the child needs of a request: id, task, arguments, and what the result backend records.
    Raises ``InvalidJob`` if the arguments are not a list and an object."""
    args, kwargs = request.args, request.kwargs
    if not isinstance(args, (list, tuple)):
        raise InvalidJob("args", f"must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise InvalidJob("kwargs", f"must be an object, got {type(kwargs).__name__}")
    delivery = request.delivery_info or {}
    return {"id": request.id, "task": request.name, "args": list(args),
            "kwargs": dict(kwargs), "priority": redis_priority(request),
            "hostname": request.hostname,
            "delivery_info": {"routing_key": delivery.get("routing_key"), "priority": delivery.get("priority"),
                              "redelivered": bool(delivery.get("redelivered"))},
            "group": getattr(request, "group", None), "parent_id": getattr(request, "parent_id", None),
            "root_id": getattr(request, "root_id", None)}


def encoded(request: Any, max_bytes: int) -> bytes:
    """The request's message as the channel carries it; raises ``InvalidJob`` if it is larger than
    ``max_bytes`` (``GLYPHQ_MAX_MESSAGE_BYTES``) or its arguments are not a job's."""
    data = encode(job_message(request))
    if len(data) > max_bytes:
        raise InvalidJob("message", f"is {len(data)} bytes, more than the worker's limit of "
                                    f"{max_bytes} (GLYPHQ_MAX_MESSAGE_BYTES)")
    return data


def context(message: dict[str, Any]) -> Context:
    """A handed-over job's request as the result backend records it (``result_extended``)."""
    m = message
    return Context(id=str(m.get("id")), task=m.get("task"), args=m.get("args"), kwargs=m.get("kwargs"),
                   hostname=m.get("hostname"), retries=m.get("retries") or 0,
                   delivery_info=m.get("delivery_info") or {}, group=m.get("group"),
                   parent_id=m.get("parent_id"), root_id=m.get("root_id"), chord=None, ignore_result=False)
