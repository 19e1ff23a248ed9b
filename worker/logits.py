"""From one decode step's logits to each row's next token: repetition penalty, greedy choice, thinking budget.

The same tensor operations run in the paged decoder's CUDA graphs (``worker.paged``) and, through
:class:`RulesProcessor`, in ``model.generate``, so the two paths choose the same tokens. Every
operation is in place on buffers allocated once, with no host sync, so a graph can capture it.

- Repetition penalty (Keskar et al. 2019, as transformers' ``RepetitionPenaltyLogitsProcessor``
  computes it): the logit of every token the row has seen, prompt included, is divided by the penalty
  when positive and multiplied by it when negative. Glyph is run with 1.1.
- Thinking budget: a row that reaches new token number ``budget`` without having written ``</think>``
  is fed the model's own ``</think>``, then ``<answer>``, and goes on to answer (GLM-V's benchmark
  script does the same with text; vLLM and SGLang offer it as ``thinking_token_budget``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from glyphq.worker.reasoning import ReasoningIds

#: A budget no row reaches.
NO_BUDGET = 2**62


class DecodeRules:
    """Per-row decoding state of a batch of up to ``rows`` rows over a vocabulary of ``vocab`` logits."""

    def __init__(self, rows: int, vocab: int, device: torch.device, penalty: float,
                 tags: ReasoningIds | None) -> None:
        self.penalty = penalty
        self.tags = tags
        self.seen = torch.zeros((rows, vocab), dtype=torch.bool, device=device) if penalty != 1.0 else None
        self.budget = torch.full((rows,), NO_BUDGET, dtype=torch.long, device=device)
        self.closed = torch.zeros(rows, dtype=torch.bool, device=device)  # has written </think>
        self.forced = torch.zeros(rows, dtype=torch.bool, device=device)  # was fed </think> this step

    def start(self, prompts: list[torch.Tensor], budgets: list[int | None]) -> None:
        """Reset for a new batch: row i's prompt token ids (1-D, no padding) and thinking budget."""
        device = self.budget.device
        if self.seen is not None:
            self.seen.zero_()
            rows = torch.cat([torch.full((len(ids),), i, dtype=torch.long, device=device)
                              for i, ids in enumerate(prompts)])
            self.seen[rows, torch.cat(list(prompts)).to(device)] = True
        self.budget.fill_(NO_BUDGET)
        self.budget[:len(budgets)] = torch.tensor([NO_BUDGET if b is None else b for b in budgets],
                                                  dtype=torch.long, device=device)
        self.closed.zero_()
        self.forced.zero_()

    def view(self, start: int, stop: int) -> DecodeRules:
        """The state of rows ``[start, stop)`` as rules of their own, sharing this one's buffers."""
        part = DecodeRules.__new__(DecodeRules)
        part.penalty, part.tags = self.penalty, self.tags
        part.seen = self.seen[start:stop] if self.seen is not None else None
        part.budget, part.closed = self.budget[start:stop], self.closed[start:stop]
        part.forced = self.forced[start:stop]
        return part

    def take(self, rows: torch.Tensor) -> DecodeRules:
        """The state of ``rows`` (indexes) as rules of their own, copied: :meth:`put` writes it back."""
        part = DecodeRules.__new__(DecodeRules)
        part.penalty, part.tags = self.penalty, self.tags
        part.seen = self.seen[rows] if self.seen is not None else None
        part.budget, part.closed, part.forced = self.budget[rows], self.closed[rows], self.forced[rows]
        return part

    def put(self, rows: torch.Tensor, part: DecodeRules) -> None:
        """Write the state :meth:`take` copied (and ``choose`` moved on) back to ``rows``."""
        if self.seen is not None and part.seen is not None:
            self.seen[rows] = part.seen
        self.budget[rows], self.closed[rows], self.forced[rows] = part.budget, part.closed, part.forced

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every buffer, for :meth:`restore`."""
        return [t.clone() for t in (self.seen, self.budget, self.closed, self.forced) if t is not None]

    def restore(self, saved: list[torch.Tensor]) -> None:
        """Put back what :meth:`snapshot` copied."""
        for mine, kept in zip([t for t in (self.seen, self.budget, self.closed, self.forced) if t is not None],
                              saved, strict=True):
            mine.copy_(kept)

    def choose(self, logits: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
        """Each row's next token (rows,), given its logits (rows, vocab) for new token number ``index``."""
        scores = logits.float()
        if self.seen is not None:
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalized, scores)
        chosen = scores.argmax(dim=-1)
        if self.tags is not None:
            cut = ~self.closed & (index >= self.budget)
            chosen = torch.where(cut, self.tags.think_end, chosen)
            if self.tags.answer_start is not None:
                chosen = torch.where(self.forced, self.tags.answer_start, chosen)
            self.closed |= chosen == self.tags.think_end
            self.forced.copy_(cut)
        if self.seen is not None:
            self.seen.scatter_(1, chosen[:, None], True)
        return chosen


class RulesProcessor(LogitsProcessor):
    """:class:`DecodeRules` as a ``generate`` logits processor for greedy decoding: the chosen token
    keeps score 0, every other one gets -inf. ``prompt_len`` is the (left-padded) prompt's length."""

    def __init__(self, rules: DecodeRules, prompt_len: int) -> None:
        self.rules = rules
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        chosen = self.rules.choose(scores, input_ids.shape[1] - self.prompt_len)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)
