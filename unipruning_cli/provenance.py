"""What a result depends on beyond its config, and what it cost: library versions and peak memory."""

from __future__ import annotations

import platform
import resource

import torch


def versions() -> dict[str, str]:
    """unipruning, torch, transformers and Python versions: part of every cache key and of ``metrics.json``."""
    import transformers

    from . import __version__

    return {"unipruning": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_memory() -> dict[str, float]:
    """Peak resident set size of this process (``peak_rss_mib``, MiB) and, on CUDA, the peak memory the
    caching allocator handed out (``peak_cuda_mib``, ``torch.cuda.max_memory_allocated``, MiB)."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
