"""Where the drift search keeps its state: V and Γ on the device or in pinned host memory, W as itself or as an
fp32 master copy (``schedule.search_state``, ``schedule.drift_dtype``)."""

from __future__ import annotations

import logging

import torch

from ..core.distributed import SINGLE, Ranks, agree
from .settings import SearchSettings, drift_gpu_bytes

log = logging.getLogger(__name__)


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can take: free to the driver plus what torch's caching allocator holds
    reserved but unused (``mem_get_info`` alone misses the latter: several GiB after an evaluation)."""
    free = torch.cuda.mem_get_info(device)[0]
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def search_state_of(settings: SearchSettings, params, ranks: Ranks = SINGLE) -> str:
    """``schedule.search_state`` resolved: ``auto`` is the device unless ``drift_gpu_bytes`` exceeds the free GPU
    memory (:func:`free_gpu_bytes`) on this rank or, over several ranks, on any of them: one choice for all, since
    the state's collectives run on it (NCCL on the GPU, gloo on the host)."""
    device = params[0].device
    if settings.search_state != "auto":
        return settings.search_state
    if device.type != "cuda":
        return "device"
    numel = sum(p.numel() for p in params)
    need = drift_gpu_bytes(numel, params[0].element_size(), settings.drift_dtype)
    free = free_gpu_bytes(device)
    where = "device" if agree(need <= free, ranks) else "host"
    log.info("search: V and Γ on the %s (%.1f GiB needed on the GPU with them, %.1f GiB free)", where, need / 2**30,
             free / 2**30)
    return where


def master_copy(params, settings: SearchSettings) -> torch.dtype | None:
    """``schedule.drift_dtype=float32`` on weights in a lower precision: W becomes its fp32 master copy, in place
    (same parameters), and the dtype the forward runs in under autocast is returned; else None (no change)."""
    low = params[0].dtype
    if settings.drift_dtype != "float32" or low == torch.float32:
        return None
    with torch.no_grad():
        for p in params:
            p.data = p.data.float()
    log.info("search: W drifts as an fp32 master copy; forward and backward under autocast in %s", low)
    return low
