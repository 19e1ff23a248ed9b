"""Greedy decoding with a static KV cache, each decode step replayed as one CUDA graph.

Plain ``generate`` launches a few thousand small kernels per decode step from Python and waits on the
GPU every step; on a 10B model the GPU mostly idles. Here the prompt is prefilled eagerly, copied into
a preallocated cache, and then every decode step (embedding, all layers, lm_head, the choice of the
next token with its repetition penalty and thinking budget (``worker.logits``), and the bookkeeping
for the next step) is one ``CUDAGraph.replay()``. The host looks at the tokens only every
``CHECK_EVERY`` steps, to stop once every row has ended.

Shapes are bucketed so steady traffic reuses a few graphs: the batch is padded to a power of two (up
to ``GLYPHQ_MAX_BATCH``) and the cache length to a power of two (up to ``GLYPHQ_DECODE_MAX_TOKENS``).
A batch starts in the bucket with room for ``START_NEW_TOKENS`` new tokens and moves to longer ones
as its rows grow, so a step costs what the answers so far need, not what ``max_new_tokens`` allows.
One cache of the largest shape is allocated when the model loads; every bucket is a view of it, so
GPU memory does not grow with traffic. A graph is captured the first time its bucket is used (a
fraction of a second); nothing is compiled, so a new child has nothing to warm up but that.

On CPU the same steps run without a graph, which is how the suite checks them against ``generate``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from glyphq.worker.logits import DecodeRules
from glyphq.worker.prompts import collate
from glyphq.worker.reasoning import ReasoningIds

log = logging.getLogger(__name__)

ATTENTION = "glyphq_static"
CHECK_EVERY = 16  # decode steps between looks at the tokens (each look waits for the GPU)
MIN_CACHE_LEN = 256
#: New tokens a batch starts with room for; it moves to a longer bucket as it needs one.
START_NEW_TOKENS = 512


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The smallest power of two (at least ``floor``) that holds ``n``, but never more than ``limit``."""
    size = floor
    while size < n:
        size *= 2
    return max(n, min(size, limit))


#: Padding a prompt pass may spend, as a share of the real prompt tokens it runs.
PREFILL_PADDING = 0.125


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indexes of prompts to prefill together: longest first, each group with at most ``PREFILL_PADDING``
    padding (its longest prompt times its size, over its tokens)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group is not None and lengths[group[0]] * (len(group) + 1) <= (1 + PREFILL_PADDING) * (
                sum(lengths[j] for j in group) + lengths[i]):
            group.append(i)
        else:
            groups.append([i])
    return groups


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row, reading each key/value head once for its query heads.

    ``sdpa`` with a mask first repeats every key/value head for each query head that shares it (GLM-4
    has 16 query heads per key/value head), which at batch 32 over a 2,048-slot cache moves gigabytes
    per decode step. Anything else (the prompt, the vision tower) goes to ``sdpa`` unchanged.
    """
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim**-0.5)
    scores = scores.masked_fill(~attention_mask.reshape(batch, 1, 1, -1), float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)  # (batch, kv_heads, group, dim)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION, grouped_decode_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the prompt's masks are built as for sdpa


def _compile_decoder_layers(model: Any) -> bool:
    """``torch.compile`` every decoder layer of the language model; False if it has no ``layers``.

    The layers share their code, so they share compiled graphs: compiling takes one layer's time, not
    forty. For that no layer may differ from the others in what the compiler sees, and the only
    difference is the attention's ``layer_idx``, which picks the layer's part of the cache. So while
    a step is traced, ``layer_idx`` is None on every layer and the cache update, which runs between
    two compiled graphs, takes the layers in the order they call it (:class:`_LayersInOrder`).

    Batch and cache length are traced as dynamic, so one compilation serves every bucket, except
    batch 1, which the compiler always specializes: at most two per graph in all. For that a size
    must not share its symbol with another one that happens to be equal when it is first traced
    (the compiler's "duck shaping"): batch 2 equals GLM-4.1V-9B's 2 key/value heads, and a trace at
    batch 2 would be traced again at batch 4, seconds in a successor taking over (``worker.slots``).
    Inductor keeps what it built on disk (``GLYPHQ_COMPILE_CACHE_DIR``), so the next child of the
    worker starts warm.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if not layers or not all(hasattr(getattr(layer, "self_attn", None), "layer_idx") for layer in layers):
        return False
    from torch.fx.experimental import _config as shapes

    shapes.use_duck_shape = False
    for layer in layers:
        layer.compile(dynamic=True)
    return True


class _LayersInOrder:
    """A cache's ``update`` for layers traced without their index: the n-th call of a step is layer n."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.next = 0

    def __call__(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int | None = None, *args: Any,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[self.next]
        self.next = (self.next + 1) % len(self.layers)
        return layer.update(key, value)  # type: ignore[no-any-return]


@contextmanager
def _without_layer_index(model: Any) -> Iterator[None]:
    """Every decoder layer's attention with ``layer_idx`` None, for tracing (see ``_compile_decoder_layers``)."""
    attentions = [layer.self_attn for layer in model.get_decoder().layers]
    indexes = [attention.layer_idx for attention in attentions]
    for attention in attentions:
        attention.layer_idx = None
    try:
        yield
    finally:
        for attention, index in zip(attentions, indexes, strict=True):
            attention.layer_idx = index


@dataclass
class _Graph:
    """One captured decode step for a (batch, cache length) bucket, with the buffers it reads and writes."""

    cache: Any
    tokens: torch.Tensor  # (B, 1) the token each row feeds in next
    positions: torch.Tensor  # (B, 1) its position
    valid: torch.Tensor  # (B, L) bool: cache slots a row may attend to (its padding is False)
    step: torch.Tensor  # () index into ``history`` of the token being produced
    history: torch.Tensor  # (B, T) generated tokens
    rules: DecodeRules  # repetition penalty and thinking budget, per row
    graph: torch.cuda.CUDAGraph | None
    run: Any  # the step itself, for CPU (no graph)
    uses: int = 0  # batches decoded with it


def _grow(old: _Graph, new: _Graph) -> _Graph:
    """Carry a batch mid-decode from one bucket to a longer one of the same rows and return it.

    Every bucket's cache is a view of one allocation, each slot at the same place, so the keys and
    values stay where they are; the step's buffers and the cache's write positions move.
    """
    length = old.valid.shape[1]
    for mine, theirs in zip(list[Any](new.cache.layers), list[Any](old.cache.layers), strict=True):
        mine.cumulative_length.copy_(theirs.cumulative_length)
    new.valid.fill_(True)
    new.valid[:, :length] = old.valid
    for mine, theirs in ((new.tokens, old.tokens), (new.positions, old.positions), (new.step, old.step),
                         (new.history, old.history)):
        mine.copy_(theirs)
    new.rules.copy_(old.rules)
    return new


class StaticDecoder:
    """Greedy decoding over a model's static cache; ``generate(inputs, max_new_tokens)`` like ``model.generate``.

    Works for decoder models whose multimodal wrapper takes ``position_ids`` of shape (B, 1) for text
    tokens and keeps any rope offset of the prompt in ``model.model.rope_deltas`` (GLM-4V, Qwen-VL),
    or has none (LLaVA over Llama).
    """

    def __init__(self, model: Any, max_batch: int, max_tokens: int, max_new_tokens: int, pad_id: int,
                 compile_layers: bool = False, repetition_penalty: float = 1.0,
                 reasoning: ReasoningIds | None = None) -> None:
        self.model = model
        self.device = model.device
        self.use_graphs = self.device.type == "cuda"
        self.compiled = compile_layers and _compile_decoder_layers(model)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.repetition_penalty = repetition_penalty
        self.reasoning = reasoning
        self.vocab = model.get_output_embeddings().weight.shape[0]
        model.set_attn_implementation(ATTENTION)
        self.cache = self._allocate(max_batch, max_tokens)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0

    # -- shapes ---------------------------------------------------------------------------------

    def fits(self, batch: int, total_len: int) -> bool:
        """Whether ``batch`` rows of ``total_len`` tokens (prompt and new) fit the preallocated cache."""
        return batch <= self.max_batch and total_len <= self.max_tokens

    def shape_for(self, batch: int, total_len: int) -> tuple[int, int]:
        """The (batch, cache length) bucket for ``batch`` rows of up to ``total_len`` tokens."""
        return bucket(batch, self.max_batch), bucket(total_len, self.max_tokens, MIN_CACHE_LEN)

    def lengths_for(self, prompt_len: int, max_new_tokens: int) -> list[int]:
        """The cache lengths a batch decodes in, shortest first: room for ``START_NEW_TOKENS`` after the
        prompt, doubled as the rows grow, up to the bucket of ``prompt_len + max_new_tokens``.

        A step reads every slot of its bucket, so an answer that ends early never pays for the room
        its ``max_new_tokens`` would have needed (at batch 16 on the H200: 7.6 ms a step over 2,048
        slots, 11.1 ms over 16,384).
        """
        final = bucket(prompt_len + max_new_tokens, self.max_tokens, MIN_CACHE_LEN)
        lengths = [min(final, bucket(prompt_len + min(max_new_tokens, START_NEW_TOKENS), self.max_tokens,
                                     MIN_CACHE_LEN))]
        while lengths[-1] < final:
            lengths.append(min(final, bucket(lengths[-1] + 1, self.max_tokens)))
        return lengths

    def buckets_in_use(self) -> list[tuple[int, int]]:
        """The buckets that decoded more than one batch, most used first: those worth capturing ahead.
        (One batch is typically the small first one after a start, or a warm-up.)"""
        used = [shape for shape, state in self.graphs.items() if state.uses > 1]
        return sorted(used, key=lambda shape: -self.graphs[shape].uses)

    def warm(self, rows: int, length: int) -> bool:
        """Capture (and compile) the step of one bucket ahead of traffic; False if it is not a bucket here."""
        if (rows, length) != self.shape_for(rows, length) or not self.fits(rows, length):
            return False
        with torch.inference_mode():
            self._graph(rows, length)
        return True

    # -- the loop -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[dict[str, Any]], max_new_tokens: int, eos_ids: set[int],
                 budgets: list[int | None] | None = None) -> torch.Tensor:
        """Greedy tokens (B, n) after each prompt (processor outputs of one row each); rows stop at ``eos_ids``.
        ``budgets`` are the rows' thinking budgets (None: none), see ``worker.logits``."""
        batch = len(prompts)
        prompt_lengths = [prompt["input_ids"].shape[1] for prompt in prompts]
        lengths = torch.tensor(prompt_lengths, device=self.device)
        prompt_len = max(prompt_lengths)
        rows, _ = self.shape_for(batch, prompt_len + max_new_tokens)
        # Every bucket this batch may grow into is captured now: a capture writes into the cache.
        states = [self._graph(rows, length) for length in self.lengths_for(prompt_len, max_new_tokens)]
        for each in states:
            each.uses += 1
        state = states.pop(0)
        state.rules.start([prompt["input_ids"][0] for prompt in prompts], budgets or [None] * batch)
        first, rope_deltas = self._prefill(prompts, prompt_lengths, state)

        state.history[:batch, 0] = first
        state.history[batch:, 0] = self.pad_id
        state.tokens[:batch, 0] = first
        state.tokens[batch:, 0] = self.pad_id
        start = lengths[:, None] if rope_deltas is None else lengths[:, None] + rope_deltas
        state.positions[:batch] = start
        state.positions[batch:] = prompt_len
        state.valid.fill_(True)
        # Prompts end at slot prompt_len - 1: each row's padding is on its left.
        state.valid[:batch, :prompt_len] = torch.arange(prompt_len, device=self.device) >= prompt_len - lengths[:, None]
        state.step.fill_(1)

        eos = torch.tensor(sorted(eos_ids), device=self.device, dtype=torch.long)
        produced = 1
        while produced < max_new_tokens:
            steps = min(CHECK_EVERY, max_new_tokens - produced)
            while prompt_len + produced + steps > state.valid.shape[1]:
                state = _grow(state, states.pop(0))
            for _ in range(steps):
                if state.graph is not None:
                    state.graph.replay()
                else:
                    state.run()
                produced += 1
            if eos.numel() and bool(torch.isin(state.history[:batch, :produced], eos).any(dim=1).all()):
                break
        return state.history[:batch, :produced].clone()

    def _prefill(self, prompts: list[dict[str, Any]], lengths: list[int], state: _Graph
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the prompts (of ``lengths`` tokens) eagerly and put their keys and values into the static
        cache, each prompt ending at the slot of the longest one's last token. Returns each row's first
        token (chosen by ``state.rules``) and the model's rope offsets (or None).

        Prompts of similar length run together (:func:`prefill_groups`), so a batch of mixed page sizes
        does not spend its prefill on padding.
        """
        batch, prompt_len = len(prompts), max(lengths)
        last_logits = torch.zeros((state.tokens.shape[0], self.vocab), dtype=torch.float32, device=self.device)
        rope_deltas: torch.Tensor | None = None
        statics: list[Any] = list(state.cache.layers)
        for static in statics:  # slots left of a shorter prompt are padding: make them zeros, not stale values
            static.keys[:batch, :, :prompt_len].zero_()
            static.values[:batch, :, :prompt_len].zero_()
            static.cumulative_length.fill_(prompt_len)
        for group in prefill_groups(lengths):
            inputs = collate([prompts[i] for i in group], self.pad_id)
            rows = torch.tensor(group, device=self.device)
            group_logits, group_deltas, prompt_cache = self._prefill_group(inputs)
            last_logits[rows] = group_logits.float()
            if group_deltas is not None:
                if rope_deltas is None:
                    rope_deltas = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
                rope_deltas[rows] = group_deltas.to(self.device, torch.long)
            # Padding slots hold whatever the prompt pass left there (NaN for a fully masked row); zero
            # them, as the decode attention multiplies them by a weight of 0.
            padding = ~inputs["attention_mask"].bool()[:, None, :, None]
            since = prompt_len - inputs["input_ids"].shape[1]
            for static, dynamic in zip(statics, list[Any](prompt_cache.layers), strict=True):
                static.keys[:, :, since:prompt_len].index_copy_(0, rows, dynamic.keys.masked_fill(padding, 0))
                static.values[:, :, since:prompt_len].index_copy_(0, rows, dynamic.values.masked_fill(padding, 0))
        return state.rules.choose(last_logits, 0)[:batch], rope_deltas

    def _prefill_group(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """One eager prompt pass over a left-padded batch: last logits, rope offsets (or None), the cache."""
        kwargs = dict(inputs)
        wrapper: Any = getattr(self.model, "model", None)
        keeps_offsets = getattr(wrapper, "rope_deltas", "absent") != "absent"
        if not keeps_offsets:
            # No rope offsets kept by the model: positions count real tokens only, as generate does.
            kwargs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        else:
            wrapper.rope_deltas = None  # computed afresh for these prompts
        prompt_cache = DynamicCache(config=self.model.config)
        with torch.compiler.set_stance("force_eager"):  # compiled layers are for the decode steps only
            out = self.model(**kwargs, past_key_values=prompt_cache, use_cache=True, logits_to_keep=1)
        deltas = wrapper.rope_deltas if keeps_offsets else None
        return out.logits[:, -1], deltas, prompt_cache

    # -- graphs ---------------------------------------------------------------------------------

    def _capture(self, run: Any) -> torch.cuda.CUDAGraph:
        """One decode step as a CUDA graph, after two warm-up steps (compilation, lazy inits, cuBLAS workspaces)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            run()
        return graph

    def _allocate(self, rows: int, length: int) -> Any:
        text = self.model.config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        cache.early_initialization(rows, heads, head_dim, self.model.dtype, self.device)
        return cache

    def _view(self, rows: int, length: int) -> Any:
        """A cache over the first ``rows`` rows and ``length`` slots of the preallocated one (same memory)."""
        view = StaticCache(config=self.model.config, max_cache_len=length)
        views: list[Any] = list(view.layers)
        for mine, full in zip(views, list[Any](self.cache.layers), strict=True):
            mine.keys = full.keys[:rows, :, :length]
            mine.values = full.values[:rows, :, :length]
            mine.cumulative_length = torch.zeros_like(full.cumulative_length)
            mine.device, mine.dtype, mine.is_initialized = full.device, full.dtype, True
            mine.batch_size, mine.num_heads = rows, full.num_heads
            mine.k_head_dim, mine.v_head_dim = full.k_head_dim, full.v_head_dim
        if self.compiled:  # runs between the compiled graphs (see _compile_decoder_layers)
            view.update = torch.compiler.disable(_LayersInOrder(views))  # type: ignore[method-assign]
        return view

    def _graph(self, rows: int, length: int) -> _Graph:
        state = self.graphs.get((rows, length))
        if state is not None:
            return state
        started = time.perf_counter()
        cache = self._view(rows, length)
        device = self.device
        tokens = torch.full((rows, 1), self.pad_id, dtype=torch.long, device=device)
        positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        valid = torch.ones((rows, length), dtype=torch.bool, device=device)
        step = torch.ones((), dtype=torch.long, device=device)
        history = torch.full((rows, self.max_new_tokens + 1), self.pad_id, dtype=torch.long, device=device)
        slots = torch.arange(length, device=device)
        written = cache.layers[0].cumulative_length
        rules = DecodeRules(rows, self.vocab, device, self.repetition_penalty, self.reasoning)

        in_order = cache.update if self.compiled else None

        def step_once() -> None:
            if in_order is not None:
                in_order.next = 0
            attend = (valid & (slots <= written))[:, None, None, :]
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=attend,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            chosen = rules.choose(out.logits[:, -1], step)[:, None]
            history.index_copy_(1, step.view(1), chosen)
            tokens.copy_(chosen)
            positions.add_(1)
            step.add_(1)

        def run() -> None:
            if self.compiled:
                with _without_layer_index(self.model):
                    step_once()
            else:
                step_once()

        graph = None
        if self.use_graphs:
            graph = self._capture(run)
            cache.reset()
        state = _Graph(cache, tokens, positions, valid, step, history, rules, graph, run)
        self.graphs[(rows, length)] = state
        if self.compiled:
            # Compiling leaves many long-lived objects; keep them out of each job's gc.collect(), as the
            # model's are (worker.runtime.init_child).
            gc.freeze()
        elapsed = time.perf_counter() - started
        self.capture_s += elapsed
        log.info("decode graph for batch %d, cache %d ready in %.2f s", rows, length, elapsed)
        return state
