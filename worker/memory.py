"""Memory hygiene between tasks: drop garbage, hand cached CUDA blocks back, and read GPU figures."""

from __future__ import annotations

import gc
import logging
import time

import torch

from glyphq.worker.budget import SUCCESSOR_HEADROOM

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


#: How far reserved memory after cleanup may pass the child's own baseline (``guard_limit_bytes``):
#: ``GUARD_MARGIN_BYTES`` or ``GUARD_MARGIN_SHARE`` of the card, whichever is more.
GUARD_MARGIN_BYTES = 2 * 1024**3
GUARD_MARGIN_SHARE = 0.05

_baseline_reserved: float | None = None


def guard_limit_bytes(card: float, baseline: float | None, configured_mb: int) -> float:
    """The reserved-memory limit (bytes) past which a child is replaced: ``GLYPHQ_GPU_GUARD_MB`` when set;
    else the ``baseline`` the child reserved once loaded and warmed (weights, KV cache pool, captured
    steps) plus ``GUARD_MARGIN_BYTES`` or ``GUARD_MARGIN_SHARE`` of the ``card``, whichever is more, and
    never above the card. Without a baseline yet, the card.

    A pool sized to most of the card makes any fixed share of the card the wrong limit: the baseline
    alone may pass it. What the guard is for is memory that grows past what a fresh child holds."""
    if configured_mb > 0:
        return float(configured_mb) * MB
    if baseline is None:
        return card
    return min(card, baseline + max(GUARD_MARGIN_BYTES, GUARD_MARGIN_SHARE * card))


def set_baseline(device: torch.device, growing_bytes: int = 0) -> None:
    """Take what this child reserves now (loaded, warmed and cleaned up), and ``growing_bytes`` it will
    hold by design as it serves (an encoder cache filling up to its size), as the GPU guard's baseline."""
    global _baseline_reserved
    if cuda_in_use(device):
        _baseline_reserved = float(torch.cuda.memory_reserved(device)) + growing_bytes


def gpu_guard_limit_mb(device: torch.device, configured_mb: int) -> float | None:
    """The reserved-memory limit in MB that triggers a recycle (``guard_limit_bytes``); None on CPU."""
    if not cuda_in_use(device):
        return None
    card = float(torch.cuda.mem_get_info(device)[1])
    return guard_limit_bytes(card, _baseline_reserved, configured_mb) / MB


def successor_bytes(peak: float, cache: float, provisional: float) -> float:
    """GPU memory a successor needs before its predecessor leaves (``worker.runtime.Runtime.load``): what
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
