"""The ``glyphq.answer`` task: a thin shell over ``worker.runtime``, which runs in the worker child."""

from __future__ import annotations

from typing import Any

from producer.schema import ANSWER_TASK
from tasks.app import app


@app.task(name=ANSWER_TASK, bind=True)
def answer(self: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Answer one image + question job and return the result dict (see README, "Results")."""
    from worker import runtime  # torch lives only in the worker child, never in producers

    return runtime.answer(job, job_id=self.request.id)
