"""Random images and fields: `submit` accepts or refuses with InvalidJob; the worker copes with what it accepts."""

from __future__ import annotations

import io
import os
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from glyphq.celeryconfig import Settings
from faults.helpers import rational_strip_offsets_tiff, runs, tail
from glyphq.producer import InvalidJob, Job, JobFailed, submit

# Tight limits, shared by the producer here and the worker, so that accepted jobs stay small and quick.
LIMITS = {"max_new_tokens_limit": 16, "max_question_chars": 300, "max_image_bytes": 60_000,
          "max_image_pixels": 250_000}
CAP = 30  # accepted jobs; once reached, only images that cannot decode are drawn
WORKER_ERRORS = {"InvalidJob", "BlobMissing", "ModelError", "PoisonJob"}  # README: how the worker fails jobs


def _encode(fmt: str, mode: str, width: int, height: int, color: int) -> bytes:
    image = Image.new(mode, (width, height), color)
    if fmt in ("JPEG", "PPM") and mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if fmt == "ICO":  # an icon is at most 256x256 and must name its own size
        image = image.resize((min(width, 256), min(height, 256)))
        image.save(buffer, format=fmt, sizes=[image.size])
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


valid_images = st.builds(
    _encode,
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"]),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "1"]),
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    color=st.integers(0, 255),
)


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(valid_images))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


undecodable = st.binary(max_size=300)


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """Seven times in eight a value that passes, else anything: so that a fair share of jobs is accepted."""
    return st.integers(0, 7).flatmap(lambda i: anything if i == 0 else valid)


images = mostly(valid_images, st.one_of(undecodable, damaged_images()))
good_ids = st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9._:-]{1,24}\Z"))
identifiers = mostly(good_ids, st.text(max_size=140))
questions = mostly(st.text(st.characters(exclude_categories=()), min_size=1, max_size=300).filter(str.strip),
                   st.one_of(st.text(st.characters(exclude_categories=()), max_size=320), st.none(),
                             st.integers(), st.binary(max_size=8), st.just("   ")))
token_counts = mostly(st.one_of(st.none(), st.integers(1, 16)),
                      st.one_of(st.integers(-3, 20), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3),
                                st.integers(min_value=2**63)))
priorities = mostly(st.one_of(st.none(), st.integers(0, 9)),
                    st.one_of(st.integers(-2, 11), st.booleans(), st.floats(), st.text(max_size=2)))


def test_fuzzed_submit_accepts_or_refuses_and_the_worker_copes(start_worker, redis_client):
    """Scenario 10: for random inputs ``submit`` returns a Job or raises InvalidJob, nothing else.

    Every accepted job (about 30) is then answered, or failed with one of the worker's documented
    errors, by a worker that stays up and runs each of them once.
    """
    worker = start_worker(**LIMITS)
    cfg = Settings.from_env({**os.environ, **{f"GLYPHQ_{k.upper()}": str(v) for k, v in LIMITS.items()}})
    accepted: dict[str, object] = {}
    unexpected: list[str] = []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
              derandomize=False)
    @given(data=st.data(), question=questions, max_new_tokens=token_counts, priority=priorities,
           session=identifiers, job_id=identifiers)
    def attempt(data, question, max_new_tokens, priority, session, job_id) -> None:
        image = data.draw(images if len(accepted) < CAP else undecodable, label="image")
        try:
            with warnings.catch_warnings():  # as in production: a library warning is not an error
                warnings.simplefilter("ignore")
                job = submit(image, question, max_new_tokens=max_new_tokens, priority=priority, session=session,
                             job_id=job_id, settings=cfg)
        except InvalidJob as exc:
            assert str(exc).split(":")[0] in {"image", "question", "max_new_tokens", "priority", "session",
                                              "job_id"}, exc
            return
        except Exception as exc:  # noqa: BLE001  (collected: the assertion below names every one)
            unexpected.append(f"{type(exc).__name__}: {exc} <- question={question!r:.60} "
                              f"max_new_tokens={max_new_tokens!r} priority={priority!r} image={bytes(image[:16])!r}")
            return
        assert isinstance(job, Job)
        accepted[job.id] = job

    attempt()
    assert not unexpected, "submit raised something other than InvalidJob:\n" + "\n".join(unexpected[:10])
    assert accepted, "no input was accepted: the strategies are wrong"

    for job_id in accepted:
        try:
            assert isinstance(Job(job_id).result(timeout=120)["answer"], str)
        except JobFailed as exc:
            assert exc.error_type in WORKER_ERRORS, f"job {job_id} failed uncleanly: {exc}"
        assert runs(redis_client, job_id) == 1
    assert worker.proc.poll() is None, tail(worker)
    for bad in ("WorkerLostError", "exited with", "CRITICAL/"):
        assert bad not in worker.log(), tail(worker)


def test_damaged_tiff_found_by_fuzzing_is_refused_with_invalid_job():
    """Scenario 10: an input the fuzzing found (a TIFF whose StripOffsets tag is a rational) is refused cleanly."""
    with pytest.raises(InvalidJob, match="^image: "):
        submit(rational_strip_offsets_tiff(), "What is this?", max_new_tokens=4)
