"""A web backend in front of glyphq: upload an image and a question, get a job id, poll for the answer.

    pip install 'glyphq[examples]'
    GLYPHQ_BROKER_URL=redis://localhost:6379/0 uvicorn fastapi_app:app --app-dir examples --port 8000

    curl -F image=@page.png -F question='What is the total?' localhost:8000/jobs      # 202 {"job_id": ...}
    curl localhost:8000/jobs/<job_id>                          # {"job_id", "state", "result"?, "error"?}

The producer side needs no torch: this process imports ``producer`` (Celery, redis-py, Pillow) only.
The handlers are plain ``def``: FastAPI runs them in its thread pool, since ``submit`` talks to Redis
synchronously.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from kombu.exceptions import OperationalError

from celeryconfig import settings
from producer import BrokerUnavailable, GlyphqError, InvalidJob, Job, JobFailed, QueueFull, submit
from producer.validation import check_identifier

app = FastAPI(title="glyphq example", summary="Image + question jobs answered by a vision-language model.")

_UNAVAILABLE = (BrokerUnavailable, redis.RedisError, OperationalError)


@app.post("/jobs", status_code=202)
def create_job(
    image: Annotated[UploadFile, File(description="the image: PNG, JPEG, WEBP, GIF, BMP or TIFF")],
    question: Annotated[str, Form()],
    max_new_tokens: Annotated[int | None, Form()] = None,
    priority: Annotated[int | None, Form(description="0 (lowest) to 9 (most urgent)")] = None,
) -> dict[str, str]:
    """Enqueue a job: 202 with its id; 422 when glyphq refuses it; 503 when Redis cannot be reached."""
    # Read one byte past the limit, so an oversized upload is refused without holding all of it.
    data = image.file.read(settings.max_image_bytes + 1)
    try:
        job = submit(data, question, max_new_tokens=max_new_tokens, priority=priority)
    except InvalidJob as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except QueueFull as exc:  # GLYPHQ_MAX_QUEUE jobs are waiting already: come back later
        raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "30"}) from None
    except _UNAVAILABLE as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    return {"job_id": job.id}


@app.get("/jobs/{job_id}")
def get_job(job_id: str) -> dict[str, Any]:
    """The job's state, with ``result`` once it succeeded or ``error`` once it failed; 404 for unknown ids."""
    try:
        check_identifier("job_id", job_id)
    except InvalidJob:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}") from None
    job = Job(job_id)
    try:
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
            except GlyphqError as exc:  # JobExpired: its deadline passed before it started
                if isinstance(exc, BrokerUnavailable):
                    raise
                body["error"] = {"type": type(exc).__name__, "message": str(exc)}
        return body
    except _UNAVAILABLE as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
