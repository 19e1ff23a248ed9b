"""What one iteration of the running batch does, decided from plain figures: :func:`schedule`.

``worker.continuous`` describes its rows and waiting jobs as :class:`RowState` and :class:`Candidate`,
calls :func:`schedule`, carries out the :class:`Plan` (preempt, admit, one step) and updates its rows
from what the step wrote. Nothing here touches a model, so every decision can be tested alone.

The rules, in order:

1. Every decoding row writes one more token per step, and a block holds ``BLOCK_TOKENS`` of them. If
   the free blocks cannot give each decoding row its next token, rows are preempted, least urgent
   (highest ``priority``) then youngest (latest ``order``) first, until they can: a preempted row
   gives all its blocks back and starts again later from its prompt.
2. If none was preempted, waiting jobs are admitted most urgent, then oldest, first, while a row is
   free (the last ``reserved`` free rows only for jobs of ``urgent_priority`` or more urgent; a more
   urgent job whose pages are not ready keeps a row) and the free blocks, beyond what the decoding
   rows need next, hold the job's prompt and a first stretch of its answer (``first_stretch``
   tokens). Blocks a job shares (kept blocks its prompt begins with: ``cached`` tokens) need not be
   free, except those held by no row, which were counted as free. Admission stops at the first job
   that does not fit, so no less urgent job overtakes it. A job whose next uncached block another row
   is computing now (``computing``), or a job admitted before it in this plan, waits as one whose pages
   are not ready does: it shares that block once it is kept, instead of computing it a second time.
   An urgent job (``urgent_priority`` or more urgent) that finds the blocks short takes them from rows
   less urgent than itself, least urgent then youngest first, as in rule 1; if all of theirs would
   not be enough, none is preempted and it waits as any job does. So an urgent job never waits for
   long answers to end, however full the pool.
3. Prompt chunks: rows still prefilling, then those just admitted, most urgent first, take prompt
   tokens in order until ``chunk_tokens`` are taken.
4. A step with prompt chunks decodes one token of each decoding row beside them. Without, the
   decoding rows take up to ``check_every`` steps (no more than any row has left, nor than the free
   blocks hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glyphq.worker.blocks import BLOCK_TOKENS, blocks_for


@dataclass(frozen=True)
class RowState:
    """A row in the running batch: ``cached`` tokens in the cache, of a prompt of ``prompt`` tokens; it
    holds ``blocks`` blocks and may write ``left`` more new tokens. ``decoding`` once its prompt is in.
    ``frees``: the blocks its preemption would free (those no other row shares; default ``blocks``)."""

    key: Any
    priority: int
    order: int
    cached: int
    prompt: int
    blocks: int
    left: int
    decoding: bool
    frees: int | None = None

    @property
    def freed(self) -> int:
        return self.blocks if self.frees is None else self.frees


@dataclass(frozen=True)
class Candidate:
    """A waiting job, in the order of urgency: its prompt's tokens, or ``ready`` False while its pages
    are still being prepared. ``cached``: prompt tokens it would share from kept blocks, ``shared_free``
    of those blocks counted as free now; ``needs``: the key of its first block to compute (None: none
    is keyed)."""

    key: Any
    priority: int
    order: int
    prompt: int
    ready: bool = True
    cached: int = 0
    shared_free: int = 0
    needs: Any = None


@dataclass
class Plan:
    """What one iteration does: rows to preempt, jobs to admit (each holding blocks for its prompt and
    ``first_stretch``), prompt chunks ``(key, start, end)``, and decode ``steps`` (1 beside chunks)."""

    preempt: list[Any] = field(default_factory=list)
    admit: list[Any] = field(default_factory=list)
    chunks: list[tuple[Any, int, int]] = field(default_factory=list)
    steps: int = 0


def _growth(rows: list[RowState], steps: int) -> int:
    """Blocks the decoding rows need beyond those they hold to write ``steps`` more tokens each."""
    return sum(max(0, blocks_for(r.cached + steps) - r.blocks) for r in rows if r.decoding)


def _victims(rows: list[RowState], priority: int, missing: int) -> list[RowState]:
    """Rows less urgent than ``priority`` whose preemption frees ``missing`` blocks (what each holds and
    would take next), least urgent then youngest first; none if all of them would not be enough."""
    victims: list[RowState] = []
    freed = 0
    for row in sorted((r for r in rows if r.priority > priority), key=lambda r: (r.priority, r.order), reverse=True):
        if freed >= missing:
            break
        victims.append(row)
        freed += row.freed + _growth([row], 1)
    return victims if freed >= missing else []


def schedule(rows: list[RowState], waiting: list[Candidate], free_blocks: int, max_rows: int, reserved: int,
             urgent_priority: int, chunk_tokens: int, check_every: int, first_stretch: int,
             computing: set[Any] | None = None) -> Plan:
    """The plan of one iteration; see the module docstring. ``waiting`` is in order of urgency;
    ``computing``: the keys of the blocks rows still prefilling will fill."""
    plan = Plan()
    live = list(rows)
    computing = set(computing or ())
    while live and _growth(live, 1) > free_blocks:
        victim = max(live, key=lambda r: (r.priority, r.order))
        live.remove(victim)
        free_blocks += victim.freed
        plan.preempt.append(victim.key)
    admitted: list[Candidate] = []
    if not plan.preempt:
        taken = 0  # blocks the admitted jobs take
        pending = 0
        for job in waiting:
            room = max_rows - len(live) - (0 if job.priority <= urgent_priority else reserved)
            if len(admitted) + pending >= room:
                break
            if not job.ready or (job.needs is not None and job.needs in computing):
                pending += 1
                continue
            need = blocks_for(job.prompt + first_stretch) - job.cached // BLOCK_TOKENS + job.shared_free
            spare = free_blocks - taken - _growth(live, 1)
            if need > spare and job.priority <= urgent_priority:
                for victim in _victims(live, job.priority, need - spare):
                    live.remove(victim)
                    free_blocks += victim.freed
                    plan.preempt.append(victim.key)
                spare = free_blocks - taken - _growth(live, 1)
            if need > spare:
                break
            taken += need
            admitted.append(job)
            if job.needs is not None:
                computing.add(job.needs)
        plan.admit = [job.key for job in admitted]
        free_blocks -= taken
    budget = chunk_tokens
    prefilling = sorted((r for r in live if not r.decoding), key=lambda r: (r.priority, r.order))
    for key, done, prompt in [(r.key, r.cached, r.prompt) for r in prefilling] + [(j.key, j.cached, j.prompt)
                                                                                   for j in admitted]:
        if budget <= 0:
            break
        take = min(prompt - done, budget)
        plan.chunks.append((key, done, done + take))
        budget -= take
    decoding = [r for r in live if r.decoding]
    if plan.chunks:
        plan.steps = 1
    elif decoding:
        steps = max(1, min([check_every] + [r.left for r in decoding]))
        while steps > 1 and _growth(decoding, steps) > free_blocks:
            steps -= 1
        plan.steps = steps
    return plan
