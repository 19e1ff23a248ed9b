"""Glyph's answer format, split the Glyph way (``worker.reasoning``), and the job fields that steer it."""

from __future__ import annotations

import pytest

from glyphq.celeryconfig import A4_PAGE_TOKENS, Settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.validation import check_thinking_budget
from glyphq.worker.reasoning import Parsed, ReasoningIds, budget_cut_in, parse, reasoning_ids, thinking_tokens


@pytest.mark.parametrize(("text", "answer", "reasoning"), [
    # GLM-4.1V's full shape, as the real tokenizer decodes it (no spaces between tags).
    ("<think>The total line says 42.</think><answer><|begin_of_box|>42<|end_of_box|></answer>",
     "42", "The total line says 42."),
    # ... and as a word-level tokenizer does (a space between every token); stop tokens at the end.
    ("<think> read the page </think> <answer> <|begin_of_box|> ten <|end_of_box|> </answer> <|user|>",
     "ten", "read the page"),
    ("The total is 42 EUR.", "The total is 42 EUR.", None),  # no tags: a model that does not reason
    ("<think>Let me look at the table.</think>", "", "Let me look at the table."),  # think only
    ("<think>Let me look at the tab", "", "Let me look at the tab"),  # cut mid-think
    ("<think>ok</think><answer><|begin_of_box|>42", "42", "ok"),  # an answer without its closing tags
    ("<think>ok</think>\n42<|endoftext|>", "42", "ok"),  # an answer without <answer>
    ("Sure.<think>ok</think><answer>42</answer>", "42", "Sure. ok"),  # text before <think> is no answer
    ("the page shows it</think><answer>42</answer>", "42", "the page shows it"),  # </think> alone
    ("<think></think><answer>42</answer>", "42", None),  # an empty reasoning is none
    ("<think>a</think><answer>42</answer><|user|>", "42", "a"),  # a trailing stop token
])
def test_parse_every_shape(text, answer, reasoning):
    assert parse(text) == Parsed(answer=answer, reasoning=reasoning)


TAGS = ReasoningIds(think_start=1, think_end=2, answer_start=3)


def test_thinking_tokens_and_budget_cut_in():
    assert reasoning_ids({"<think>": 1, "</think>": 2, "<answer>": 3}) == TAGS
    assert reasoning_ids({"<image>": 1}) is None, "a model without the tags"
    closed = [1, 7, 7, 2, 3, 9]
    assert thinking_tokens(closed, TAGS) == 4
    assert thinking_tokens([1, 7, 7], TAGS) == 3, "cut mid-think: all of it"
    assert thinking_tokens([7, 7], TAGS) == 0
    assert thinking_tokens(closed, None) == 0
    # The decoders feed </think> as new token number `budget` to a row still reasoning.
    assert budget_cut_in(closed, 3, TAGS)
    assert not budget_cut_in(closed, 4, TAGS), "it closed by itself before the budget"
    assert not budget_cut_in(closed, None, TAGS)
    assert not budget_cut_in([1, 7], 3, TAGS), "the output ended before the budget"


def test_thinking_budget_field():
    settings = Settings.from_env({})
    assert check_thinking_budget(None, 8192, settings) == settings.thinking_budget == 6144
    assert check_thinking_budget(None, 256, settings) == 192, "three quarters of a job's smaller max_new_tokens"
    assert check_thinking_budget(0, 256, settings) == 0, "0: no budget"
    assert check_thinking_budget(100, 256, settings) == 100
    with pytest.raises(InvalidJob, match=r"thinking_budget: must be less than max_new_tokens \(256\)"):
        check_thinking_budget(256, 256, settings)
    with pytest.raises(InvalidJob, match="thinking_budget: must be a non-negative integer"):
        check_thinking_budget(-1, 256, settings)
    with pytest.raises(InvalidJob, match="thinking_budget: must be a non-negative integer"):
        check_thinking_budget("many", 256, settings)
    assert check_thinking_budget(None, 8192, Settings.from_env({"GLYPHQ_THINKING_BUDGET": "0"})) == 0


def test_defaults_let_glyph_finish():
    """Glyph's budgets: 8,192 new tokens, a budget that leaves room for the answer, and a row limit
    (GLYPHQ_DECODE_MAX_TOKENS) that holds GLYPHQ_MAX_PAGES A4 pages plus every new token."""
    s = Settings.from_env({})
    assert s.max_new_tokens_limit >= 8192 and s.default_max_new_tokens == 8192
    assert s.thinking_budget < s.default_max_new_tokens
    assert s.repetition_penalty == 1.1
    assert s.decode_max_tokens >= s.max_pages * 630 + s.max_new_tokens_limit
    assert Settings.from_env({"GLYPHQ_MAX_PAGES": "10"}).decode_max_tokens == s.decode_max_tokens - 30 * A4_PAGE_TOKENS
    assert Settings.from_env({"GLYPHQ_DECODE_MAX_TOKENS": "4096"}).decode_max_tokens == 4096
