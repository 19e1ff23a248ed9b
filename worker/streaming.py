"""A row's text as it grows: new token ids in, new reasoning and answer text out, split as at the end.

:class:`TextStream` takes each decode chunk's new ids of one row (``worker.continuous``) and gives
the text they add to the reasoning and to the answer, so that the pieces, put together, are exactly
what :func:`worker.reasoning.parse` makes of the whole output once it has ended:

- :class:`Detokenizer` decodes incrementally and holds back ids that end inside a character (a byte-level
  tokenizer spells a Chinese character in two or three tokens), so no piece ever holds a replacement
  character.
- :class:`Splitter` follows the tags of Glyph's format. The box markers and any ``<|…|>`` token are never
  shown, text that could be the start of a tag or marker is held until the next piece tells, and so is
  whitespace at either end (``parse`` strips it). Text whose part is not decided yet (before the first
  ``<think>``/``</think>``, or between ``</think>`` and ``<answer>``) is held; :meth:`TextStream.finish`
  gives what is left once the final split is known.

No torch, no Redis.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from glyphq.worker.reasoning import ANSWER_END, ANSWER_START, THINK_END, THINK_START

log = logging.getLogger(__name__)

REASONING, ANSWER = "reasoning", "answer"
#: The tags and markers the splitter acts on, as ``parse`` does.
_TAG = re.compile(r"<think>|</think>|<answer>|</answer>|<\|[A-Za-z_]+\|>")
_TAGS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
_PARTIAL_MARKER = re.compile(r"<(\|[A-Za-z_]*\|?)?")
REPLACEMENT = "\ufffd"


def partial_tag_start(text: str) -> int:
    """Where a tag or ``<|…|>`` marker that ``text`` ends in the middle of starts, or ``len(text)``."""
    start = text.rfind("<")
    if start < 0:
        return len(text)
    tail = text[start:]
    if any(tag.startswith(tail) and tag != tail for tag in _TAGS) or _PARTIAL_MARKER.fullmatch(tail):
        return start
    return len(text)


class Detokenizer:
    """Decodes a row's ids piece by piece; each piece ends on a whole character."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # decoding from here gives the text's spacing right (a word-level or sentencepiece
        self.read = 0  # tokenizer spaces a token by the one before it); ids up to ``read`` are given out

    def feed(self, ids: list[int]) -> str:
        """The text that ``ids`` add, less any character they end in the middle of (held for the next)."""
        self.ids += ids
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip)) if ids else ""


class Splitter:
    """Splits growing text into reasoning and answer, the way ``worker.reasoning.parse`` splits the whole.

    ``tags`` is False for a model without reasoning tags: then everything is answer, stripped, as the
    engine does for such a model.
    """

    def __init__(self, tags: bool) -> None:
        self.phase = "before" if tags else "plain"
        self.held = ""  # text that may be the start of a tag
        self.before = ""  # text before any tag: reasoning if a think tag follows, else undecided
        self.raw = {REASONING: "", ANSWER: ""}
        self.sent = {REASONING: "", ANSWER: ""}

    def feed(self, text: str) -> dict[str, str]:
        """The reasoning and answer text that ``text`` adds (either may be empty)."""
        if self.phase == "plain":
            self.raw[ANSWER] += text
            return self._deltas()
        text = self.held + text
        cut = partial_tag_start(text)
        text, self.held = text[:cut], text[cut:]
        position = 0
        for match in _TAG.finditer(text):
            self._text(text[position:match.start()])
            self._tag(match.group())
            position = match.end()
        self._text(text[position:])
        return self._deltas()

    def finish(self, reasoning: str | None, answer: str) -> dict[str, str]:
        """What is left to give once the output has ended and its final split is known."""
        deltas = {}
        for kind, final in ((REASONING, reasoning or ""), (ANSWER, answer)):
            sent = self.sent[kind]
            if final.startswith(sent):
                deltas[kind] = final[len(sent):]
            else:  # never expected: the reader takes the final text from the result
                log.warning("the streamed %s is not a prefix of the final one (%d characters sent)", kind, len(sent))
                deltas[kind] = ""
            self.sent[kind] = final
        return deltas

    def _text(self, text: str) -> None:
        if not text:
            return
        if self.phase == "before":
            self.before += text
        elif self.phase in (REASONING, ANSWER):
            self.raw[self.phase] += text
        # "between" (after </think>, before <answer>), "undecided" and "done": held for ``finish``

    def _tag(self, tag: str) -> None:
        marker = tag not in _TAGS
        if self.phase == "before":
            if tag in (THINK_START, THINK_END):
                self.raw[REASONING] = self.before + (" " if tag == THINK_START else "")
                self.phase = REASONING if tag == THINK_START else "between"
            elif marker:
                self.before += " "
            else:  # <answer> or </answer> first: a think tag later would change the split
                self.phase = "undecided"
        elif self.phase == REASONING:
            if tag == THINK_END:
                self.phase = "between"
            else:
                self.raw[REASONING] += " " if marker or tag == THINK_START else tag
        elif self.phase == "between":
            if tag == ANSWER_START:
                self.phase = ANSWER
            elif tag == ANSWER_END:
                self.phase = "done"
        elif self.phase == ANSWER:
            if tag == ANSWER_END:
                self.phase = "done"
            else:
                self.raw[ANSWER] += " " if marker else tag

    def _deltas(self) -> dict[str, str]:
        deltas = {}
        for kind, raw in self.raw.items():
            shown = raw.strip()
            deltas[kind] = shown[len(self.sent[kind]):]
            self.sent[kind] = shown if len(shown) > len(self.sent[kind]) else self.sent[kind]
        return deltas


class TextStream:
    """One row's streamed text: :meth:`feed` each chunk's new ids, :meth:`finish` with the final split."""

    def __init__(self, tokenizer: Any, tags: bool) -> None:
        # As the engine decodes at the end: special tokens kept for a model with tags (parse removes them).
        self.detokenizer = Detokenizer(tokenizer, skip_special_tokens=not tags)
        self.splitter = Splitter(tags)

    def feed(self, ids: list[int]) -> dict[str, str]:
        """The reasoning and answer text that a chunk's new ids add."""
        return self.splitter.feed(self.detokenizer.feed(ids))

    def finish(self, reasoning: str | None, answer: str) -> dict[str, str]:
        """The rest of the reasoning and answer, from the final result."""
        return self.splitter.finish(reasoning, answer)
