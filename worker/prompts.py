"""Batching processed prompts: one processor output per job, left-padded together when they run as a batch."""

from __future__ import annotations

import torch

#: Tensors with one row per prompt, padded on the left when prompts are batched; the pad value of each.
ROW_PADDING = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def collate(prompts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One left-padded batch from processor outputs of one prompt each.

    Row tensors (``ROW_PADDING``) are padded on the left to the longest prompt, ``input_ids`` with
    ``pad_id``; everything else (pixels, image grids) is concatenated in order, as the processor
    does for a batch.
    """
    longest = max(prompt["input_ids"].shape[1] for prompt in prompts)
    batch: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(key for prompt in prompts for key in prompt):  # a prompt without images has no pixels
        tensors = [prompt[key] for prompt in prompts if key in prompt]
        if key in ROW_PADDING:
            value = pad_id if ROW_PADDING[key] is None else ROW_PADDING[key]
            tensors = [torch.nn.functional.pad(t, (longest - t.shape[1], 0), value=value) for t in tensors]
        batch[key] = torch.cat(tensors, dim=0)
    return batch
