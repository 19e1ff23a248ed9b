"""A stand-in that speaks like Glyph (``glyph-tiny``), scripted to write Glyph-format outputs.

``worker.tiny.script`` sets the stand-in's weights so that each token is followed by the next one
of a chain; it loads and decodes through the real ``from_pretrained``, processor, template and
decoders. Words are from the tiny vocabulary, so the word-level tokenizer decodes them with spaces.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, png_bytes
from PIL import Image

from glyphq.celeryconfig import Settings, settings
from glyphq.producer import submit
from glyphq.producer.store import Store
from glyphq.worker.engine import EngineJob, build_messages, load
from glyphq.worker.tiny import script

GLYPHQ = str(Path(sys.executable).with_name("glyphq"))
#: Reasons in four words, then answers "ten" in GLM-4.1V's wrapper; </answer> ends the turn.
ANSWERS = "<|assistant|> <think> read the total line </think> <answer> <|begin_of_box|> ten <|end_of_box|> </answer>"
#: Reasons forever ("read the page read the page ..."), and answers once it is fed </think>.
LOOPS = "<|assistant|> <think> read the page read"
AFTER_THINKING = "</think> <answer> <|begin_of_box|> ten <|end_of_box|> </answer>"


@pytest.fixture(scope="module")
def glyph_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glyph-tiny")
    subprocess.run([sys.executable, "-m", "glyphq.worker.tiny", str(out), "--preset", "glyph-tiny"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def scripted(glyph_tiny: Path, tmp_path_factory: pytest.TempPathFactory, *chains: str) -> Path:
    out = tmp_path_factory.mktemp("scripted")
    shutil.copytree(glyph_tiny, out, dirs_exist_ok=True)
    script(out, *chains)
    return out


@pytest.fixture(scope="module")
def answering_model(glyph_tiny, tmp_path_factory) -> Path:
    return scripted(glyph_tiny, tmp_path_factory, ANSWERS)


@pytest.fixture(scope="module")
def looping_model(glyph_tiny, tmp_path_factory) -> Path:
    return scripted(glyph_tiny, tmp_path_factory, LOOPS, AFTER_THINKING)


def test_glyph_format_through_the_worker(start_worker, answering_model):
    """Answer and reasoning apart, a budget that cuts in, a cut-off output, and a session that keeps
    only the answer: through Redis and a real worker."""
    start_worker(model=answering_model)
    image = png_bytes(seed=900)
    first = submit(image, "What is the total?", session="glyph-1", max_new_tokens=64)
    budgeted = submit(image, "And the date?", session="glyph-1", max_new_tokens=64, thinking_budget=3)
    cut = submit(image, "Cut short?", max_new_tokens=4, thinking_budget=0)  # 0: no budget
    result = first.result(timeout=120)
    assert (result["answer"], result["reasoning"], result["finish_reason"]) == ("ten", "read the total line", "stop")
    assert result["thinking_tokens"] == 6 and result["thinking_budget_hit"] is False
    assert result["tokens_out"] == 10, "up to </answer>, which ends the turn"

    result = budgeted.result(timeout=120)
    assert (result["answer"], result["reasoning"], result["finish_reason"]) == ("ten", "read the", "stop")
    assert result["thinking_tokens"] == 4 and result["thinking_budget_hit"] is True
    assert result["session"] == {"id": "glyph-1", "turns_used": 1}
    turns = Store(settings).session_turns("glyph-1", 5)
    assert turns == [{"question": "What is the total?", "answer": "ten"},
                     {"question": "And the date?", "answer": "ten"}], "the answers only, never the reasoning"

    result = cut.result(timeout=120)
    assert (result["answer"], result["reasoning"], result["finish_reason"]) == ("", "read the total", "length")
    assert result["thinking_tokens"] == 4 and result["tokens_out"] == 4


def test_thinking_budget_per_row_static_and_generate(looping_model):
    """A model that never stops reasoning answers once each row's budget feeds it </think>, row by row
    in one batch, with the same tokens from the paged decoder and from generate."""
    env = {"GLYPHQ_MODEL": str(looping_model), "GLYPHQ_MAX_BATCH": "4", "GLYPHQ_DECODE_MAX_TOKENS": "512"}
    plain = load(Settings.from_env({**env, "GLYPHQ_DECODE": "generate"}))
    static = load(Settings.from_env({**env, "GLYPHQ_DECODE": "static"}))
    image = Image.open(io.BytesIO(png_bytes(seed=901)))
    jobs = [EngineJob([image], "What is the total?", 24, thinking_budget=budget) for budget in (None, 5, 9)]
    results = plain.answer(jobs, (1280, 720))
    assert [r.token_ids for r in static.answer(jobs, (1280, 720))] == [r.token_ids for r in results]
    endless, early, later = results
    assert (endless.answer, endless.finish_reason, endless.thinking_tokens) == ("", "length", 24)
    assert endless.reasoning.split()[:4] == ["read", "the", "page", "read"] and not endless.thinking_budget_hit
    assert (early.answer, early.reasoning, early.thinking_tokens) == ("ten", "read the page read", 6)
    assert (later.answer, later.thinking_tokens, later.finish_reason) == ("ten", 10, "stop")
    assert early.thinking_budget_hit and later.thinking_budget_hit


def test_history_is_plain_text_in_a_raw_content_template(answering_model):
    """GLM-4.1V's template prints an assistant's content as it is: earlier answers go in as strings."""
    engine = load(Settings.from_env({"GLYPHQ_MODEL": str(answering_model)}))
    history = [{"question": "What is the total?", "answer": "ten"}]
    prompt = engine.processor.apply_chat_template(build_messages("And the date?", history), add_generation_prompt=True,
                                                  tokenize=False)
    assert "<|assistant|>\nten<|user|>" in prompt and "'type'" not in prompt
    as_parts = [{"role": "assistant", "content": [{"type": "text", "text": "ten"}]}]
    assert "'type'" in engine.processor.apply_chat_template(as_parts, tokenize=False), "the template prints raw"
    document = build_messages("Who signed?", [], images=2, document=True)[-1]["content"]
    assert [part["type"] for part in document] == ["image", "image", "text"], "pages first, then the question"
    assert document[-1]["text"].startswith("The document is shown") and document[-1]["text"].endswith("Who signed?")


def check_model(model: Path) -> tuple[int, dict]:
    done = subprocess.run([GLYPHQ, "check-model", str(model)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout)


def test_check_model_on_the_stand_ins(glyph_tiny, tiny_model):
    code, report = check_model(glyph_tiny)
    assert code == 0 and report["format"] == "reasoning"
    tokens = report["tokens"]
    assert not tokens["<think>"]["special"] and not tokens["</answer>"]["special"] and tokens["<|user|>"]["special"]
    assert set(report["eos"]["worker"]) == {tokens[t]["id"] for t in
                                            ("<|endoftext|>", "<|user|>", "<|observation|>", "</answer>")}
    assert report["parser"]["recognised"] and report["parser"]["answer"] == "ten"
    template = report["chat_template"]
    assert template["earlier_answer_as_plain_text"] and template["assistant_parts_printed_raw"]
    assert template["generation_prompt"] == "<|assistant|>\n" and not template["thinking_switch"]
    assert report["vision"]["vision_tokens_per_a4_page"] == 16  # CLIP 32x32 in patches of 8

    code, report = check_model(tiny_model)
    assert code == 0 and report["format"] == "plain" and not report["parser"]["recognised"]
    assert report["tokens"]["<think>"]["id"] is None
