"""Make a GPU worker child behave as if it ran on a smaller card (``GLYPHQ_BENCH_CARD_GB``).

The GPU host has 141 GB (H200) or 80 GB (H100) cards; users run 24 and 48 GB ones. Put this folder
first on the worker's ``PYTHONPATH`` and set ``GLYPHQ_BENCH_CARD_GB`` (e.g. ``24``). Python imports
``sitecustomize`` at start in every process, but nothing happens until a process first uses CUDA,
which a glyphq worker's parent never does: only its children, after the fork.

When CUDA initialises (``torch.cuda``'s lazy-init queue), the shim
- caps the caching allocator of this process at the smaller card's bytes
  (``torch.cuda.set_per_process_memory_fraction``), so an allocation past it raises out-of-memory as
  the small card would; and
- makes ``torch.cuda.mem_get_info`` report that card: total = the card, free = the card less what
  every process uses on the real one (a predecessor and its successor share one card).

Bench-only: nothing in glyphq imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

CARD_BYTES = int(float(os.environ.get("GLYPHQ_BENCH_CARD_GB", "0")) * 1e9)


def _install(torch_cuda) -> None:  # noqa: ANN001
    real_mem_get_info = torch_cuda.mem_get_info

    def mem_get_info(device=None):  # noqa: ANN001, ANN202
        free, total = real_mem_get_info(device)
        used = total - free
        return max(0, CARD_BYTES - used), min(CARD_BYTES, total)

    def cap() -> None:
        _free, total = real_mem_get_info()
        torch_cuda.set_per_process_memory_fraction(min(1.0, CARD_BYTES / total))

    torch_cuda.mem_get_info = mem_get_info
    torch_cuda._lazy_call(cap)  # runs when this process initialises CUDA (at once if it already has)


class _AfterTorchCuda(importlib.abc.MetaPathFinder):
    """Patches ``torch.cuda`` right after it is first imported."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != "torch.cuda":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            original_exec(module)
            _install(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if CARD_BYTES > 0:
    sys.meta_path.insert(0, _AfterTorchCuda())
