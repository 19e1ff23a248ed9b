"""``glyphq check-model MODEL``: how glyphq will talk to a model, from its tokenizer and processor alone.

Run it after the first download of a real model, before a worker loads its weights: it shows what the
chat template makes of a conversation, which end and reasoning tokens the tokenizer has (with their
ids, which differ between GLM generations), the eos set the worker will stop on, the processor's pixel
limits and vision tokens per page, and whether the answer parser recognises the model's format.
No weights are read.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from PIL import Image
from transformers import AutoProcessor, GenerationConfig

from glyphq.worker import reasoning
from glyphq.worker.engine import build_messages, stop_ids

log = logging.getLogger(__name__)

#: An A4 page rendered at 72 dpi, as Glyph's default render config makes it (worker.render).
A4_72DPI = (595, 842)
_QUESTIONS = ("What is the total?", "And the date?")
_ANSWER = "ten"


def check_model(name: str) -> dict[str, Any]:
    """The check-model report for ``name`` (a hub id in the local cache, or a local path)."""
    processor = AutoProcessor.from_pretrained(name)
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    tags = reasoning.reasoning_ids(vocab)
    try:
        eos = GenerationConfig.from_pretrained(name).eos_token_id
    except OSError:  # no generation_config.json: the model's config decides
        eos = None
    special = set(tokenizer.all_special_tokens)
    return {
        "model": name,
        "format": "reasoning" if tags is not None else "plain",
        "chat_template": template_behaviour(processor),
        "tokens": {token: {"id": vocab.get(token), "special": token in special}
                   for token in dict.fromkeys((*reasoning.END_TOKENS, *reasoning.REASONING_TOKENS))},
        "eos": {"generation_config": eos, "worker": sorted(stop_ids(eos, vocab, tags is not None))},
        "vision": vision_limits(processor),
        "parser": parser_check(tokenizer, tags),
    }


def template_behaviour(processor: Any) -> dict[str, Any]:
    """The prompt of a two-turn conversation as the worker builds it, and how the template treats an
    assistant turn: glyphq passes earlier answers as strings; a template that prints content as it is
    (GLM-4.1V's) would show a list of parts as its repr."""
    history = [{"question": _QUESTIONS[0], "answer": _ANSWER}]
    prompt = processor.apply_chat_template(build_messages(_QUESTIONS[1], history, images=1),
                                           add_generation_prompt=True, tokenize=False)
    as_parts = [{"role": "user", "content": [{"type": "text", "text": _QUESTIONS[0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]}]
    parts_prompt = processor.apply_chat_template(as_parts, tokenize=False)
    template = getattr(processor, "chat_template", None) or ""
    return {
        "two_turn_prompt": prompt,
        "earlier_answer_as_plain_text": _ANSWER in prompt and "'type'" not in prompt,
        "generation_prompt": prompt.rpartition(_QUESTIONS[1])[2],
        "assistant_parts_printed_raw": "'type'" in parts_prompt,
        "thinking_switch": "enable_thinking" in template,
    }


def vision_limits(processor: Any) -> dict[str, Any]:
    """The image processor's size limits and the vision tokens of one A4 page at 72 dpi."""
    images = getattr(processor, "image_processor", None)
    limits = {key: _plain(getattr(images, key))
              for key in ("size", "patch_size", "merge_size", "min_pixels", "max_pixels")
              if getattr(images, key, None) is not None}
    image_token = getattr(processor, "image_token_id", None)
    tokens = None
    if images is not None and image_token is not None:
        text = processor.apply_chat_template(build_messages("q", [], images=1), add_generation_prompt=True,
                                             tokenize=False)
        page = Image.new("RGB", A4_72DPI, "white")
        ids = processor(text=[text], images=[page], return_tensors="pt")["input_ids"]
        tokens = int((ids == image_token).sum())
    return {"image_processor": type(images).__name__ if images is not None else None,
            "limits": limits, "vision_tokens_per_a4_page": tokens}


def _plain(value: Any) -> Any:
    """A processor setting as JSON: a size object becomes a dict of its set fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: item for key, item in value.items() if item is not None}
    return value


def parser_check(tokenizer: Any, tags: reasoning.ReasoningIds | None) -> dict[str, Any]:
    """Encode an output in Glyph's format, decode it as the worker does, and parse it back."""
    if tags is None:
        return {"recognised": False, "note": "no <think>/</think> tokens: the answer is the whole decoded output"}
    sample = (f"{reasoning.THINK_START} read the page {reasoning.THINK_END}{reasoning.ANSWER_START}"
              f"{reasoning.BOX_START} {_ANSWER} {reasoning.BOX_END}{reasoning.ANSWER_END}")
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    parsed = reasoning.parse(decoded)
    ok = parsed.answer == _ANSWER and " ".join((parsed.reasoning or "").split()) == "read the page"
    return {"recognised": ok, "sample": sample, "decoded": decoded,
            "answer": parsed.answer, "reasoning": parsed.reasoning}
