"""Greedy decoding in slots: rows join and leave a running batch between decode steps.

One static KV cache of ``GLYPHQ_MAX_BATCH`` rows (slots) by ``GLYPHQ_DECODE_MAX_TOKENS`` columns is
allocated when the model loads. A job's prompt is prefilled eagerly (with others of similar length)
and its keys and values are copied into a free slot, from column 0. Each row then writes its next
token at its own column, so rows that started at different times decode together: a decode step
runs every active slot, and a row that ends frees its slot for the next job at once.

A step reads the slots ``[0, rows)``, rounded up to a power of two, and the columns ``[0, length)``,
rounded up to a quarter octave (``column_bucket``): a bucket. So a step costs what the longest active
row needs, not what the cache could hold.
Every per-row buffer (next token, position, column, new-token index, the repetition penalty and
thinking budget of ``worker.logits``) is one tensor of all slots; a bucket's step is a view of the
first ``rows``, so rows move between buckets without any copy. On CUDA each bucket's step is
captured once as a CUDA graph; on the CPU the same step runs eagerly, which is how the suite checks
it against ``generate``.

A successor (``worker.runtime``) starts with a provisional cache of ``PROVISIONAL_ROWS`` rows
(``allocate=False``) while its predecessor still holds the GPU, and takes the full one with
:meth:`SlotDecoder.allocate` once the predecessor has left. The provisional cache has the full
cache's columns, so a bucket's views have the same strides in both and what the compiler built for
the provisional cache serves the full one; only the CUDA graphs, which hold the cache's addresses,
are captured again.

The slots' keys and values are glyphq's own tensors (:class:`SlotCache`): of transformers' caches only
the public ``update`` contract is used, so a release that changes how its cache layers keep their
state does not reach them. The model's ``forward`` names its cache argument ``cache`` from
transformers 5.24 on and ``past_key_values`` before; :func:`cache_keyword` reads which from its signature.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from glyphq.worker.decode import ATTENTION, MIN_CACHE_LEN, _compile_decoder_layers, _without_layer_index, bucket
from glyphq.worker.logits import DecodeRules
from glyphq.worker.prompts import collate
from glyphq.worker.reasoning import ReasoningIds

log = logging.getLogger(__name__)

#: Rows of a provisional cache: batch 1, which the compiler specializes, and one more, which it
#: traces for every other batch.
PROVISIONAL_ROWS = 2


def column_bucket(n: int, limit: int, floor: int = MIN_CACHE_LEN) -> int:
    """The columns a step reads for rows of up to ``n`` tokens: ``n`` rounded up to a quarter of the
    octave it is in (1280, 1536, 1792, 2048, 2560, ...), so at most 25% more, at least ``floor`` and
    never more than ``limit``.

    Every row of a step reads as many columns as the longest one needs (the attention mask hides the
    rest), so one row past 4,096 tokens would make each row of a power-of-two bucket read 8,192.
    """
    octave = floor
    while octave < n:
        octave *= 2
    if octave > floor:
        step = octave // 8  # n is past octave / 2: steps of a quarter of that
        octave = -(-n // step) * step
    return max(n, min(octave, limit))


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s ``forward`` takes its cache: ``cache`` (transformers 5.24 and
    later) or ``past_key_values`` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class SlotCache:
    """The slots' keys and values: per decoder layer one key and one value tensor of shape
    (rows, key/value heads, columns, head dim), all columns zero until written (a column never written
    is read with weight 0, so it must be finite)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, model: Any, rows: int, columns: int) -> SlotCache:
        """A cache for ``model``'s language model: its shapes from the model's config, the model's dtype and
        device. Raises ``torch.OutOfMemoryError`` if it does not fit."""
        text = model.config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (rows, heads, columns, head_dim)
        keys = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(text.num_hidden_layers)]
        values = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(text.num_hidden_layers)]
        return cls(keys, values)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (slot), all layers, keys and values."""
        return sum(t[0].nbytes for t in (*self.keys, *self.values))

    def view(self, rows: int, columns: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's keys and values of slots ``[0, rows)``, columns ``[0, columns)``, as views."""
        return ([k[:rows, :, :columns] for k in self.keys], [v[:rows, :, :columns] for v in self.values])


class _PromptKeys:
    """A prompt pass's cache ``update``: keeps each layer's keys and values as the model hands them over and
    returns them. The pass starts from an empty cache, so they are all the keys and values of the prompts."""

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def __call__(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of layer ``index``, (batch, key/value heads, prompt length, head dim)."""
        key, value = self.keys[index], self.values[index]
        if key is None or value is None:
            raise RuntimeError(f"the prompt pass wrote nothing to the cache of layer {index}")
        return key, value


class _RowWrites:
    """A cache ``update`` that writes each row's new key and value at that row's own column.

    Called with the layer's index, or, while compiled layers are traced without one (see
    ``worker.decode._compile_decoder_layers``), layer by layer in the order of the calls.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], columns: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # each layer's (rows, heads, columns, head dim) views
        self.columns = columns  # (rows,) view of the slots' write columns
        self.rows = torch.arange(columns.shape[0], device=columns.device)
        self.next = 0

    def __call__(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int | None = None, *args: Any,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx is None:
            layer_idx = self.next
            self.next = (self.next + 1) % len(self.keys)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.columns] = key[:, :, 0]
        values[self.rows, :, self.columns] = value[:, :, 0]
        return keys, values


@dataclass
class _Step:
    """One bucket's decode step and, on CUDA, its captured graph."""

    rows: int
    length: int
    run: Any
    graph: torch.cuda.CUDAGraph | None
    uses: int = 0


@dataclass
class Admission:
    """A prompt (processor output of one row) to start in ``slot``, with its thinking budget."""

    slot: int
    prompt: dict[str, torch.Tensor]
    budget: int | None = None


class SlotDecoder:
    """Decoding state of up to ``max_batch`` rows sharing one static cache; see the module docstring.

    With ``allocate=False`` the cache starts provisional: ``PROVISIONAL_ROWS`` rows, so only slots
    below that can decode until :meth:`allocate` gives it all ``max_batch`` rows.
    """

    def __init__(self, model: Any, max_batch: int, max_tokens: int, max_new_tokens: int, pad_id: int,
                 compile_layers: bool = False, repetition_penalty: float = 1.0,
                 reasoning: ReasoningIds | None = None, allocate: bool = True) -> None:
        self.model = model
        self.device = model.device
        self.use_graphs = self.device.type == "cuda"
        self.compiled = compile_layers and _compile_decoder_layers(model)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.vocab = model.get_output_embeddings().weight.shape[0]
        model.set_attn_implementation(ATTENTION)
        self.cache_keyword = cache_keyword(model)
        self.cache_rows = max_batch if allocate else min(PROVISIONAL_ROWS, max_batch)  # rows the cache has now
        self.cache = SlotCache.allocate(model, self.cache_rows, max_tokens)
        device = self.device
        self.tokens = torch.full((max_batch, 1), pad_id, dtype=torch.long, device=device)
        self.positions = torch.zeros((max_batch, 1), dtype=torch.long, device=device)
        self.columns = torch.zeros(max_batch, dtype=torch.long, device=device)  # next column each row writes
        self.step = torch.zeros(max_batch, dtype=torch.long, device=device)  # new-token index each row makes
        self.active = torch.zeros(max_batch, dtype=torch.long, device=device)  # 1 for a row in use
        self.history = torch.full((max_batch, max_new_tokens + 1), pad_id, dtype=torch.long, device=device)
        self.rules = DecodeRules(max_batch, self.vocab, device, repetition_penalty, reasoning)
        self.slots = torch.arange(max_tokens, device=device)
        self.graphs: dict[tuple[int, int], _Step] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0

    # -- the cache ------------------------------------------------------------------------------

    @property
    def provisional(self) -> bool:
        """Whether the cache has fewer rows than there are slots (``allocate=False``, before :meth:`allocate`)."""
        return self.cache_rows < self.max_batch

    def cache_bytes(self, rows: int | None = None) -> int:
        """Bytes of a cache of ``rows`` rows (default: the rows it has now) of this decoder's columns."""
        return self.cache.row_bytes * (self.cache_rows if rows is None else rows)

    def allocate(self) -> bool:
        """Give a provisional cache all ``max_batch`` rows; False, with nothing changed, if they do not fit
        in GPU memory now. The decode steps captured so far read the provisional cache, so they are
        dropped and each is captured again when next used (:meth:`warm`). No row may be active."""
        if not self.provisional:
            return True
        if int(self.active.sum()):
            raise RuntimeError("the cache cannot grow while rows are decoding in it")
        try:
            full = SlotCache.allocate(self.model, self.max_batch, self.max_tokens)
        except torch.OutOfMemoryError:
            return False
        self.graphs.clear()
        # The old graphs' memory pool went with the last of them: capturing into it again trips an
        # internal assert of the caching allocator, so the new graphs get a pool of their own.
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.cache, self.cache_rows = full, self.max_batch
        return True

    # -- shapes ---------------------------------------------------------------------------------

    def fits(self, total_len: int) -> bool:
        """Whether one row of ``total_len`` tokens (prompt and new) fits a slot."""
        return total_len <= self.max_tokens

    def shape_for(self, rows: int, length: int) -> tuple[int, int]:
        """The (rows, columns) bucket of a step over slots ``[0, rows)`` up to column ``length``."""
        return bucket(rows, self.max_batch), column_bucket(length, self.max_tokens)

    def buckets_in_use(self) -> list[tuple[int, int]]:
        """Buckets that ran more than one step chunk, most used first: those worth capturing ahead."""
        used = [shape for shape, step in self.graphs.items() if step.uses > 1]
        return sorted(used, key=lambda shape: -self.graphs[shape].uses)

    def warm(self, rows: int, length: int) -> bool:
        """Capture (and compile) one bucket's step ahead of traffic; False if it is not a bucket here."""
        if (rows, length) != self.shape_for(rows, length) or rows > self.cache_rows or length > self.max_tokens:
            return False
        with torch.inference_mode():
            self._step(rows, length)
        return True

    # -- rows -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, admissions: list[Admission]) -> list[int]:
        """Prefill the prompts in one pass (left-padded together) and start each in its slot.
        Returns each row's first new token. The slots must be free."""
        beyond = [a.slot for a in admissions if a.slot >= self.cache_rows]
        if beyond:
            raise ValueError(f"slot {beyond[0]} is beyond the {self.cache_rows} rows of the provisional cache")
        prompts = [a.prompt for a in admissions]
        lengths = [p["input_ids"].shape[1] for p in prompts]
        inputs = collate(prompts, self.pad_id)
        logits, deltas, prompt = self._prefill(inputs)
        longest = inputs["input_ids"].shape[1]
        first: list[int] = []
        for i, (admission, length) in enumerate(zip(admissions, lengths, strict=True)):
            slot = admission.slot
            for layer, (keys, values) in enumerate(zip(self.cache.keys, self.cache.values, strict=True)):
                prompt_keys, prompt_values = prompt.layer(layer)
                keys[slot, :, :length] = prompt_keys[i, :, longest - length:]
                values[slot, :, :length] = prompt_values[i, :, longest - length:]
            rules = self.rules.view(slot, slot + 1)
            rules.start([admission.prompt["input_ids"][0]], [admission.budget])
            token = rules.choose(logits[i:i + 1].float(), 0)
            delta = 0 if deltas is None else int(deltas[i].reshape(-1)[0])
            self.tokens[slot, 0] = token[0]
            self.positions[slot, 0] = length + delta
            self.columns[slot] = length
            self.step[slot] = 1
            self.active[slot] = 1
            self.history[slot, 0] = token[0]
            first.append(int(token[0]))
        return first

    def release(self, slot: int) -> None:
        """Free ``slot``: it writes nothing more and attends to column 0 only."""
        self.active[slot] = 0
        self.columns[slot] = 0
        self.step[slot] = 0

    def tokens_of(self, slot: int, count: int) -> list[int]:
        """The first ``count`` new tokens of the row in ``slot``."""
        return [int(t) for t in self.history[slot, :count].tolist()]

    def latest(self, rows: int, steps: int) -> list[list[int]]:
        """The last ``steps`` new tokens of each of slots ``[0, rows)`` (one small device-to-host copy)."""
        since = (self.step[:rows] - steps).clamp(min=0)[:, None]
        index = (since + torch.arange(steps, device=self.device)[None, :]).clamp(max=self.max_new_tokens)
        return [[int(t) for t in row] for row in torch.gather(self.history[:rows], 1, index).tolist()]

    @torch.inference_mode()
    def decode(self, rows: int, length: int, steps: int) -> None:
        """Run ``steps`` decode steps over slots ``[0, rows)``, whose rows all fit ``length`` columns."""
        if rows > self.cache_rows:
            raise ValueError(f"{rows} rows do not fit the {self.cache_rows} rows of the provisional cache")
        step = self._step(*self.shape_for(rows, length))
        step.uses += 1
        for _ in range(steps):
            if step.graph is not None:
                step.graph.replay()
            else:
                step.run()

    # -- internals ------------------------------------------------------------------------------

    def _prefill(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, _PromptKeys]:
        """One eager prompt pass over a left-padded batch: last logits, rope offsets (or None), and the
        prompts' keys and values."""
        kwargs = dict(inputs)
        wrapper: Any = getattr(self.model, "model", None)
        keeps_offsets = getattr(wrapper, "rope_deltas", "absent") != "absent"
        if not keeps_offsets:
            kwargs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        else:
            wrapper.rope_deltas = None
        prompt = _PromptKeys(len(self.cache.keys))
        prompt_cache = DynamicCache(config=self.model.config)
        prompt_cache.update = prompt  # type: ignore[method-assign,assignment]
        kwargs[self.cache_keyword] = prompt_cache
        with torch.compiler.set_stance("force_eager"):
            out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        deltas = wrapper.rope_deltas if keeps_offsets else None
        return out.logits[:, -1], deltas, prompt

    def _view(self, rows: int, length: int) -> tuple[Any, _RowWrites]:
        """A cache object for the model that reads and writes slots ``[0, rows)``, columns ``[0, length)``:
        a ``StaticCache`` whose ``update`` is :class:`_RowWrites` on views of this decoder's cache."""
        keys, values = self.cache.view(rows, length)
        writes = _RowWrites(keys, values, self.columns[:rows])
        view = StaticCache(config=self.model.config, max_cache_len=length)
        view.update = torch.compiler.disable(writes) if self.compiled else writes  # type: ignore[method-assign,assignment]
        return view, writes

    def _step(self, rows: int, length: int) -> _Step:
        found = self.graphs.get((rows, length))
        if found is not None:
            return found
        started = time.perf_counter()
        cache, writes = self._view(rows, length)
        cache_argument = {self.cache_keyword: cache}
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        columns, step, active = self.columns[:rows], self.step[:rows], self.active[:rows]
        history, rules = self.history[:rows], self.rules.view(0, rows)
        slots, row_ids = self.slots[:length], torch.arange(rows, device=self.device)
        last = self.max_new_tokens

        def step_once() -> None:
            writes.next = 0
            attend = (slots[None, :] <= columns[:, None])[:, None, None, :]
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=attend,
                             use_cache=True, logits_to_keep=1, **cache_argument)
            chosen = rules.choose(out.logits[:, -1], step)
            history[row_ids, step.clamp(max=last)] = chosen
            tokens.copy_(chosen[:, None])
            positions.add_(active[:, None])
            columns.add_(active)
            step.add_(active)

        def run() -> None:
            if self.compiled:
                with _without_layer_index(self.model):
                    step_once()
            else:
                step_once()

        graph = self._capture(run) if self.use_graphs else None
        found = _Step(rows, length, run, graph)
        self.graphs[(rows, length)] = found
        if self.compiled:
            gc.freeze()
        elapsed = time.perf_counter() - started
        self.capture_s += elapsed
        log.info("decode graph for batch %d, cache %d ready in %.2f s", rows, length, elapsed)
        return found

    def _capture(self, run: Any) -> torch.cuda.CUDAGraph:
        """One decode step as a CUDA graph, after two warm-up steps, leaving every row's state as it was."""
        saved = [t.clone() for t in (self.tokens, self.positions, self.columns, self.step, self.history)]
        saved_rules = self.rules.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            run()
        for mine, kept in zip((self.tokens, self.positions, self.columns, self.step, self.history), saved,
                              strict=True):
            mine.copy_(kept)
        self.rules.restore(saved_rules)
        return graph
