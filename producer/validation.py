"""Checks on job fields, shared by ``submit`` and the worker. Each failure raises ``InvalidJob``."""

from __future__ import annotations

import re
import unicodedata

from glyphq.celeryconfig import GPU_QUEUE, PRIORITY_LEVELS, Settings, is_gpu_queue
from glyphq.producer.errors import InvalidJob

_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


#: Unicode categories that draw nothing: controls, format characters (zero-width space and joiners,
#: the byte order mark, direction marks), separators (spaces, line and paragraph separators), and
#: surrogates.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Cs"})
#: Other code points that draw nothing on their own: the combining grapheme joiner, Hangul fillers,
#: Khmer inherent vowels, Mongolian and other variation selectors, and the blank Braille pattern.
_INVISIBLE_CHARS = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, *range(0x180B, 0x1810),
     *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)


def is_invisible(char: str) -> bool:
    """Whether ``char`` draws nothing: a space, a control or format character, a filler or selector."""
    return ord(char) in _INVISIBLE_CHARS or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def check_unicode_text(field: str, text: str) -> str:
    """``text`` if it encodes as UTF-8 (no lone surrogate) and has a visible character; else ``InvalidJob``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJob(field, f"cannot be encoded as UTF-8: a lone surrogate U+{ord(text[exc.start]):04X} "
                                f"at character {exc.start}") from None
    if not text.strip():
        raise InvalidJob(field, "must not be empty")
    if all(is_invisible(char) for char in text):
        shown = next(char for char in text if not char.isspace())
        raise InvalidJob(field, f"must not be empty: it holds only invisible characters, such as U+{ord(shown):04X}")
    return text


def check_question(question: object, settings: Settings) -> str:
    """Return the question if it is a string of UTF-8-encodable text with a visible character,
    within ``max_question_chars``."""
    if not isinstance(question, str):
        raise InvalidJob("question", f"must be a string, got {type(question).__name__}")
    if len(question) > settings.max_question_chars:
        raise InvalidJob(
            "question",
            f"is {len(question)} characters; the limit is {settings.max_question_chars} "
            "(GLYPHQ_MAX_QUESTION_CHARS)",
        )
    return check_unicode_text("question", question)


def check_max_new_tokens(value: object, settings: Settings) -> int:
    """Return ``value`` (or the default when None) if it is an int in 1..max_new_tokens_limit."""
    if value is None:
        return settings.default_max_new_tokens
    limit = settings.max_new_tokens_limit
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidJob("max_new_tokens", f"must be an integer from 1 to {limit}, got {value!r}")
    if not 1 <= value <= limit:
        raise InvalidJob(
            "max_new_tokens", f"must be from 1 to {limit} (GLYPHQ_MAX_NEW_TOKENS_LIMIT), got {value}"
        )
    return value


def check_priority(value: object, settings: Settings) -> int:
    """Return ``value`` (or the default when None) if it is an int in 0..9 (9 is most urgent)."""
    if value is None:
        return settings.default_priority
    top = PRIORITY_LEVELS - 1
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise InvalidJob("priority", f"must be an integer from 0 to {top} (9 is most urgent), got {value!r}")
    return value


def check_queue(value: object) -> str:
    """Return ``value`` (``gpu`` when None) if it is ``gpu`` or ``gpu.<name>``, name 1 to 64 of ``a-z 0-9 _ -``."""
    if value is None:
        return GPU_QUEUE
    if not is_gpu_queue(value):
        raise InvalidJob("queue", "must be 'gpu' or 'gpu.<name>', the name 1 to 64 characters of a-z, 0-9, _ and -, "
                                  f"got {value!r}")
    return str(value)


def check_identifier(field: str, value: object) -> str | None:
    """Return ``value`` if None or 1-128 characters of letters, digits and ``._:-``."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ID_PATTERN.match(value):
        raise InvalidJob(field, f"must be 1 to 128 characters of letters, digits and . _ : -, got {value!r}")
    return value


def check_history(value: object, session: str | None, settings: Settings) -> tuple[dict[str, str], ...]:
    """Earlier turns a job carries itself: at most ``history_turns`` of ``{"question", "answer"}``, their
    text within ``max_history_chars`` in all. A job has either a history or a session, not both."""
    if value is None or value == () or value == []:
        return ()
    if session is not None:
        raise InvalidJob("history", "cannot be combined with session: the session keeps its own turns")
    if not isinstance(value, (list, tuple)):
        raise InvalidJob("history", f"must be a list of turns, got {type(value).__name__}")
    if len(value) > settings.history_turns:
        raise InvalidJob("history", f"holds {len(value)} turns; the limit is {settings.history_turns} "
                                    "(GLYPHQ_HISTORY_TURNS)")
    turns: list[dict[str, str]] = []
    for number, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) != {"question", "answer"}:
            raise InvalidJob(f"history[{number}]", f"must be an object with question and answer, got {turn!r:.80}")
        question, answer = turn["question"], turn["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise InvalidJob(f"history[{number}]", "question and answer must be strings")
        for name, text in (("question", question), ("answer", answer)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidJob(f"history[{number}].{name}", "cannot be encoded as UTF-8 (a lone surrogate)") from None
        turns.append({"question": question, "answer": answer})
    chars = sum(len(t["question"]) + len(t["answer"]) for t in turns)
    if chars > settings.max_history_chars:
        raise InvalidJob("history", f"is {chars} characters; the limit is {settings.max_history_chars} "
                                    "(GLYPHQ_MAX_HISTORY_CHARS)")
    return tuple(turns)


MAX_DEADLINE_S = 30 * 24 * 3600


def check_deadline(value: object) -> float | None:
    """``value`` (seconds from now by which the job must have started) if None or in (0, 30 days]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DEADLINE_S:
        raise InvalidJob("deadline", f"must be seconds from now, more than 0 and at most {MAX_DEADLINE_S}, "
                                     f"got {value!r}")
    return float(value)


def check_thinking_budget(value: object, max_new_tokens: int, settings: Settings) -> int:
    """A job's thinking budget in new tokens (0: none), checked against its ``max_new_tokens``.

    None means ``GLYPHQ_THINKING_BUDGET``; when that leaves no room for an answer within the job's
    ``max_new_tokens``, the budget is three quarters of them instead.
    """
    if value is None:
        default = settings.thinking_budget
        return default if default < max_new_tokens else max_new_tokens * 3 // 4
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidJob("thinking_budget", f"must be a non-negative integer (0: no budget), got {value!r}")
    if value >= max_new_tokens:
        raise InvalidJob("thinking_budget", f"must be less than max_new_tokens ({max_new_tokens}), which leaves "
                                            f"room for the answer, or 0 for no budget; got {value}")
    return value
