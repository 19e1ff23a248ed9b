"""The ``glyphq.*`` tasks: thin shells over the worker modules, which do the work in the worker's engine child.

The two GPU tasks use the scheduling strategy (``tasks.gpu``, ``tasks.scheduler``): a GPU worker never runs their
bodies, it hands each job to its engine child's running batch (``tasks.serve``). The bodies answer a
job alone, for a caller that runs a task in process (``task.apply()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from glyphq.celeryconfig import ANSWER_PAGES_TASK, ANSWER_TASK, RENDER_TASK, settings
from glyphq.tasks.app import app

SCHEDULING_STRATEGY = "glyphq.tasks.gpu:strategy"
#: A message the render task can't be made into a request from fails alone (``tasks.intake``).
GUARDED_STRATEGY = "glyphq.tasks.intake:strategy"
#: Their requests: on a lost broker connection, cancelled without storing a state (``tasks.private``).
GPU_REQUEST = "glyphq.tasks.private:CancelledForRedelivery"


def image_job(job: dict[str, Any]) -> dict[str, Any]:
    """The job message of a ``glyphq.answer`` call."""
    return job


def pages_job(rendered: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The job message of a ``glyphq.answer_pages`` call: the question plus the rendered page blobs."""
    pages = {"image_keys": rendered.get("page_keys"), "image_sizes": rendered.get("page_sizes"),
             "image_bytes": rendered.get("page_bytes"), "render_s": rendered.get("render_s")}
    return {**job, **pages}


#: How each GPU task's arguments become the job message that ``worker.runtime`` answers.
JOB_MESSAGE: dict[str, Callable[..., dict[str, Any]]] = {ANSWER_TASK: image_job, ANSWER_PAGES_TASK: pages_job}


@app.task(name=ANSWER_TASK, bind=True, Strategy=SCHEDULING_STRATEGY, Request=GPU_REQUEST)
def answer(self: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Answer one image + question job and return the result dict (see README, "Results")."""
    from glyphq.worker import runtime  # torch lives only in the worker child, never in producers

    return runtime.answer_alone(image_job(job), job_id=self.request.id)


@app.task(name=RENDER_TASK, bind=True, Strategy=GUARDED_STRATEGY)
def render(self: Any, request: dict[str, Any], job_id: str) -> dict[str, Any]:
    """Render a document into page blobs (queue ``render``, on CPU); the next task in the chain answers."""
    from glyphq.producer.errors import InvalidJob
    from glyphq.tasks.blobs import render_owner
    from glyphq.worker import pages

    if render_owner(self.request.id, {"job_id": job_id}) is None:
        raise InvalidJob("job_id", f"must name the job this render step belongs to ({self.request.id!r} "
                                   f"is not '<job_id>.render'), got {job_id!r}")
    return pages.render_document(request, job_id, settings)


@app.task(name=ANSWER_PAGES_TASK, bind=True, Strategy=SCHEDULING_STRATEGY, Request=GPU_REQUEST)
def answer_pages(self: Any, rendered: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Answer a question over the pages that ``glyphq.render`` produced, all in one prompt, in order."""
    from glyphq.worker import runtime

    return runtime.answer_alone(pages_job(rendered, job), job_id=self.request.id)
