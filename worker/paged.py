"""Greedy decoding over a paged KV cache: rows join, grow and leave a running batch between steps.

The cache (``PagedDecoder``)
    Every layer's keys and values live in one pool of ``worker.blocks.BLOCK_TOKENS``-token blocks,
    allocated once (``pool_tokens``) and grown later (:meth:`PagedDecoder.grow`). A row holds a block
    table and takes blocks as it grows (``worker.blocks``); a row that ends gives them back at once.
    The pool's size is a parameter: on the CPU a fixed token count, on CUDA what the card has free
    (:func:`auto_pool_tokens`).

The attention (``ATTENTION``)
    The model runs through transformers' public attention interface: ``paged_attention`` is
    registered with ``AttentionInterface.register`` and named as the model's ``attn_implementation``.
    No mask function is registered for it, so transformers builds no mask, and the model runs with
    ``use_cache=False``: no transformers cache is involved. Inside each decoder layer's attention the
    function writes the step's new keys and values into the pool at their slots and reads each row's
    blocks (gather, then attention): every row of a decode step in one batched product over its
    blocks, each prompt chunk with ``sdpa`` over its row's blocks. Any other attention (the vision
    tower's) goes to ``sdpa`` unchanged. A faster paged kernel would replace :meth:`_Pass.attend`'s
    gathers only.

A step
    One forward pass packs every token of the step into one sequence, given as ``inputs_embeds``
    with explicit ``position_ids``; the attention splits it by row. A *mixed* step
    (:meth:`PagedDecoder.prefill`) carries each decoding row's next token and chunks of prompts
    (``GLYPHQ_PREFILL_CHUNK`` tokens at most, chosen by ``worker.continuous``), so a long prompt is
    prefilled over several steps and the rows decoding never wait for a whole prompt pass. A job's
    prompt embeddings (token embeddings with the vision tower's features at its image tokens) and
    positions are computed once, when it starts (:meth:`PagedDecoder.start`), and sliced per chunk.
    GLM-4.1V's 3-D rotary positions come from the model's own ``get_rope_index`` over the whole
    prompt; the decode steps after it go on from its last position plus one, as ``generate`` does.

Decode steps and their CUDA graphs
    A step of decoding rows only (:meth:`PagedDecoder.decode`) reads rows ``[0, rows)`` and columns
    ``[0, length)`` of their block tables: a bucket. ``rows`` is rounded up to a power of two
    (``worker.decode.bucket``), ``length`` to a quarter octave of at least ``MIN_CACHE_LEN`` tokens
    (:func:`column_bucket`, always a whole number of blocks). So the buckets are (1, 2, 4, ...,
    ``max_batch``) rows by (256, 320, 384, 448, 512, 640, ..., ``max_tokens``) columns. Every per-row
    buffer (next token, position, length, block table, new-token index, the rules of
    ``worker.logits``) is one preallocated tensor of all rows; a bucket's step reads a view of its
    first ``rows``, and the per-step context of the attention (write slots, read slots, which columns
    count) is a preallocated tensor of the bucket. On CUDA each bucket's step is captured once as a
    CUDA graph; on the CPU it runs eagerly, which is how the suite checks it against ``generate``.
    Rows in ``[0, rows)`` that do not decode (free, or still prefilling) take part without effect:
    they write to the scratch block 0 and their state does not move. Mixed steps run eagerly.

A successor (``worker.runtime``) starts with a provisional pool of ``PROVISIONAL_TOKENS``
(``allocate=False``) while its predecessor still holds the GPU, and grows it to the full pool with
:meth:`PagedDecoder.allocate` once the predecessor has left. Growing copies the pool into a larger
one, so the captured graphs, which hold its address, are captured again when next used.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from glyphq.worker.blocks import BLOCK_TOKENS, RESERVED_BLOCKS, BlockPool, BlockTable, blocks_for
from glyphq.worker.budget import CUDA_CONTEXT_BYTES, PROVISIONAL_TOKENS, plan_pool
from glyphq.worker.decode import MIN_CACHE_LEN, _compile_decoder_layers, _without_layer_index, bucket
from glyphq.worker.encoder_cache import EncoderCache
from glyphq.worker.logits import DecodeRules
from glyphq.worker.prefix import block_keys, page_spans
from glyphq.worker.reasoning import ReasoningIds

log = logging.getLogger(__name__)

ATTENTION = "glyphq_paged"
#: Batches whose decode steps a successor captures on its provisional pool: 1, which the compiler
#: specializes, and 2, which it traces for every other batch.
PROVISIONAL_ROWS = 2
#: Default pool on the CPU (tests, the demo): a fixed token count, not a share of the memory.
CPU_POOL_TOKENS = 16_384
#: Processor outputs that are not the vision tower's input.
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def column_bucket(n: int, limit: int, floor: int = MIN_CACHE_LEN) -> int:
    """The columns a decode step reads for rows of up to ``n`` tokens: ``n`` rounded up to a quarter of
    the octave it is in (1280, 1536, 1792, 2048, 2560, ...), so at most 25% more, at least ``floor``, a
    whole number of blocks, and never more than ``limit`` (itself a whole number of blocks).

    Every row of a step reads as many columns as the longest one needs (the rest count for nothing),
    so one row past 4,096 tokens would make each row of a power-of-two bucket read 8,192.
    """
    octave = floor
    while octave < n:
        octave *= 2
    if octave > floor:
        step = octave // 8  # n is past octave / 2: steps of a quarter of that
        octave = -(-n // step) * step
    columns = max(n, min(octave, limit))
    return blocks_for(columns) * BLOCK_TOKENS


# -- the attention ------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """A prompt chunk in a step: its tokens ``[start, end)`` of the packed sequence attend to the row's
    cache slots ``slots`` under ``mask`` (None: plain causal, a chunk that starts the prompt)."""

    start: int
    end: int
    slots: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class _Pass:
    """What the attention of one forward pass needs: where each token's key and value go, and what each
    row reads. The first ``decode_rows`` tokens are one per decoding row, the chunks follow."""

    kv: torch.Tensor  # (layers, 2, pool slots, kv heads, head dim)
    layers: dict[Any, int]  # each decoder layer's attention module -> its layer index
    write: torch.Tensor  # (tokens,) the pool slot of each token's key and value
    decode_rows: int = 0
    decode_slots: torch.Tensor | None = None  # (decode rows, columns) the pool slot of each column
    decode_valid: torch.Tensor | None = None  # (decode rows, columns) the columns each row reads
    chunks: list[_Chunk] = field(default_factory=list)

    def attend(self, module: Any, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Write the new keys and values, then attend: (1, tokens, heads, head dim)."""
        keys, values = self.kv[layer, 0], self.kv[layer, 1]
        keys.index_copy_(0, self.write, key[0].transpose(0, 1))
        values.index_copy_(0, self.write, value[0].transpose(0, 1))
        out: list[torch.Tensor] = []
        if self.decode_rows:
            assert self.decode_slots is not None and self.decode_valid is not None
            out.append(_decode_attention(query[0, :, :self.decode_rows], keys, values, self.decode_slots,
                                         self.decode_valid, scaling))
        for chunk in self.chunks:
            row_keys = keys[chunk.slots].transpose(0, 1)[None]  # (1, kv heads, tokens, head dim)
            row_values = values[chunk.slots].transpose(0, 1)[None]
            mask = None if chunk.mask is None else chunk.mask[None, None]
            part, _ = sdpa_attention_forward(module, query[:, :, chunk.start:chunk.end], row_keys, row_values, mask,
                                             scaling=scaling)
            out.append(part)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                      valid: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One new token per row over its gathered blocks, reading each key/value head once for all the
    query heads that share it (GLM-4 has 16 per key/value head; ``sdpa`` would repeat each first).
    ``query`` is (heads, rows, head dim); returns (1, rows, heads, head dim)."""
    heads, rows, dim = query.shape
    row_keys = keys[slots]  # (rows, columns, kv heads, head dim)
    kv_heads = row_keys.shape[2]
    grouped = query.transpose(0, 1).reshape(rows, kv_heads, heads // kv_heads, dim)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(grouped, row_keys.permute(0, 2, 3, 1)).float() * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values[slots].transpose(1, 2))
    return out.reshape(1, rows, heads, dim)


#: The step whose forward pass runs now (set around each forward; read inside the attention).
_current: _Pass | None = None


@torch.compiler.disable
def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention registered as ``ATTENTION``: a decoder layer of a paged step reads and writes the
    pool (``_Pass.attend``); anything else (the vision tower) is plain ``sdpa``. Never compiled: the
    decoder layers around it may be (``worker.decode._compile_decoder_layers``)."""
    step = _current
    layer = step.layers.get(module) if step is not None else None
    if step is None or layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return step.attend(module, layer, query, key, value, scaling), None


AttentionInterface.register(ATTENTION, paged_attention)


# -- the decoder --------------------------------------------------------------------------------


@dataclass
class _Step:
    """One bucket's decode step and, on CUDA, its captured graph."""

    rows: int
    length: int
    run: Any
    graph: torch.cuda.CUDAGraph | None
    uses: int = 0


@dataclass
class _Prompt:
    """A started row's prompt: embeddings of its tokens from ``cached`` on (those before are in shared
    blocks), positions (tokens,) or (3, tokens), the offset of its decode positions, what its rules
    start from, the keys of its full blocks (kept as its chunks fill them) and the pages whose vision
    features came from the encoder cache."""

    ids: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor
    delta: int
    budget: int | None
    cached: int = 0
    keys: list[bytes] = field(default_factory=list)
    encoder_hits: int = 0


class PagedDecoder:
    """Decoding state of up to ``max_batch`` rows over one paged KV cache of ``pool_tokens`` tokens; see
    the module docstring. A row is at most ``max_tokens`` tokens (prompt and new).

    With ``allocate=False`` the pool starts provisional (``PROVISIONAL_TOKENS``) until :meth:`allocate`.
    With ``prefix_cache`` the full blocks of each prompt are kept for later rows that begin with the
    same tokens and pages (``worker.blocks``); ``encoder_cache_bytes`` bound the vision features kept
    per page (``worker.encoder_cache``; 0: none).
    """

    def __init__(self, model: Any, max_batch: int, max_tokens: int, max_new_tokens: int, pad_id: int,
                 pool_tokens: int, compile_layers: bool = False, repetition_penalty: float = 1.0,
                 reasoning: ReasoningIds | None = None, allocate: bool = True, prefix_cache: bool = True,
                 encoder_cache_bytes: int = 0) -> None:
        self.model = model
        self.device = model.device
        self.use_graphs = self.device.type == "cuda"
        self.compiled = compile_layers and _compile_decoder_layers(model)
        self.max_batch = max_batch
        self.max_blocks = blocks_for(max_tokens)
        self.max_tokens = max_tokens
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.vocab = model.get_output_embeddings().weight.shape[0]
        model.set_attn_implementation(ATTENTION)
        text = model.config.get_text_config(decoder=True)
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.attentions = {layer.self_attn: i for i, layer in enumerate(model.get_decoder().layers)}
        self.target_blocks = RESERVED_BLOCKS + blocks_for(pool_tokens)
        self.utilization: float | None = None  # the card's share the pool is sized to (size_from_card)
        self.working_bytes = 0
        # Whether the pool leaves room for a successor beside this child (size_from_card decides on CUDA;
        # elsewhere the hand-over checks the memory free when it is due), and the bytes it leaves.
        self.successor_fits = True
        self.successor_bytes = 0
        self.preemptions = 0  # rows preempted (preempt) since the decoder was made
        self.prefix_cache = prefix_cache
        self.prefix_hits = 0  # prompt blocks shared from kept ones, since the decoder was made
        self.prefix_misses = 0  # full prompt blocks looked up and not found
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        image_token = getattr(model.config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(model.config, "image_token_index", None)  # LLaVA's name
        self.image_token_id: int = -1 if image_token is None else int(image_token)  # -1: no image tokens
        vision_config = getattr(model.config, "vision_config", None)
        self.merge = getattr(vision_config, "spatial_merge_size", 1) or 1  # image patches per token: merge**2
        self.deferred = not allocate  # until allocate(): the full pool's size is not known yet
        blocks = self.target_blocks if allocate else min(self.target_blocks,
                                                         RESERVED_BLOCKS + blocks_for(PROVISIONAL_TOKENS))
        self.kv = self._storage(blocks)
        self.pool = BlockPool(blocks)
        self.tables = [BlockTable(self.pool) for _ in range(max_batch)]
        wrapper = getattr(model, "model", model)
        self._rope_index = getattr(wrapper, "get_rope_index", None)
        device = self.device
        self.table = torch.zeros((max_batch, self.max_blocks), dtype=torch.long, device=device)
        self.tokens = torch.full((max_batch,), pad_id, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)  # rotary position of the next token
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)  # tokens of each row in the cache
        self.step = torch.zeros(max_batch, dtype=torch.long, device=device)  # new-token index each row makes
        self.active = torch.zeros(max_batch, dtype=torch.long, device=device)  # 1 for a row decoding
        self.history = torch.full((max_batch, max_new_tokens + 1), pad_id, dtype=torch.long, device=device)
        self.rules = DecodeRules(max_batch, self.vocab, device, repetition_penalty, reasoning)
        self.prompts: dict[int, _Prompt] = {}
        self.decoding: set[int] = set()
        self.graphs: dict[tuple[int, int], _Step] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_s = 0.0

    # -- the pool -------------------------------------------------------------------------------

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values in every layer."""
        return int(self.kv[:, :, 0].nbytes)

    @property
    def pool_tokens(self) -> int:
        """Tokens rows may hold in the pool now."""
        return self.pool.capacity * BLOCK_TOKENS

    @property
    def provisional(self) -> bool:
        """Whether the pool waits for :meth:`allocate` (``allocate=False``): a successor's, while its
        predecessor holds the card. A pool sized from the card is one even when it starts at the size
        of a provisional one, as it does (``worker.engine.load``)."""
        return self.deferred or len(self.pool.refs) < self.target_blocks

    def pool_bytes(self, tokens: int | None = None) -> int:
        """Bytes of a pool of ``tokens`` tokens (default: the full pool asked for), scratch block included."""
        blocks = self.target_blocks if tokens is None else RESERVED_BLOCKS + blocks_for(tokens)
        return blocks * BLOCK_TOKENS * self.token_bytes

    def grow(self, tokens: int) -> bool:
        """Grow the pool to hold ``tokens`` tokens; False, with nothing changed, if that does not fit in
        memory now. Rows keep their blocks and contents; decode steps are captured again when next used."""
        blocks = RESERVED_BLOCKS + blocks_for(tokens)
        if blocks <= len(self.pool.refs):
            return True
        try:
            larger = self._storage(blocks)
        except torch.OutOfMemoryError:
            return False
        larger[:, :, :self.kv.shape[2]] = self.kv
        self.graphs.clear()
        # The old graphs' memory pool went with the last of them: capturing into it again trips an
        # internal assert of the caching allocator, so the new graphs get a pool of their own.
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.kv = larger
        self.pool.grow(blocks)
        return True

    def allocate(self) -> bool:
        """Grow a provisional pool to the full one; False, with nothing changed, if it does not fit now.
        A pool sized from the card (:meth:`size_from_card`) is sized again now: a successor's
        predecessor has left the memory it held. It leaves the room for a successor it left before."""
        if self.utilization is not None:
            free, total, _, _ = self.card_memory()
            in_use = total - free - int(self.kv.nbytes)  # the pool now is replaced: not counted
            tokens = auto_pool_tokens(self.token_bytes, total, in_use, self.utilization,
                                      self.working_bytes + self.successor_bytes + self.encoder_cache.max_bytes)
            self.target_blocks = max(len(self.pool.refs), RESERVED_BLOCKS + blocks_for(tokens))
        if not self.grow((self.target_blocks - RESERVED_BLOCKS) * BLOCK_TOKENS):
            return False
        self.deferred = False
        return True

    def size_from_card(self, utilization: float, chunk: int, encoder_bytes: int | None = None) -> int:
        """On CUDA: measure one prompt chunk's working memory, then set the full pool to ``utilization`` of
        the card less what is in use and that, less room for a successor where the card allows it, and
        less the encoder cache's ``encoder_bytes`` (None: its default share; ``worker.budget.plan_pool``).
        Returns the pool's tokens; the pool takes them at once, or at :meth:`allocate` if it is
        provisional (a successor, whose predecessor still holds the card)."""
        self.utilization = utilization
        self.working_bytes = self.profile(chunk)
        free, total, allocated, reserved = self.card_memory()
        pool_now = int(self.kv.nbytes)
        held = allocated - pool_now  # weights and buffers: what a successor holds again
        # A successor's predecessor holds the card too: count this child's own memory and a context.
        context = CUDA_CONTEXT_BYTES if self.device.type == "cuda" else 0
        in_use = reserved - pool_now + context if self.provisional else total - free - pool_now
        plan = plan_pool(total, in_use, held, self.working_bytes, self.token_bytes, utilization, self.max_batch,
                         encoder_bytes=encoder_bytes)
        self.successor_fits, self.successor_bytes = plan.successor_fits, plan.successor_bytes
        self.encoder_cache.max_bytes = plan.encoder_bytes
        if self.provisional:
            return plan.tokens
        if not self.allocate():
            raise torch.OutOfMemoryError(f"a KV cache pool of {self.target_blocks * BLOCK_TOKENS} tokens does not fit")
        return self.pool_tokens

    def card_memory(self) -> tuple[int, int, int, int]:
        """Bytes free and in all on the card, and allocated and reserved by this process (CUDA only)."""
        free, total = torch.cuda.mem_get_info(self.device)
        return (int(free), int(total), int(torch.cuda.memory_allocated(self.device)),
                int(torch.cuda.memory_reserved(self.device)))

    @torch.inference_mode()
    def profile(self, tokens: int) -> int:
        """Bytes of working memory (beyond what is allocated now) of one step with a prompt chunk of
        ``tokens`` tokens; 0 on the CPU."""
        if self.device.type != "cuda":
            return 0
        self.grow(tokens)
        ids = torch.full((1, tokens), self.pad_id, dtype=torch.long, device=self.device)
        prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        if not self.reserve(0, tokens):
            raise RuntimeError("the pool has no room for the profiling pass")
        try:
            self.start(0, prompt)
            self.prefill([(0, 0, tokens)])
        finally:
            self.release(0)
        torch.cuda.synchronize(self.device)
        working = int(torch.cuda.max_memory_allocated(self.device) - before)
        torch.cuda.empty_cache()  # else the pass's cached memory would count as in use as well as working memory
        return working

    @property
    def free_blocks(self) -> int:
        return self.pool.free

    def blocks_of(self, row: int) -> int:
        """Blocks ``row`` holds."""
        return len(self.tables[row].blocks)

    def reserve(self, row: int, tokens: int) -> bool:
        """Give ``row`` blocks for its first ``tokens`` tokens; False, taking none, if the pool lacks them."""
        table = self.tables[row]
        held = len(table.blocks)
        if not table.reserve(min(tokens, self.max_blocks * BLOCK_TOKENS)):
            return False
        if len(table.blocks) > held:
            self.table[row, held:len(table.blocks)] = torch.tensor(table.blocks[held:], dtype=torch.long)
        return True

    # -- shapes ---------------------------------------------------------------------------------

    def fits(self, total_len: int) -> bool:
        """Whether one row of ``total_len`` tokens (prompt and new) may run: within ``max_tokens`` and
        the pool."""
        return total_len <= self.max_tokens and blocks_for(total_len) <= self.pool.capacity

    def shape_for(self, rows: int, length: int) -> tuple[int, int]:
        """The (rows, columns) bucket of a decode step over rows ``[0, rows)`` up to ``length`` tokens."""
        return bucket(rows, self.max_batch), column_bucket(length, self.max_blocks * BLOCK_TOKENS)

    def buckets_in_use(self) -> list[tuple[int, int]]:
        """Buckets that ran more than one step chunk, most used first: those worth capturing ahead."""
        used = [shape for shape, step in self.graphs.items() if step.uses > 1]
        return sorted(used, key=lambda shape: -self.graphs[shape].uses)

    def warm(self, rows: int, length: int) -> bool:
        """Capture (and compile) one bucket's step ahead of traffic; False if it is not a bucket here."""
        if ((rows, length) != self.shape_for(rows, length) or rows > self.max_batch
                or length > self.max_blocks * BLOCK_TOKENS):
            return False
        with torch.inference_mode():
            self._step(rows, length)
        return True

    # -- rows -----------------------------------------------------------------------------------

    def prompt_keys(self, prompt: dict[str, torch.Tensor], page_keys: list[bytes] | None,
                    scope: str | None = None) -> list[bytes]:
        """The keys of the full blocks of ``prompt`` (processor output, batch 1) whose pages have the
        content keys ``page_keys``, in cache ``scope`` (``worker.prefix``); none without the prefix cache,
        or for a prompt with images whose keys are not known."""
        if not self.prefix_cache:
            return []
        ids = prompt["input_ids"][0].tolist()
        counts = self._page_tokens(prompt)
        if counts and (page_keys is None or len(page_keys) != len(counts)):
            return []
        return block_keys(ids, page_spans(ids, self.image_token_id, counts), page_keys or [], scope)

    @staticmethod
    def shareable(keys: list[bytes], length: int) -> list[bytes]:
        """The keys of a ``length``-token prompt's blocks that may be shared: all but the block of its last
        token, which the row computes itself, since that token's logits choose its first new token."""
        return keys[:(length - 1) // BLOCK_TOKENS]

    def share(self, row: int, keys: list[bytes], length: int) -> int:
        """Start the empty ``row`` of a ``length``-token prompt with the kept blocks of its first ``keys``
        (:meth:`prompt_keys`, :meth:`shareable`); the prompt tokens they hold."""
        usable = self.shareable(keys, length)
        shared = self.tables[row].share(usable)
        if shared:
            self.table[row, :shared] = torch.tensor(self.tables[row].blocks, dtype=torch.long)
        self.prefix_hits += shared
        self.prefix_misses += len(usable) - shared
        return shared * BLOCK_TOKENS

    def matching(self, keys: list[bytes], length: int) -> tuple[int, int]:
        """What :meth:`share` would give a ``length``-token prompt now: the blocks, and how many of them
        are counted as free (kept, held by no row). Changes nothing."""
        return self.pool.matching(self.shareable(keys, length))

    @torch.inference_mode()
    def start(self, row: int, prompt: dict[str, torch.Tensor], budget: int | None = None,
              page_keys: list[bytes] | None = None, keys: list[bytes] | None = None, cached: int = 0) -> None:
        """Make ``row`` (with blocks reserved for its prompt, the first ``cached`` tokens of them shared:
        :meth:`share`) the start of ``prompt`` (processor output, batch 1): run the vision tower on the
        pages it still needs and compute the embeddings of the tokens from ``cached`` on and every
        position, which :meth:`prefill` feeds in chunks. ``keys``: the prompt's block keys, under which
        its full blocks are kept as they fill; ``page_keys``: its pages' keys, for the encoder cache."""
        ids = prompt["input_ids"]
        embeds, hits = self._embed(prompt, cached, page_keys)
        positions, delta = self._positions(prompt)
        self.prompts[row] = _Prompt(ids[0], embeds, positions, delta, budget, cached, list(keys or []), hits)
        self.lengths[row] = cached

    def forget_pages(self) -> None:
        """Drop every kept block and page, and their counts (after the warm-up's blank pages)."""
        self.pool.forget()
        self.encoder_cache = EncoderCache(self.encoder_cache.max_bytes)
        self.prefix_hits = self.prefix_misses = 0

    def encoder_hits_of(self, row: int) -> int:
        """Pages of ``row``'s prompt whose vision features came from the encoder cache."""
        return self.prompts[row].encoder_hits if row in self.prompts else 0

    def admit(self, row: int, prompt: dict[str, torch.Tensor], room: int, budget: int | None = None,
              chunk: int = 8192) -> int:
        """Start ``prompt`` in the free ``row`` with blocks for it and ``room`` new tokens, and prefill it
        alone, in chunks of ``chunk`` tokens (for benchmarks: the running batch mixes chunks into decode
        steps). Returns its first new token."""
        length = int(prompt["input_ids"].shape[1])
        if not self.reserve(row, length + room):
            raise ValueError(f"the pool ({self.pool_tokens} tokens, {self.pool.free} blocks free) does not hold "
                             f"a row of {length + room} tokens (GLYPHQ_KV_CACHE_TOKENS)")
        self.start(row, prompt, budget)
        for start in range(0, length, chunk):
            self.prefill([(row, start, min(start + chunk, length))], decode=False)
        return self.tokens_of(row, 1)[0]

    def release(self, row: int) -> None:
        """End ``row``: its blocks go back to the pool, it writes nothing more and reads block 0 only."""
        self.tables[row].release()
        self.table[row] = 0
        self.active[row] = 0
        self.lengths[row] = 0
        self.step[row] = 0
        self.prompts.pop(row, None)
        self.decoding.discard(row)

    def preempt(self, row: int) -> None:
        """End ``row`` early to free its blocks (it runs again later from its prompt), and count it."""
        self.release(row)
        self.preemptions += 1

    def tokens_of(self, row: int, count: int) -> list[int]:
        """The first ``count`` new tokens of ``row``."""
        return [int(t) for t in self.history[row, :count].tolist()]

    def latest(self, rows: int, steps: int) -> list[list[int]]:
        """The last ``steps`` new tokens of each of rows ``[0, rows)`` (one small device-to-host copy)."""
        since = (self.step[:rows] - steps).clamp(min=0)[:, None]
        index = (since + torch.arange(steps, device=self.device)[None, :]).clamp(max=self.max_new_tokens)
        return [[int(t) for t in row] for row in torch.gather(self.history[:rows], 1, index).tolist()]

    # -- steps ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[int, int, int]], decode: bool = True) -> list[int]:
        """One mixed step, eagerly: every decoding row's next token (unless ``decode`` is False) and the
        prompt tokens ``[start, end)`` of each ``(row, start, end)`` in ``chunks`` (rows started with
        :meth:`start`, blocks reserved). Decoding rows need blocks for one more token each. A row whose
        chunk ends its prompt makes its first new token and decodes from now on. Returns those rows."""
        device = self.device
        decoding = sorted(self.decoding) if decode else []
        index = torch.tensor(decoding, dtype=torch.long, device=device)
        embeds = [self.model.get_input_embeddings()(self.tokens[index])]
        mrope = self._rope_index is not None
        positions = [self.positions[index].expand(3, -1) if mrope else self.positions[index]]
        lengths = self.lengths[index]
        write = [self._slots(index, lengths)]
        keep = list(range(len(decoding)))
        step = _Pass(self.kv, self.attentions, write[0], decode_rows=len(decoding))
        if decoding:
            columns = column_bucket(int(lengths.max()) + 1, self.max_blocks * BLOCK_TOKENS)
            step.decode_slots = self._read_slots(self.table[index], columns)
            step.decode_valid = torch.arange(columns, device=device)[None, :] <= lengths[:, None]
        offset, finishing = len(decoding), []
        for row, start, end in chunks:
            prompt = self.prompts[row]
            embeds.append(prompt.embeds[start - prompt.cached:end - prompt.cached])
            positions.append(prompt.positions[..., start:end])
            seen = torch.arange(end, device=device)
            slots = self._slots(torch.full((end,), row, dtype=torch.long, device=device), seen)
            write.append(slots[start:])
            mask = None if start == 0 else seen[None, :] <= torch.arange(start, end, device=device)[:, None]
            step.chunks.append(_Chunk(offset, offset + end - start, slots, mask))
            offset += end - start
            if end == len(prompt.ids):
                keep.append(offset - 1)
                finishing.append(row)
        step.write = torch.cat(write)
        packed_positions = torch.cat(positions, dim=-1)
        packed_positions = packed_positions[:, None] if mrope else packed_positions[None]
        logits = self._forward(torch.cat(embeds)[None], packed_positions, step,
                               torch.tensor(keep, dtype=torch.long, device=device), eager=True)[0]
        for row, start, end in chunks:
            self.lengths[row] = end
            self._keep(row, start, end)
        self.lengths[index] += 1
        self.positions[index] += 1
        if decoding or finishing:
            self._choose(decoding, finishing, logits)
        return finishing

    def _keep(self, row: int, start: int, end: int) -> None:
        """Keep the blocks of ``row`` that its prompt tokens ``[start, end)`` just filled, for later rows."""
        keys, blocks = self.prompts[row].keys, self.tables[row].blocks
        for index in range(start // BLOCK_TOKENS, min(end // BLOCK_TOKENS, len(keys))):
            self.pool.keep(blocks[index], keys[index])

    def _choose(self, decoding: list[int], finishing: list[int], logits: torch.Tensor) -> None:
        """The next token of each decoding and finishing row from its logits (in that order); no other
        row's state moves."""
        for row in finishing:
            prompt = self.prompts[row]
            self.rules.view(row, row + 1).start([prompt.ids], [prompt.budget])
            self.step[row] = 0
            self.positions[row] = len(prompt.ids) + prompt.delta
            self.active[row] = 1
            self.decoding.add(row)
            prompt.embeds = prompt.embeds[:0]  # in the cache now
        rows = torch.tensor(decoding + finishing, dtype=torch.long, device=self.device)
        rules = self.rules.take(rows)
        step = self.step[rows]
        chosen = rules.choose(logits, step)
        self.rules.put(rows, rules)
        self.history[rows, step.clamp(max=self.max_new_tokens)] = chosen
        self.tokens[rows] = chosen
        self.step[rows] = step + 1

    @torch.inference_mode()
    def decode(self, rows: int, length: int, steps: int) -> None:
        """Run ``steps`` decode steps over rows ``[0, rows)``, whose decoding rows all fit ``length``
        tokens and hold blocks for them."""
        step = self._step(*self.shape_for(rows, length))
        step.uses += 1
        for _ in range(steps):
            if step.graph is not None:
                step.graph.replay()
            else:
                step.run()

    # -- internals ------------------------------------------------------------------------------

    def _storage(self, blocks: int) -> torch.Tensor:
        # Never-written slots are read with weight 0 (or by rows that do not decode): make them finite.
        return torch.zeros((len(self.attentions), 2, blocks * BLOCK_TOKENS, self.kv_heads, self.head_dim),
                           dtype=self.model.dtype, device=self.device)

    def _slots(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The pool slot of token ``columns[i]`` of row ``rows[i]``."""
        block = self.table[rows, (columns // BLOCK_TOKENS).clamp(max=self.max_blocks - 1)]
        return block * BLOCK_TOKENS + columns % BLOCK_TOKENS

    def _read_slots(self, table: torch.Tensor, columns: int) -> torch.Tensor:
        """(rows, columns) pool slots of the first ``columns`` tokens of each row of ``table``."""
        offsets = torch.arange(BLOCK_TOKENS, device=self.device)
        blocks = table[:, :columns // BLOCK_TOKENS]
        return (blocks[:, :, None] * BLOCK_TOKENS + offsets).reshape(table.shape[0], columns)

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, step: _Pass, keep: torch.Tensor | int,
                 eager: bool = False) -> torch.Tensor:
        """The model over one packed sequence, attending through ``step``: the logits kept (1, kept, vocab).
        Compiled layers run for decode steps only: a mixed step (``eager``) has a new shape every time."""
        global _current
        _current = step
        try:
            if self.compiled and not eager:
                with _without_layer_index(self.model):
                    out = self.model(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                     logits_to_keep=keep)
            else:
                with torch.compiler.set_stance("force_eager"):
                    out = self.model(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                     logits_to_keep=keep)
        finally:
            _current = None
        return out.logits

    def _embed(self, prompt: dict[str, torch.Tensor], cached: int = 0,
               page_keys: list[bytes] | None = None) -> tuple[torch.Tensor, int]:
        """The input embeddings (tokens, hidden) of the prompt's tokens from ``cached`` on: its tokens'
        embeddings, with the vision tower's features at its image tokens, as the model's own forward
        scatters them; and how many pages' features came from the encoder cache. Only pages with an image
        token from ``cached`` on are needed; the tower runs, in one call, on those the cache lacks."""
        ids = prompt["input_ids"][0]
        embeds = self.model.get_input_embeddings()(ids[cached:][None])[0]
        if "pixel_values" not in prompt:
            return embeds, 0
        image = ids.eq(self.image_token_id).nonzero()[:, 0]
        counts = self._page_tokens(prompt)
        if not counts or page_keys is None or len(page_keys) != len(counts):
            counts, page_keys = [int(image.numel())], None  # the pages as one: computed, never cached
            pages = [self._vision_inputs(prompt)]
        else:
            pages = self._page_inputs(prompt, len(counts))
        at = torch.split(image, counts)
        ends = list(itertools.accumulate(counts))
        last = image.tolist()  # one copy from the device, not one per page
        needed = [page for page in range(len(counts)) if counts[page] and last[ends[page] - 1] >= cached]
        found: dict[int, torch.Tensor] = {}
        for page in needed:
            kept = self.encoder_cache.get(page_keys[page]) if page_keys and self.encoder_cache.max_bytes else None
            if kept is not None:
                found[page] = kept
        missing = [page for page in needed if page not in found]
        if missing:
            computed = self._vision_features(_joined([pages[page] for page in missing]), embeds.shape[-1])
            for page, features in zip(missing, torch.split(computed, [counts[p] for p in missing]), strict=True):
                found[page] = features
                if page_keys and self.encoder_cache.max_bytes:
                    self.encoder_cache.put(page_keys[page], features)
        if needed:
            features = torch.cat([found[page] for page in needed]).to(embeds.dtype)
            positions = torch.cat([at[page] for page in needed])
            after = positions >= cached
            embeds = embeds.clone()
            embeds[positions[after] - cached] = features[after]
        return embeds, len(needed) - len(missing)

    def _vision_features(self, vision: dict[str, Any], hidden: int) -> torch.Tensor:
        """The vision tower's features for ``vision`` (the processor's image tensors), (tokens, hidden)."""
        wrapper = getattr(self.model, "model", self.model)
        accepted = inspect.signature(wrapper.get_image_features).parameters
        for name in ("vision_feature_layer", "vision_feature_select_strategy"):  # LLaVA's, from its config
            if name in accepted and name not in vision and getattr(self.model.config, name, None) is not None:
                vision[name] = getattr(self.model.config, name)
        with torch.compiler.set_stance("force_eager"):
            features: Any = wrapper.get_image_features(**vision)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            return torch.cat([f.reshape(-1, hidden) for f in features])
        return features.reshape(-1, hidden)

    @staticmethod
    def _vision_inputs(prompt: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {key: value for key, value in prompt.items() if key not in _TEXT_KEYS}

    def _page_tokens(self, prompt: dict[str, torch.Tensor]) -> list[int]:
        """Each page's image tokens in the prompt, in order: from its patch grid (GLM-4.1V), or the
        prompt's image tokens shared equally (LLaVA: one fixed count per image); [] for a prompt without
        images, or one whose counts do not add up to its image tokens."""
        if "pixel_values" not in prompt:
            return []
        total = int(prompt["input_ids"][0].eq(self.image_token_id).sum())
        grid = prompt.get("image_grid_thw")
        if grid is not None:
            counts = [int(n) // self.merge**2 for n in grid.prod(-1).tolist()]
        else:
            pages = int(prompt["pixel_values"].shape[0])
            counts = [total // pages] * pages if pages and total % pages == 0 else []
        return counts if sum(counts) == total else []

    def _page_inputs(self, prompt: dict[str, torch.Tensor], pages: int) -> list[dict[str, Any]]:
        """The processor's image tensors of each page alone: patch rows by the grid (GLM-4.1V), or one
        image of the batch each (LLaVA)."""
        vision = self._vision_inputs(prompt)
        grid = vision.get("image_grid_thw")
        if grid is not None:
            pixels = torch.split(vision["pixel_values"], grid.prod(-1).tolist())
            return [{**vision, "pixel_values": pixels[page], "image_grid_thw": grid[page:page + 1]}
                    for page in range(pages)]
        return [{key: value[page:page + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == (pages,)
                 else value for key, value in vision.items()} for page in range(pages)]

    def _positions(self, prompt: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The prompt's rotary positions, (tokens,) or (3, tokens) for a model with its own
        ``get_rope_index`` (GLM-4.1V), and the offset of the positions after it."""
        ids = prompt["input_ids"]
        if self._rope_index is None:
            return torch.arange(ids.shape[1], device=self.device), 0
        accepted = inspect.signature(self._rope_index).parameters
        given = {key: prompt[key] for key in ("image_grid_thw", "attention_mask", "mm_token_type_ids")
                 if key in prompt and key in accepted}
        positions, deltas = self._rope_index(ids, **given)
        return positions[:, 0], int(deltas.reshape(-1)[0])

    def _step(self, rows: int, length: int) -> _Step:
        found = self.graphs.get((rows, length))
        if found is not None:
            return found
        started = time.perf_counter()
        device = self.device
        tokens, positions, lengths = self.tokens[:rows], self.positions[:rows], self.lengths[:rows]
        step, active = self.step[:rows], self.active[:rows]
        history, rules, table = self.history[:rows], self.rules.view(0, rows), self.table[:rows]
        row_ids, columns = torch.arange(rows, device=device), torch.arange(length, device=device)
        mrope = self._rope_index is not None
        last = self.max_new_tokens
        context = _Pass(self.kv, self.attentions, torch.zeros(rows, dtype=torch.long, device=device),
                        decode_rows=rows, decode_slots=self._read_slots(table, length),
                        decode_valid=torch.zeros((rows, length), dtype=torch.bool, device=device))

        def run() -> None:
            assert context.decode_slots is not None and context.decode_valid is not None
            context.kv = self.kv
            context.write.copy_(torch.where(active.bool(), self._slots(row_ids, lengths), 0))
            context.decode_slots.copy_(self._read_slots(table, length))
            context.decode_valid.copy_(columns[None, :] <= lengths[:, None])
            embeds = self.model.get_input_embeddings()(tokens)[None]
            at = positions.expand(3, 1, -1) if mrope else positions[None]
            logits = self._forward(embeds, at, context, 0)[0]
            chosen = rules.choose(logits, step)
            history[row_ids, step.clamp(max=last)] = chosen
            tokens.copy_(chosen)
            positions.add_(active)
            lengths.add_(active)
            step.add_(active)

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
        kept = (self.tokens, self.positions, self.lengths, self.step, self.history)
        saved = [t.clone() for t in kept]
        saved_rules = self.rules.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.graph_pool):
            run()
        for mine, old in zip(kept, saved, strict=True):
            mine.copy_(old)
        self.rules.restore(saved_rules)
        return graph


def _joined(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """Pages' image tensors (``PagedDecoder._page_inputs``) as one input to the vision tower."""
    if len(pages) == 1:
        return dict(pages[0])
    return {key: torch.cat([page[key] for page in pages]) if isinstance(value, torch.Tensor) else value
            for key, value in pages[0].items()}


def prefill_chunk_for(device: torch.device) -> int:
    """Prompt tokens a step carries at most (``GLYPHQ_PREFILL_CHUNK`` 0): by the card's memory, as
    SGLang chooses its chunked prefill size (2,048 below 40 GB, 4,096 below 70 GB, else 8,192); 2,048
    on the CPU."""
    if device.type != "cuda":
        return 2048
    gb = torch.cuda.mem_get_info(device)[1] / 1e9  # the card as the memory figures see it (bench/small_card too)
    return 2048 if gb < 40 else 4096 if gb < 70 else 8192


def auto_pool_tokens(token_bytes: int, total: int, in_use: int, utilization: float, set_aside: int) -> int:
    """Tokens of a pool that takes ``utilization`` of a card of ``total`` bytes, less what is ``in_use``
    besides the pool (this process and any other on the card) and ``set_aside`` bytes (a step's working
    memory, measured by a profiling pass, and any room left for a successor); at least one block."""
    room = utilization * total - in_use - set_aside
    return max(BLOCK_TOKENS, int(room // token_bytes) // BLOCK_TOKENS * BLOCK_TOKENS)
