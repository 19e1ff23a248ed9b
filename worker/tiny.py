"""Build small random-weight vision-language models offline: ``python -m glyphq.worker.tiny DIR [--preset NAME]``.

Presets:

- ``tiny`` (default): LLaVA with a CLIP vision tower and a Llama text model, a few MB. Its processor
  is pure PIL, so it runs on a CPU without torchvision. Tests and ``make demo`` use it.
- ``glyph-tiny``: speaks like Glyph on a LLaVA body (pure PIL, no torchvision): GLM-4.1V's
  tokenizer interface and chat template (below). Tests script its output with :func:`script`.
- ``glm4v-tiny``: Glyph's architecture (GLM-4.1V) at toy size, with the same tokenizer interface.
  Needs torchvision.
- ``glyph-9b``: Glyph's architecture at full size (GLM-4.1V-9B config, ~10B parameters), for GPU
  benchmarks, with the same tokenizer interface. Needs torchvision and ~21 GB of disk.

Every preset saves a model, a word-level tokenizer, a processor and a chat template with
``save_pretrained``, so loading goes through the real ``from_pretrained`` path. The weights are
random: answers are random words.

The GLM presets' tokenizer behaves like GLM-4.1V's where glyphq depends on it: the GLM role and
image tokens are special; ``<think>``, ``</think>``, ``<answer>``, ``</answer>``, ``<|begin_of_box|>``
and ``<|end_of_box|>`` are added tokens that are *not* special (a decode that skips special tokens
keeps them); the eos list is ``<|endoftext|>``, ``<|user|>``, ``<|observation|>`` and ``</answer>``,
looked up by name. The chat template, like GLM-4.1V's, prints an assistant's content as it is and has
no switch for thinking.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from glyphq.worker.reasoning import END_TOKENS, REASONING_TOKENS

log = logging.getLogger(__name__)

PRESETS = ("tiny", "glyph-tiny", "glm4v-tiny", "glyph-9b")

_WORDS = """
the a an and or of to in on at for with by from is are was were be been it this that these those
what which who when where why how total amount due date invoice number page line item price tax
paid balance customer name address order quantity unit cost sum subtotal discount net gross
document text table figure chart value year month day week report summary section title
answer question yes no not none all any some many few more most less least first last next
one two three four five six seven eight nine ten hundred thousand percent euro dollar
red green blue black white left right top bottom middle small large long short high low
read write show find give take make see look say tell ask use need want know think
""".split()
_PUNCTUATION = list(".,:;!?'\"()[]{}-/%$#&*+=<>") + [str(d) for d in range(10)]

_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# GLM-4.1V's prompt layout, as Glyph uses it. Like GLM-4.1V's own template, an assistant turn prints
# its content as it is (a list of parts would show as its repr), and a user turn may be a list of
# image and text parts. The model starts thinking by itself after "<|assistant|>\n".
_GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' or message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_GLM4V_SPECIAL = [
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|video|>",
]


def build_tokenizer(extra_special: list[str], added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English vocabulary, plus the given special tokens and
    ``added`` tokens that are not special."""
    special = ["<pad>", "<unk>", "<s>", "<|endoftext|>", *extra_special]
    vocab = {token: i for i, token in enumerate(special + _WORDS + _PUNCTUATION)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": extra_special})
    tokenizer.add_tokens(list(added), special_tokens=False)
    tokenizer.padding_side = "left"
    return tokenizer


def build_glm_tokenizer() -> PreTrainedTokenizerFast:
    """The GLM presets' tokenizer: GLM role and image tokens special, the reasoning tags added but not."""
    return build_tokenizer(_GLM4V_SPECIAL, added=REASONING_TOKENS)


def glm_eos_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """GLM-4.1V's eos list, by name."""
    return [_token_id(tokenizer, token) for token in END_TOKENS]


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token
    return token_id


def build_llava_tiny(out: Path) -> None:
    """The CPU test model: LLaVA (CLIP 32x32 vision tower, 2-layer Llama), about 1 MB."""
    tokenizer = build_tokenizer(["<image>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    _save_llava_body(out, tokenizer, "<image>", [tokenizer.eos_token_id, _token_id(tokenizer, "<|end|>")],
                     _LLAVA_TEMPLATE)


def build_glyph_tiny(out: Path) -> None:
    """Glyph's tokenizer interface and chat template on the CPU test model's LLaVA body (no torchvision)."""
    tokenizer = build_glm_tokenizer()
    _save_llava_body(out, tokenizer, "<|image|>", glm_eos_ids(tokenizer), _GLM4V_TEMPLATE)


def _save_llava_body(out: Path, tokenizer: Any, image_token: str, eos_ids: list[int], template: str) -> None:
    """Save a random LLaVA of the CPU test size (CLIP 32x32 vision tower, 2-layer Llama) with ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=_token_id(tokenizer, image_token),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # CLIP adds a CLS embedding that the "default" strategy drops: 16 patches -> 16 image tokens.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default",
                               chat_template=template, image_token=image_token)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_glm4v(out: Path, full_size: bool) -> None:
    """Glyph's architecture (GLM-4.1V): full 9B size, or a toy of the same shape. Needs torchvision."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    tokenizer = build_glm_tokenizer()
    ids = {t: _token_id(tokenizer, t) for t in _GLM4V_SPECIAL}
    # mrope_section splits half the rotary dims (head_dim * partial_rotary_factor / 2) over t, h, w.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [8, 12, 12]}
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    if full_size:
        text_config = {"rope_parameters": rope}  # the Glm4vConfig defaults are GLM-4.1V-9B's
        vision_config = {}
    else:
        text_config = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "rope_parameters": {**rope, "mrope_section": [1, 1, 2]}}
        vision_config = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                         "out_hidden_size": 64}
    text_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Glm4vConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    dtype = torch.bfloat16 if full_size else torch.float32
    with torch.device("cuda" if full_size and torch.cuda.is_available() else "cpu"):
        model = Glm4vForConditionalGeneration(config).to(dtype=dtype).eval()  # type: ignore[call-arg]
    model.generation_config.eos_token_id = glm_eos_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(), video_processor=Glm4vVideoProcessor(),
                               tokenizer=tokenizer, chat_template=_GLM4V_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build(out: Path | str, preset: str = "tiny", seed: int = 0) -> Path:
    """Build ``preset`` into ``out`` and return the directory."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if preset == "tiny":
        build_llava_tiny(out)
    elif preset == "glyph-tiny":
        build_glyph_tiny(out)
    else:
        build_glm4v(out, full_size=preset == "glyph-9b")
    return out


def script(model_dir: Path | str, *chains: str) -> None:
    """Make the ``glyph-tiny`` model in ``model_dir`` write a scripted output, deterministically.

    Each chain is a space-separated run of tokens; each token is followed by the next one of its chain.
    The first chain should start with ``<|assistant|>``, the prompt's last token, so the output starts
    with the chain's second token. A token may appear more than once only with the same successor,
    which makes loops: ``"<|assistant|> <think> read the page read"`` thinks forever.

    How: the decoder layers write nothing (their attention and MLP output weights are zero), so the
    last position's hidden state is its token's embedding; every scripted token gets its own embedding
    axis, and the output head maps each axis to its successor's logit. Prompt, images, penalty and
    batching go through the model as usual. Saved with ``save_pretrained``; load it as any model.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    successor: dict[int, int] = {}
    for chain in chains:
        unknown = [token for token in chain.split() if token not in vocab]
        if unknown:
            raise ValueError(f"not in the tokenizer's vocabulary: {unknown}")
        ids = [vocab[token] for token in chain.split()]
        for here, after in zip(ids, ids[1:], strict=False):
            if successor.setdefault(here, after) != after:
                raise ValueError(f"{tokenizer.convert_ids_to_tokens(here)!r} has two successors in {chains}")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    text = model.model.language_model
    axes = {token: axis for axis, token in enumerate(dict.fromkeys([*successor, *successor.values()]))}
    hidden = text.config.hidden_size
    if len(axes) > hidden:
        raise ValueError(f"a script may use at most {hidden} distinct tokens, got {len(axes)}")
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.embed_tokens.weight.zero_()
        text.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head.zero_()
        for token, axis in axes.items():
            text.embed_tokens.weight[token, axis] = 1.0
        for token, after in successor.items():
            head[after, axes[token]] = 10.0  # after the final norm the axis reads sqrt(hidden)
    model.save_pretrained(model_dir)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m glyphq.worker.tiny DIR [--preset tiny|glyph-tiny|glm4v-tiny|glyph-9b]``."""
    parser = argparse.ArgumentParser(prog="python -m glyphq.worker.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write the model into")
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    path = build(args.out, args.preset, args.seed)
    log.info("built %s model in %s (%.1f s)", args.preset, path, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
