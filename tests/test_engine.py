"""The engine on its own, and the promise that the queue path does not change its inputs."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import png_bytes
from PIL import Image

from glyphq.celeryconfig import Settings
from glyphq.producer import submit
from glyphq.worker import engine as engine_module
from glyphq.worker.engine import EngineJob, answer_within_memory, build_messages, load
from glyphq.worker.errors import ModelError
from glyphq.worker.prompts import collate


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load(Settings.from_env({"GLYPHQ_MODEL": str(tiny_model)}))


def test_queue_answer_equals_direct_answer(engine, start_worker):
    start_worker()
    questions = ["What is the total on this invoice?", "Who is the customer?", "What is the date?"]
    images = [png_bytes((1500 + 100 * i, 1000), seed=50 + i) for i in range(3)]
    for image, question in zip(images, questions, strict=True):
        via_queue = submit(image, question, max_new_tokens=16).result(timeout=60)
        (direct,) = engine.answer(
            [EngineJob([Image.open(io.BytesIO(image)).convert("RGB")], question, 16)], (1280, 720)
        )
        assert via_queue["answer"] == direct.answer
        assert via_queue["tokens_in"] == direct.tokens_in
        assert via_queue["tokens_out"] == direct.tokens_out
        assert via_queue["image_size_used"] == list(direct.image_sizes_used[0])
        assert via_queue["vision_tokens"] == direct.vision_tokens == 16


def test_history_goes_into_the_prompt(engine):
    messages = build_messages("now?", [{"question": "before?", "answer": "yes"}])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    image = Image.new("RGB", (64, 64), "white")
    (alone,) = engine.answer([EngineJob([image], "now?", 4)], (1280, 720))
    (with_history,) = engine.answer(
        [EngineJob([image], "now?", 4, [{"question": "before?", "answer": "yes"}])], (1280, 720)
    )
    assert with_history.tokens_in > alone.tokens_in


def test_max_new_tokens_is_respected(engine):
    (result,) = engine.answer([EngineJob([Image.new("RGB", (64, 64))], "q", 3)], (1280, 720))
    assert result.tokens_out <= 3


class _OutOfMemoryOnce:
    """Stands in for an engine whose first generate runs out of CUDA memory."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.boxes: list[tuple[int, int]] = []
        self.cleanups = 0

    def answer(self, jobs, box):
        self.boxes.append(box)
        if len(self.boxes) <= self.failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ["ok"]

    def cleanup(self):
        self.cleanups += 1
        return 0.0


def test_out_of_memory_retries_once_with_smaller_box():
    fake = _OutOfMemoryOnce(failures=1)
    assert answer_within_memory(fake, [], (1280, 720)) == ["ok"]
    assert fake.boxes == [(1280, 720), (640, 360)]
    assert fake.cleanups == 1


def test_out_of_memory_twice_fails_clearly():
    fake = _OutOfMemoryOnce(failures=2)
    with pytest.raises(ModelError, match=r"CUDA out of memory.*1280x720.*640x360"):
        answer_within_memory(fake, [], (1280, 720))
    assert fake.cleanups == 2


def test_missing_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        load(Settings.from_env({"GLYPHQ_MODEL": str(tmp_path / "nothing-here")}))


def test_cpu_device_and_dtype(engine):
    assert engine.device.type == "cpu"
    assert engine.dtype == torch.float32
    assert not engine.model.training
    assert engine_module.resolve_device("cpu").type == "cpu"


def test_collate_pads_rows_on_the_left_and_concatenates_pixels():
    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(2, 4)}
    long = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
            "pixel_values": torch.ones(3, 4)}
    batch = collate([short, long], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["pixel_values"].tolist() == [[0.0] * 4] * 2 + [[1.0] * 4] * 3
    text_only = {"input_ids": torch.tensor([[9]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    mixed = collate([text_only, long], pad_id=0)
    assert mixed["input_ids"].tolist() == [[0, 0, 0, 0, 9], [1, 2, 3, 4, 5]]
    assert mixed["pixel_values"].shape == (3, 4), "only the prompt with an image brings pixels"
