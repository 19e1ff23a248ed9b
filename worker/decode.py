"""Pieces of the decode step that ``worker.slots`` runs: shape buckets, prompt grouping, the decode
attention and compiled decoder layers.

Plain ``generate`` launches a few thousand small kernels per decode step from Python and waits on the
GPU every step; on a 10B model the GPU mostly idles. The slot decoder (``worker.slots``) instead
replays every decode step (embedding, all layers, lm_head, the choice of the next token with its
repetition penalty and thinking budget, and the bookkeeping for the next step) as one
``CUDAGraph.replay()`` over a preallocated static cache, and the host looks at the tokens only every
``CHECK_EVERY`` steps (``worker.continuous``).

Shapes are bucketed so steady traffic reuses a few graphs: rows are rounded up to a power of two
(:func:`bucket`), cache columns to a quarter octave of at least ``MIN_CACHE_LEN``
(``worker.slots.column_bucket``). Prompts are prefilled
in groups of similar length (:func:`prefill_groups`). The attention registered as ``ATTENTION``
reads each key/value head once for all its query heads in a decode step, and
:func:`_compile_decoder_layers` compiles the layers once for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

ATTENTION = "glyphq_static"
CHECK_EVERY = 16  # decode steps between looks at the tokens (each look waits for the GPU)
MIN_CACHE_LEN = 256


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
    two compiled graphs, takes the layers in the order they call it (``worker.slots._RowWrites``).

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
