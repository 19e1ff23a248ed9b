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


_last_peak_reserved = 0.0


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement for the next task (the last one is kept for ``peak_reserved``)."""
    global _last_peak_reserved
    if cuda_in_use(device):
        _last_peak_reserved = float(torch.cuda.max_memory_reserved(device))
        torch.cuda.reset_peak_memory_stats(device)


def peak_reserved(device: torch.device) -> float:
    """The most GPU memory this child reserved in its last batch, or since; 0 on CPU."""
    if not cuda_in_use(device):
        return 0.0
    return max(_last_peak_reserved, float(torch.cuda.max_memory_reserved(device)))


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


#: Headroom on what a successor is expected to hold before its predecessor leaves: its CUDA context and
#: what its warm-up needs beyond the predecessor's working memory.
SUCCESSOR_HEADROOM = 1.1


def successor_bytes(peak: float, cache: float, provisional: float) -> float:
    """GPU memory a successor needs before its predecessor leaves (``worker.runtime.init_child``): what
    this child reserved at its peak but its KV cache (weights, compiled and captured steps, working
    memory), plus the successor's provisional cache, with ``SUCCESSOR_HEADROOM``. Its full cache comes
    only after this child has left. All in bytes."""
    return SUCCESSOR_HEADROOM * (peak - cache + provisional)


def successor_fits(free: float, reserved: float, peak: float, cache: float, provisional: float) -> bool:
    """Whether a successor fits beside this child: the free memory must hold what this child may grow
    back to (its ``peak`` reserved minus what it ``reserved`` now) and ``successor_bytes``. All in bytes."""
    return free > (peak - reserved) + successor_bytes(peak, cache, provisional)


def room_for_a_successor(device: torch.device, cache: float = 0.0, provisional: float = 0.0) -> bool:
    """Whether the next child could load beside this one now (``successor_fits`` with this child's GPU
    figures; ``cache`` is the bytes of this child's KV cache, ``provisional`` those of the successor's
    provisional one; without them a successor is taken to need all this child holds). Always True on
    the CPU."""
    global _no_room_logged
    if not cuda_in_use(device):
        return True
    free, _total = torch.cuda.mem_get_info(device)
    reserved, peak = float(torch.cuda.memory_reserved(device)), peak_reserved(device)
    fits = successor_fits(float(free), reserved, peak, cache, provisional)
    if not fits and not _no_room_logged:  # once per child: the figures an operator needs to size the GPU
        _no_room_logged = True
        log.info("no room for a successor yet: %.1f GB free, %.1f GB needed (this child may grow by %.1f GB; "
                 "a successor holds %.1f GB until this child leaves)", free / 1e9,
                 (peak - reserved + successor_bytes(peak, cache, provisional)) / 1e9, (peak - reserved) / 1e9,
                 successor_bytes(peak, cache, provisional) / 1e9)
    return fits


_no_room_logged = False
