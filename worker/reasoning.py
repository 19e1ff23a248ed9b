"""Glyph's answer format: reasoning first, in ``<think>…</think>``, then the answer.

GLM-4.1V, Glyph's architecture, wraps the final answer as ``<answer><|begin_of_box|>42<|end_of_box|></answer>``
(zai-org/GLM-V, ``glmv_reward/README.md``). ``<think>`` and the other tags are added tokens but not
special ones, so a decode that skips special tokens keeps them; Glyph's own evaluation scripts decode
keeping them and strip the reasoning and the ``<|…|>`` markers themselves (thu-coai/Glyph,
``evaluation/longbench/scripts/clear_pred.py``). :func:`parse` does the same, for every shape a
model's output can take.

Token ids differ between GLM generations, so everything here is looked up by name. No torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
BOX_START, BOX_END = "<|begin_of_box|>", "<|end_of_box|>"
#: The tags of the format, in the order a complete output has them.
REASONING_TOKENS = (THINK_START, THINK_END, ANSWER_START, BOX_START, BOX_END, ANSWER_END)
#: Tokens that end a GLM-4.1V turn: Glyph stops on the first three of ``scripts/vlm_inference.py``'s
#: list (``<|endoftext|>``, ``<|user|>``, ``</answer>``), GLM-4.1V's eos list adds ``<|observation|>``.
END_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>", ANSWER_END)

_MARKER = re.compile(r"<\|[A-Za-z_]+\|>")  # <|user|>, <|begin_of_box|>, <|endoftext|>, ...


@dataclass(frozen=True)
class Parsed:
    """A model's output split the Glyph way."""

    answer: str  # the final answer only ("" when the output ended before one)
    reasoning: str | None  # the reasoning trace, None when there was none


def parse(text: str) -> Parsed:
    """Split a decoded output (added tokens kept) into its final answer and its reasoning.

    - Everything before ``</think>`` is reasoning, less the ``<think>`` tag; text a model writes
      before ``<think>`` is no answer, so it stays with the reasoning.
    - Without ``</think>``: after a ``<think>`` the output was cut mid-thought, so there is no answer
      yet; without any tag the whole text is the answer (and there is no reasoning).
    - The answer is what follows ``<answer>`` (or ``</think>``), up to ``</answer>`` if it came, with
      the box markers and any ``<|…|>`` stop or role token removed.
    """
    head, closed, tail = text.partition(THINK_END)
    if closed:
        reasoning, answer = head, tail
    elif THINK_START in text:
        reasoning, answer = text, ""
    else:
        reasoning, answer = None, text
    if reasoning is not None:
        reasoning = _clean(reasoning.replace(THINK_START, " "))
    if ANSWER_START in answer:
        answer = answer.partition(ANSWER_START)[2]
    answer = answer.partition(ANSWER_END)[0]
    return Parsed(answer=_clean(answer), reasoning=reasoning or None)


def _clean(text: str) -> str:
    return _MARKER.sub(" ", text).strip()


@dataclass(frozen=True)
class ReasoningIds:
    """The ids of a model's reasoning tags, looked up by name in its tokenizer."""

    think_start: int
    think_end: int
    answer_start: int | None  # fed after a forced </think> when the model has it


def reasoning_ids(vocab: Mapping[str, int]) -> ReasoningIds | None:
    """The reasoning tags of a tokenizer's vocabulary (``tokenizer.get_vocab()``, added tokens
    included), or None for a model that does not write ``<think>…</think>`` (LLaVA, Qwen2-VL, ...)."""
    if THINK_START not in vocab or THINK_END not in vocab:
        return None
    return ReasoningIds(think_start=vocab[THINK_START], think_end=vocab[THINK_END],
                        answer_start=vocab.get(ANSWER_START))


def end_ids(vocab: Mapping[str, int]) -> set[int]:
    """The ids of ``END_TOKENS`` that the vocabulary has."""
    return {vocab[token] for token in END_TOKENS if token in vocab}


def thinking_tokens(ids: list[int], tags: ReasoningIds | None) -> int:
    """How many of the new tokens ``ids`` were reasoning: up to and including ``</think>``, or all of
    them when the output was cut mid-thought; 0 for a model without the tags or an output without them."""
    if tags is None:
        return 0
    if tags.think_end in ids:
        return ids.index(tags.think_end) + 1
    return len(ids) if tags.think_start in ids else 0


def budget_cut_in(ids: list[int], budget: int | None, tags: ReasoningIds | None) -> bool:
    """Whether the thinking budget ended the reasoning of ``ids``: the decoders feed ``</think>`` as new
    token number ``budget`` (0-based) to a row that has not written one by then (``worker.logits``)."""
    if tags is None or budget is None or len(ids) <= budget:
        return False
    return ids[budget] == tags.think_end and tags.think_end not in ids[:budget]
