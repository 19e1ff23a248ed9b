"""Pieces of the decode step that ``worker.paged`` runs: shape buckets and compiled decoder layers.

Plain ``generate`` launches a few thousand small kernels per decode step from Python and waits on the
GPU every step; on a 10B model the GPU mostly idles. The paged decoder (``worker.paged``) instead
replays every decode step (embedding, all layers, lm_head, the choice of the next token with its
repetition penalty and thinking budget, and the bookkeeping for the next step) as one
``CUDAGraph.replay()`` over preallocated buffers, and the host looks at the tokens only every
``CHECK_EVERY`` steps (``worker.continuous``).

Shapes are bucketed so steady traffic reuses a few graphs: rows are rounded up to a power of two
(:func:`bucket`), cache columns to a quarter octave of at least ``MIN_CACHE_LEN``
(``worker.paged.column_bucket``). :func:`_compile_decoder_layers` compiles the layers once for all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # decode steps between looks at the tokens (each look waits for the GPU)
MIN_CACHE_LEN = 256


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The smallest power of two (at least ``floor``) that holds ``n``, but never more than ``limit``."""
    size = floor
    while size < n:
        size *= 2
    return max(n, min(size, limit))


def _compile_decoder_layers(model: Any) -> bool:
    """``torch.compile`` every decoder layer of the language model; False if it has no ``layers``.

    The layers share their code, so they share compiled graphs: compiling takes one layer's time, not
    forty. For that no layer may differ from the others in what the compiler sees, and the only
    difference is the attention's ``layer_idx``. So while a step is traced, ``layer_idx`` is None on
    every layer; the attention, which runs between two compiled graphs (``worker.paged.paged_attention``
    is never compiled), finds its layer by its module.

    Batch and cache length are traced as dynamic, so one compilation serves every bucket, except
    batch 1, which the compiler always specializes: at most two per graph in all. For that a size
    must not share its symbol with another one that happens to be equal when it is first traced
    (the compiler's "duck shaping"): batch 2 equals GLM-4.1V-9B's 2 key/value heads, and a trace at
    batch 2 would be traced again at batch 4, seconds in a successor taking over (``worker.paged``).
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
