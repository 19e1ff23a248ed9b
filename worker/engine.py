"""The model behind a tiny lifecycle: ``load(settings) -> Engine``, ``engine.answer(jobs)``, ``engine.cleanup()``.

Nothing here knows about Celery or Redis.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList
from transformers.image_processing_backends import TorchvisionBackend
from transformers.utils import logging as hf_logging

from glyphq.celeryconfig import Settings
from glyphq.worker import memory, reasoning
from glyphq.worker.errors import ModelError
from glyphq.worker.images import Box, fit_image, processor_min_side, smaller_box
from glyphq.worker.logits import DecodeRules, RulesProcessor
from glyphq.worker.prompts import collate

log = logging.getLogger(__name__)


@dataclass
class EngineJob:
    """One question about one or more images (a document's pages, in order), with earlier turns.

    ``images`` may also be a function that decodes them: the running batch calls it in a page thread
    (``worker.continuous``), so a large page is decoded off the decode loop.
    """

    images: list[Image.Image] | Callable[[], list[Image.Image]]
    question: str
    max_new_tokens: int
    history: list[dict[str, str]] = field(default_factory=list)
    thinking_budget: int | None = None  # new tokens of reasoning before </think> is fed (worker.logits)
    document: bool = False  # the images are a rendered document's pages
    #: The sha256 of the bytes each image is decoded from, checked against them before (blob keys), so
    #: the caches of pages read before need not hash the pixels (``worker.prefix.page_key``).
    sources: list[str] | None = None
    #: Only jobs of the same scope share what the decoder keeps of pages read before (None: one scope).
    cache_scope: str | None = None

    def pages(self) -> list[Image.Image]:
        """The images, decoded now if they are not yet."""
        return self.images() if callable(self.images) else self.images


@dataclass
class EngineResult:
    """The answer to one ``EngineJob`` and what it cost."""

    answer: str
    tokens_in: int
    tokens_out: int
    vision_tokens: int
    image_sizes_used: list[tuple[int, int]]
    preprocess_s: float
    generate_s: float
    batch_size: int = 1
    token_ids: list[int] = field(default_factory=list)
    reasoning: str | None = None
    finish_reason: str = "stop"  # "stop": the model ended its turn; "length": max_new_tokens cut it
    thinking_tokens: int = 0
    thinking_budget_hit: bool = False
    encoder_cached_pages: int = 0  # pages whose vision features came from the encoder cache
    prefix_cached_tokens: int = 0  # prompt tokens read from shared KV cache blocks, not computed


#: How a document question is put after its pages, after the pattern of Glyph's LongBench prompts.
DOCUMENT_PROMPT = ("The document is shown in the images above.\n\nAnswer the question about the document.\n\n"
                   "Question: {question}")


def build_messages(question: str, history: list[dict[str, str]], images: int = 1,
                   document: bool = False) -> list[dict[str, Any]]:
    """Chat messages for the processor's template: earlier turns as text, then the images and question.

    An earlier answer is a plain string: GLM-4.1V's template prints an assistant's content as it is, so
    a list of parts would reach the prompt as its Python repr. A document's pages come first, then
    its question (``DOCUMENT_PROMPT``).
    """
    messages: list[dict[str, Any]] = []
    for turn in history:
        messages.append({"role": "user", "content": [{"type": "text", "text": turn["question"]}]})
        messages.append({"role": "assistant", "content": turn["answer"]})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    content.append({"type": "text", "text": DOCUMENT_PROMPT.format(question=question) if document else question})
    messages.append({"role": "user", "content": content})
    return messages


class Engine:
    """A loaded model and processor that answer batches of image + question jobs."""

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype, name: str,
                 repetition_penalty: float = 1.0) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.name = name
        self.repetition_penalty = repetition_penalty
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        vocab = tokenizer.get_vocab()
        #: The model's <think>/</think>/<answer> ids, or None for a model that does not reason in tags.
        self.reasoning = reasoning.reasoning_ids(vocab)
        self.eos_ids = stop_ids(model.generation_config.eos_token_id, vocab, self.reasoning is not None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.min_side = processor_min_side(processor)  # no side of a fitted image is shorter
        self.slots: Any = None  # worker.paged.PagedDecoder: the worker decodes over a paged KV cache
        self.decoder: Any = None  # the same, under the name the hand-over warms its steps through
        self.prefill_chunk = 2048  # prompt tokens one step carries at most (GLYPHQ_PREFILL_CHUNK)
        # A torch (torchvision) image processor can resize and normalize on the GPU: 0.12 s instead of
        # 0.28 s for 32 pages on an H200. A PIL one runs on the CPU only.
        on_gpu = device.type == "cuda" and isinstance(getattr(processor, "image_processor", None), TorchvisionBackend)
        self._processor_kwargs: dict[str, Any] = {"device": str(device)} if on_gpu else {}

    def answer(self, jobs: list[EngineJob], box: Box) -> list[EngineResult]:
        """Answer ``jobs`` together, greedily; every image (page) is fitted into ``box`` on its own
        (``worker.images.fit_size``). With the paged decoder (the default) the jobs run through the same
        iteration-level scheduler as in the worker (``worker.continuous``), else in one ``generate``.
        Raises the first job's failure."""
        if self.slots is not None:
            from glyphq.worker.continuous import Continuous

            running = Continuous(self, box)
            for index, job in enumerate(jobs):
                running.add(index, job)
            outcomes = {f.key: f.outcome for f in running.run()}  # run() closes it
            for index in range(len(jobs)):
                if isinstance(outcomes[index], BaseException):
                    raise outcomes[index]
            return [outcomes[index] for index in range(len(jobs))]
        return self.answer_with_generate(jobs, box)

    def answer_with_generate(self, jobs: list[EngineJob], box: Box) -> list[EngineResult]:
        """Answer ``jobs`` in one greedy batched ``model.generate`` (what the paged decoder is checked against)."""
        start = time.perf_counter()
        fitted = [[fit_image(image, box, self.min_side) for image in job.pages()] for job in jobs]
        prompts = [self.process(job, images) for job, images in zip(jobs, fitted, strict=True)]
        preprocess_s = time.perf_counter() - start

        start = time.perf_counter()
        budgets = [job.thinking_budget for job in jobs] if self.reasoning is not None else None
        generated = self.generate(prompts, max(job.max_new_tokens for job in jobs), budgets)
        rows = [row.tolist()[: job.max_new_tokens] for row, job in zip(generated, jobs, strict=True)]
        new_tokens = [self._until_eos(row) for row in rows]
        # A reasoning model's tags are added tokens that are not special: decode keeping them, then split.
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=self.reasoning is None)
        parsed = [reasoning.parse(text) if self.reasoning is not None else reasoning.Parsed(text.strip(), None)
                  for text in texts]
        tokens_in = [prompt["input_ids"].shape[1] for prompt in prompts]
        vision = [int((prompt["input_ids"] == self.image_token_id).sum()) if self.image_token_id is not None else 0
                  for prompt in prompts]
        generate_s = time.perf_counter() - start
        share = 1.0 / len(jobs)
        return [
            EngineResult(
                answer=split.answer,
                reasoning=split.reasoning,
                finish_reason="stop" if len(ids) < len(row) else "length",
                thinking_tokens=reasoning.thinking_tokens(ids, self.reasoning),
                thinking_budget_hit=reasoning.budget_cut_in(ids, job.thinking_budget, self.reasoning),
                tokens_in=int(n_in),
                tokens_out=len(ids),
                vision_tokens=int(n_vision),
                image_sizes_used=[image.size for image in images],
                preprocess_s=preprocess_s * share,
                generate_s=generate_s * share,
                batch_size=len(jobs),
                token_ids=ids,
            )
            for split, n_in, n_vision, ids, row, images, job in zip(parsed, tokens_in, vision, new_tokens, rows, fitted,
                                                                     jobs, strict=True)
        ]

    def process(self, job: EngineJob, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's tensors for one job's prompt (a batch of one), on the model's device."""
        messages = build_messages(job.question, job.history, len(images), job.document)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = self.processor(text=[text], images=images or None, return_tensors="pt",
                                **self._processor_kwargs).to(self.device)
        if "pixel_values" in prompt:
            prompt["pixel_values"] = prompt["pixel_values"].to(self.dtype)
        return dict(prompt)

    def generate(self, prompts: list[dict[str, torch.Tensor]], max_new_tokens: int,
                 budgets: list[int | None] | None = None) -> torch.Tensor:
        """Greedy new tokens (batch, n) for one processed prompt per row (``processor`` output, batch 1),
        with the repetition penalty and each row's thinking budget (``budgets``, None: none):
        through ``model.generate``."""
        prompt_len = max(prompt["input_ids"].shape[1] for prompt in prompts)
        inputs = collate(prompts, self.pad_id)
        rules = DecodeRules(len(prompts), self.model.get_output_embeddings().weight.shape[0], self.device,
                            self.repetition_penalty, self.reasoning)
        rules.start([prompt["input_ids"][0] for prompt in prompts], budgets or [None] * len(prompts))
        # Compiled decoder layers (GLYPHQ_DECODE_COMPILE) are traced for the paged decode steps only.
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
            # The penalty is applied by RulesProcessor, exactly as in the paged decoder, never twice.
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None,
                                         repetition_penalty=1.0,
                                         logits_processor=LogitsProcessorList([RulesProcessor(rules, prompt_len)]))
        return output[:, prompt_len:]

    def warm_up(self, box: Box) -> float:
        """Answer two blank pages of size ``box``, so the next real batch finds every kernel on the path
        (processor, vision tower, prompt pass, decode) loaded; return the seconds it took."""
        start = time.perf_counter()
        page = Image.new("RGB", box, "white")
        self.answer([EngineJob(images=[page], question="Warm-up.", max_new_tokens=2) for _ in range(2)], box)
        if self.decoder is not None:  # its blank pages are no one's: start the caches empty, at zero
            self.decoder.forget_pages()
        self.cleanup()
        return time.perf_counter() - start

    def _until_eos(self, ids: list[int]) -> list[int]:
        for i, token in enumerate(ids):
            if token in self.eos_ids:
                return ids[:i]
        return ids

    def count_text_tokens(self, text: str) -> int:
        """How many tokens ``text`` would take as plain text in the prompt."""
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cleanup(self) -> float:
        """Free what the last call left behind; return the seconds it took."""
        return memory.cleanup(self.device)


def stop_ids(eos: int | list[int] | None, vocab: dict[str, int], reasons: bool) -> set[int]:
    """The ids a row stops at: ``generation_config``'s eos, plus, for a model that reasons in tags
    (GLM-4.1V, Glyph), its turn-ending tokens looked up by name (``worker.reasoning.END_TOKENS``)."""
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | reasoning.end_ids(vocab) if reasons else ids


def resolve_device(setting: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load(settings: Settings, defer_cache: bool = False) -> Engine:
    """Load ``settings.model`` (a hub id or a local path): bf16 on CUDA, float32 on CPU, in eval mode.

    With ``defer_cache`` (a successor whose predecessor still holds the GPU) the decoder starts with a
    provisional KV cache pool, until ``engine.decoder.allocate()`` (``worker.paged``)."""
    device = resolve_device(settings.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # The paged decoder on every device by default; "generate" keeps ``model.generate`` for in-process answers (a
    # reference for tests) and a worker then refuses to start (``worker.runtime``).
    static = settings.decode in ("auto", "static")
    compile_layers = static and settings.decode_compile == "on" and device.type == "cuda"
    compiler = _import_compiler_meanwhile(settings.compile_cache_dir) if compile_layers else None
    start = time.perf_counter()
    hf_logging.disable_progress_bar()  # a progress bar per child clutters the worker log
    try:
        processor = AutoProcessor.from_pretrained(settings.model)
        model = AutoModelForImageTextToText.from_pretrained(
            settings.model, dtype=dtype, device_map=str(device) if device.type == "cuda" else None
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load model {settings.model!r}: {exc}") from exc
    model.eval()
    log.debug("from_pretrained of %s took %.1f s", settings.model, time.perf_counter() - start)
    engine = Engine(model, processor, device, dtype, settings.model, settings.repetition_penalty)
    if static:
        from glyphq.worker.budget import MIB, encoder_cache_bytes
        from glyphq.worker.paged import CPU_POOL_TOKENS, PROVISIONAL_TOKENS, PagedDecoder, prefill_chunk_for

        if compiler is not None:
            compiler.join()
        engine.prefill_chunk = settings.prefill_chunk or prefill_chunk_for(device)
        from_card = settings.kv_cache_tokens == 0 and device.type == "cuda"
        pool_tokens = settings.kv_cache_tokens or (PROVISIONAL_TOKENS if from_card else CPU_POOL_TOKENS)
        engine.slots = engine.decoder = PagedDecoder(
            model, max_batch=settings.max_batch, max_tokens=settings.decode_max_tokens,
            max_new_tokens=settings.max_new_tokens_limit, pad_id=engine.pad_id, pool_tokens=pool_tokens,
            compile_layers=compile_layers, repetition_penalty=settings.repetition_penalty,
            reasoning=engine.reasoning, allocate=not defer_cache, prefix_cache=settings.prefix_cache == "on")
        encoder_bytes = None if settings.encoder_cache_mb < 0 else settings.encoder_cache_mb * MIB
        if from_card:
            pool_tokens = engine.decoder.size_from_card(settings.gpu_memory_utilization, engine.prefill_chunk,
                                                        encoder_bytes)
        else:  # a pool of a fixed size: the encoder cache beside it, by default a share of its bytes
            engine.decoder.encoder_cache.max_bytes = (encoder_cache_bytes(engine.decoder.pool_bytes())
                                                      if encoder_bytes is None else encoder_bytes)
        _log_pool(engine.decoder, pool_tokens, engine.prefill_chunk, device, defer_cache)
    return engine


def _log_pool(decoder: Any, tokens: int, chunk: int, device: torch.device, provisional: bool) -> None:
    """The child's one line on its KV cache pool: the card, the pool's tokens, blocks and bytes, the
    rows it allows, the prompt chunk, and whether a successor fits beside it (``worker.budget``)."""
    from glyphq.worker.blocks import blocks_for

    card = "cpu"
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        card = f"{torch.cuda.get_device_name(device)} ({total / 1e9:.1f} GB)"
    weights = sum(p.numel() * p.element_size() for p in decoder.model.parameters())
    if not decoder.successor_fits:
        successor = "no room for a successor on this card: each recycle waits for a fresh child (no overlap)"
    elif decoder.successor_bytes:
        successor = f"{decoder.successor_bytes / 1e9:.1f} GB left for a successor"
    else:
        successor = "a successor fits if the memory is free when it is due"
    log.info("KV cache pool: %s, weights %.1f GB, %d tokens in %d blocks (%.2f GB%s), up to %d rows, prompt chunks "
             "of %d tokens, working memory %.2f GB; %s", card, weights / 1e9, tokens, blocks_for(tokens),
             decoder.pool_bytes(tokens) / 1e9, ", provisional until it takes over" if provisional else "",
             decoder.max_batch, chunk, decoder.working_bytes / 1e9, successor)


def _import_compiler_meanwhile(cache_dir: str) -> threading.Thread:
    """Import torch's compiler (inductor, about 3 s) in a thread while the weights load.

    It reads its settings from the environment when it is imported, so they are set first:
    ``cache_dir`` (``GLYPHQ_COMPILE_CACHE_DIR``) and one compile thread.
    """
    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    # Compile in this process: a worker child is a daemon, and a pool of compile workers is one more
    # thing that can break in it. Only a cold cache pays for it.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    thread = threading.Thread(target=importlib.import_module, args=("torch._inductor.compile_fx",),
                              name="glyphq-import-compiler", daemon=True)
    thread.start()
    return thread


def answer_within_memory(engine: Engine, jobs: list[EngineJob], box: Box) -> list[EngineResult]:
    """``engine.answer``, made to fit when CUDA runs out of memory.

    A batch that does not fit is answered in two halves, and so on down to single jobs; a single job
    that does not fit is retried once with a smaller box, then fails with ``ModelError``.
    """
    try:
        return engine.answer(jobs, box)
    except torch.OutOfMemoryError as exc:
        first_error = str(exc).splitlines()[0]
    # Outside the except block, so the traceback and the activations it holds are gone.
    engine.cleanup()
    if len(jobs) > 1:
        log.warning("CUDA out of memory with a batch of %d; answering it in halves", len(jobs))
        half = len(jobs) // 2
        return answer_within_memory(engine, jobs[:half], box) + answer_within_memory(engine, jobs[half:], box)
    smaller = smaller_box(box)
    log.warning("CUDA out of memory with box %sx%s; retrying with %sx%s", *box, *smaller)
    try:
        return engine.answer(jobs, smaller)
    except torch.OutOfMemoryError as exc:
        second_error = str(exc).splitlines()[0]
    engine.cleanup()
    raise ModelError(f"CUDA out of memory, also after retrying with a smaller image box: {box[0]}x{box[1]}: "
                     f"{first_error}; {smaller[0]}x{smaller[1]}: {second_error}")
