"""Memory hygiene between tasks: drop garbage, hand cached CUDA blocks back, and read GPU figures."""

from __future__ import annotations

import gc
import logging
import time

import torch

log = logging.getLogger(__name__)

MB = 1024 * 1024


def cuda_in_use(device: torch.device) -> bool:
    """True when ``device`` is a CUDA device."""
    return device.type == "cuda"


def cleanup(device: torch.device) -> float:
    """Collect garbage and empty the CUDA cache; return the seconds it took."""
    start = time.perf_counter()
    gc.collect()
    if cuda_in_use(device):
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement for the next task."""
    if cuda_in_use(device):
        torch.cuda.reset_peak_memory_stats(device)


def gpu_stats(device: torch.device) -> dict[str, float] | None:
    """``peak_mb`` (allocated, since the last reset) and ``reserved_mb``; None on CPU."""
    if not cuda_in_use(device):
        return None
    return {
        "peak_mb": round(torch.cuda.max_memory_allocated(device) / MB, 1),
        "reserved_mb": round(torch.cuda.memory_reserved(device) / MB, 1),
    }


def allocated_bytes(device: torch.device) -> float:
    """GPU memory held by live tensors now; 0 on CPU."""
    return float(torch.cuda.memory_allocated(device)) if cuda_in_use(device) else 0.0


def gpu_guard_limit_mb(device: torch.device, configured_mb: int) -> float | None:
    """The reserved-memory limit that triggers a recycle: the setting, or 90% of the card when it is 0."""
    if not cuda_in_use(device):
        return None
    if configured_mb > 0:
        return float(configured_mb)
    return 0.9 * torch.cuda.get_device_properties(device).total_memory / MB


#: Free GPU memory a successor needs, as a share of the most this child reserved in its last batch.
SUCCESSOR_HEADROOM = 1.1


def room_for_a_successor(device: torch.device) -> bool:
    """Whether the next child could load beside this one now (see ``worker.runtime.init_child``).

    The successor needs about what this child holds; this child still needs its peak. So the free
    memory must exceed this child's peak reserved memory of the last batch, with some headroom.
    Always True on the CPU.
    """
    if not cuda_in_use(device):
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return bool(free > SUCCESSOR_HEADROOM * torch.cuda.max_memory_reserved(device))
