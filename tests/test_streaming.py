"""Streamed text, piece by piece: the worker's split (``worker.streaming``) and the reader's (``producer.stream``).

No Redis or worker here; tests/test_stream.py streams through them.
"""

from __future__ import annotations

import random

import pytest
from conftest import raw_job
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from glyphq.celeryconfig import settings
from glyphq.producer.errors import InvalidJob
from glyphq.producer.schema import JobMessage
from glyphq.producer.store import blob_key
from glyphq.producer.stream import Follower, StreamEvent
from glyphq.worker.reasoning import parse
from glyphq.worker.streaming import Detokenizer, Splitter, partial_tag_start

#: Outputs of every shape ``parse`` knows (tests/test_reasoning.py), a Chinese one and a long one.
OUTPUTS = [
    "<think>The total line says 42.</think><answer><|begin_of_box|>42<|end_of_box|></answer>",
    "<think> read the page </think> <answer> <|begin_of_box|> ten <|end_of_box|> </answer> <|user|>",
    "The total is 42 EUR.",
    "<think>Let me look at the table.</think>",
    "<think>Let me look at the tab",
    "<think>ok</think><answer><|begin_of_box|>42",
    "<think>ok</think>\n42<|endoftext|>",
    "Sure.<think>ok</think><answer>42</answer>",
    "the page shows it</think><answer>42</answer>",
    "<think></think><answer>42</answer>",
    "<think>a < b and <answ is not a tag</think><answer><|begin_of_box|>a <think> < b<|end_of_box|></answer>",
    "<think>发票的总额是四十二欧元。</think><answer><|begin_of_box|>四十二欧元<|end_of_box|></answer>",
    "<answer>42</answer>",
    "<think>" + " ".join(f"step {i}." for i in range(200)) + "</think>\n<answer><|begin_of_box|>"
    + " ".join(f"word{i}" for i in range(300)) + "<|end_of_box|></answer>",
]
MARKERS = ("<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>", "<|user|>",
           "<|endoftext|>")


def split_into_pieces(text: str, cuts: list[int]) -> tuple[dict[str, str], dict[str, str], int]:
    """Feed ``text`` in the pieces ``cuts`` make; (text given before the end, after it, pieces with text)."""
    splitter = Splitter(tags=True)
    during = {"reasoning": "", "answer": ""}
    with_text = 0
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        added = splitter.feed(text[start:end])
        with_text += any(added.values())
        for kind, piece in added.items():
            during[kind] += piece
    final = parse(text)
    return during, splitter.finish(final.reasoning, final.answer), with_text


@pytest.mark.parametrize("text", OUTPUTS)
def test_pieces_put_together_are_the_final_split(text):
    """Whatever the pieces, reasoning and answer come out exactly as ``parse`` splits the whole, and no
    tag, marker or part of one is ever shown."""
    final = parse(text)
    rng = random.Random(len(text))
    cuttings = [list(range(1, len(text))),  # one character at a time: every tag is split somewhere
                sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 7)))]
    for cuts in cuttings:
        during, rest, _ = split_into_pieces(text, cuts)
        assert during["reasoning"] + rest["reasoning"] == (final.reasoning or "")
        assert during["answer"] + rest["answer"] == final.answer
        shown, kept = during["reasoning"] + during["answer"], (final.reasoning or "") + final.answer
        assert not any(marker in shown for marker in MARKERS if marker not in kept), "only what parse keeps"
        assert "<|" not in shown and "\ufffd" not in shown


def test_text_comes_while_the_output_grows():
    """Glyph's format streams both parts before the end; text that could still belong to either part waits."""
    long = OUTPUTS[-1]
    during, _, with_text = split_into_pieces(long, list(range(16, len(long), 16)))
    assert during["reasoning"] == parse(long).reasoning, "all of the reasoning once </think> came"
    assert len(during["answer"]) > len(parse(long).answer) - 20, "all but the held end of the answer"
    assert with_text > 50

    undecided = Splitter(tags=True)
    assert undecided.feed("Sure, ") == {"reasoning": "", "answer": ""}, "before a think tag: reasoning or answer?"
    assert undecided.feed("<think>so") == {"reasoning": "Sure,  so", "answer": ""}, "<think> is a space, as in parse"
    plain = Splitter(tags=False)
    assert plain.feed("  The total ") == {"reasoning": "", "answer": "The total"}, "ends stripped, as at the end"
    assert plain.feed("<|x|> is") == {"reasoning": "", "answer": " <|x|> is"}, "no markers in a plain model's text"


def test_partial_tags_are_held():
    assert [partial_tag_start(t) for t in ("ab<", "ab</th", "ab<|begin_of", "ab<|end|", "ab<answer>", "a<b c",
                                           "ab")] == [2, 2, 2, 2, 10, 5, 2]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a little text, small enough that Chinese characters
    take two or three tokens each, as in GLM-4's tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<think>", "</think>"])
    tokenizer.train_from_iterator(["the total is forty two euro", "发票的总额"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_incremental_decoding_never_splits_a_character():
    tokenizer = byte_level_tokenizer()
    text = "<think>总额是多少?</think> The total is 四十二 euro, 好的。"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text) // 2 and tokenizer.decode(ids[:8]).endswith("\ufffd"), "characters span tokens"
    for size in (1, 2, 3, 16):
        detokenizer = Detokenizer(tokenizer, skip_special_tokens=False)
        pieces = [detokenizer.feed(ids[i:i + size]) for i in range(0, len(ids), size)]
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) == tokenizer.decode(ids) == text


def entry(number: int, reasoning: str = "", answer: str = "") -> tuple[bytes, dict[bytes, bytes]]:
    fields = {b"n": str(number).encode()}
    if reasoning:
        fields[b"r"] = reasoning.encode()
    if answer:
        fields[b"a"] = answer.encode()
    return f"{number}-0".encode(), fields


def test_the_follower_gives_each_character_once_across_runs():
    follower = Follower()
    assert follower.take([entry(1, "read the"), entry(2, " page", "t")]) == [
        StreamEvent("reasoning", "read the"), StreamEvent("reasoning", " page"), StreamEvent("answer", "t")]
    # The job ran again (its child died): the new run's text is given only past what was given.
    assert follower.take([entry(1, "read"), entry(2, " the page", "te")]) == [StreamEvent("answer", "e")]
    assert follower.last_id == "2-0" and not follower.ended
    follower.take([(b"3-0", {b"end": b"SUCCESS"})])
    assert follower.ended
    result = {"reasoning": "read the page", "answer": "ten"}
    assert follower.settle(result) == [StreamEvent("answer", "n"), StreamEvent("result", result=result)]


def test_a_follower_that_missed_the_start_of_a_run_waits_for_the_result():
    follower = Follower()
    assert follower.take([entry(3, "page"), entry(4, " read")]) == [], "entries 1 and 2 were trimmed"
    assert follower.settle({"reasoning": "read the page read", "answer": ""})[0] == \
        StreamEvent("reasoning", "read the page read")


def test_a_message_says_whether_to_stream_with_a_boolean():
    key = blob_key("0" * 64)
    assert JobMessage.from_dict(raw_job(key, stream=True), settings).stream is True
    assert JobMessage.from_dict(raw_job(key), settings).stream is False
    with pytest.raises(InvalidJob, match="stream: must be true or false, got 'yes'"):
        JobMessage.from_dict(raw_job(key, stream="yes"), settings)
