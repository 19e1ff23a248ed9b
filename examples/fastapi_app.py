"""A web backend in front of glyphq: upload an image and a question, get a job id, poll for the answer.

    pip install 'glyphq[examples]'
    GLYPHQ_BROKER_URL=redis://localhost:6379/0 uvicorn fastapi_app:app --app-dir examples --port 8000

    curl -F image=@page.png -F question='What is the total?' localhost:8000/jobs      # 202 {"job_id": ...}
    curl localhost:8000/jobs/<job_id>                          # {"job_id", "state", "result"?, "error"?}

The producer side needs no torch: this process imports ``producer`` (Celery, redis-py, Pillow) only.
The handlers are plain ``def``: FastAPI runs them in its thread pool, since ``submit`` talks to Redis
synchronously. Every refusal and failure answers ``{"detail": glyphq's message, "error_type": ...}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from glyphq.celeryconfig import settings
from glyphq.producer import BrokerFull, BrokerUnavailable, InvalidJob, Job, JobExpired, JobFailed, QueueFull, submit
from glyphq.producer.images import check_image_size
from glyphq.producer.store import check_broker
from glyphq.producer.validation import check_identifier

app = FastAPI(title="glyphq example", summary="Image + question jobs answered by a vision-language model.")

#: The HTTP answer to each error an endpoint may raise: (status, Retry-After seconds or None).
#: The most specific class listed wins; one line maps a new glyphq error.
ERROR_STATUS: dict[type[Exception], tuple[int, str | None]] = {
    InvalidJob: (422, None),  # refused: the message names the field and the limit
    QueueFull: (503, "30"),  # GLYPHQ_MAX_QUEUE jobs are waiting already: come back later
    BrokerFull: (503, "30"),  # Redis is at its memory limit: the workers need time to drain it
    BrokerUnavailable: (503, "5"),
}
#: How long the check that Redis answers may take (a refused connection fails at once).
BROKER_CHECK_TIMEOUT_S = 0.5


def _error_response(request: Request, exc: Exception) -> JSONResponse:
    status, retry_after = next(ERROR_STATUS[cls] for cls in type(exc).__mro__ if cls in ERROR_STATUS)
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse({"detail": str(exc), "error_type": type(exc).__name__}, status_code=status,
                        headers=headers)


for _error in ERROR_STATUS:
    app.add_exception_handler(_error, _error_response)


def broker_answers() -> None:
    """Refuse at once with 503 when Redis does not answer, rather than after Celery's retries."""
    check_broker(settings, BROKER_CHECK_TIMEOUT_S)


@app.post("/jobs", status_code=202, dependencies=[Depends(broker_answers)])
def create_job(
    image: Annotated[UploadFile | None, File(description="the image: PNG, JPEG, WEBP, GIF, BMP or TIFF")] = None,
    # Optional here so that a missing or empty question gets glyphq's own message, not FastAPI's.
    question: Annotated[str, Form()] = "",
    max_new_tokens: Annotated[int | None, Form()] = None,
    priority: Annotated[int | None, Form(description="0 (lowest) to 9 (most urgent)")] = None,
) -> dict[str, str]:
    """Enqueue a job: 202 with its id; 413 for an image over GLYPHQ_MAX_IMAGE_BYTES; 422 when glyphq
    refuses it; 503 when Redis cannot be reached or the queue is full."""
    if image is None:
        raise InvalidJob("image", "is required: send it as the multipart file field 'image'")
    try:
        # The upload is spooled to disk by now; refuse an oversized one before reading it into memory.
        check_image_size(image.size or 0, settings)
    except InvalidJob as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None
    job = submit(image.file.read(settings.max_image_bytes + 1), question, max_new_tokens=max_new_tokens,
                 priority=priority)
    return {"job_id": job.id}


@app.get("/jobs/{job_id}", dependencies=[Depends(broker_answers)])
def get_job(job_id: str) -> dict[str, Any]:
    """The job's state, with ``result`` once it succeeded or ``error`` once it failed; 404 for unknown ids."""
    try:
        check_identifier("job_id", job_id)
    except InvalidJob:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}") from None
    job = Job(job_id)
    state = job.state
    if state == "UNKNOWN":
        raise HTTPException(status_code=404, detail=f"no job {job_id!r} (never submitted, or expired)")
    body: dict[str, Any] = {"job_id": job_id, "state": state}
    if state == "SUCCESS":
        body["result"] = job.result(timeout=10)
    elif job.ready():
        try:
            job.result(timeout=10)
        except JobFailed as exc:
            body["error"] = {"type": exc.error_type, "message": exc.message}
        except JobExpired as exc:  # its deadline passed before it started
            body["error"] = {"type": type(exc).__name__, "message": str(exc)}
    return body


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
