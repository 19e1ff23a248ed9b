"""Build small random-weight vision-language models offline: ``python -m worker.tiny DIR [--preset NAME]``.

Presets:

- ``tiny`` (default): LLaVA with a CLIP vision tower and a Llama text model, a few MB. Its processor
  is pure PIL, so it runs on a CPU without torchvision. Tests and ``make demo`` use it.
- ``glm4v-tiny``: Glyph's architecture (GLM-4.1V) at toy size. Needs torchvision.
- ``glyph-9b``: Glyph's architecture at full size (GLM-4.1V-9B config, ~10B parameters), for GPU
  benchmarks. Needs torchvision and ~21 GB of disk.

Every preset saves a model, a word-level tokenizer, a processor and a chat template with
``save_pretrained``, so loading goes through the real ``from_pretrained`` path. The weights are
random: answers are random words.
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

log = logging.getLogger(__name__)

PRESETS = ("tiny", "glm4v-tiny", "glyph-9b")

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

# GLM-4.1V's prompt layout, as Glyph uses it.
_GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
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


def build_tokenizer(extra_special: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English vocabulary, plus the given special tokens."""
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
    tokenizer.padding_side = "left"
    return tokenizer


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token
    return token_id


def build_llava_tiny(out: Path) -> None:
    """The CPU test model: LLaVA (CLIP 32x32 vision tower, 2-layer Llama), about 1 MB."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(["<image>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=_token_id(tokenizer, "<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # CLIP adds a CLS embedding that the "default" strategy drops: 16 patches -> 16 image tokens.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default",
                               chat_template=_LLAVA_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_glm4v(out: Path, full_size: bool) -> None:
    """Glyph's architecture (GLM-4.1V): full 9B size, or a toy of the same shape. Needs torchvision."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    tokenizer = build_tokenizer(_GLM4V_SPECIAL)
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
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids["<|user|>"], ids["<|observation|>"]]
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
    else:
        build_glm4v(out, full_size=preset == "glyph-9b")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m worker.tiny DIR [--preset tiny|glm4v-tiny|glyph-9b]``."""
    parser = argparse.ArgumentParser(prog="python -m worker.tiny", description=__doc__.splitlines()[0])
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
