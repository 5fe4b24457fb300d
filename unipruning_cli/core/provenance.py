"""What a result depends on beyond its config, and what it cost: library versions, the machine's memory, peak memory."""

from __future__ import annotations

import os
import platform
import resource

import torch


def versions() -> dict[str, str]:
    """unipruning, torch, transformers and Python versions: part of every cache key and of ``metrics.json``."""
    import transformers

    from .. import __version__

    return {"unipruning": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_memory() -> dict[str, float]:
    """Peak resident set size of this process (``peak_rss_mib``, MiB: ``VmHWM``) and, on CUDA, the peak memory the
    caching allocator handed out (``peak_cuda_mib``, ``torch.cuda.max_memory_allocated``, MiB)."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a run started by a large parent
    # (a notebook, a sweep launcher, pytest) would report the parent's size at fork as its own peak.
    out = {"peak_rss_mib": round(peak_rss_bytes() / 2**20, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``<field>: <n> kB`` line of a ``/proc`` file, in bytes; None where the file or the line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now, bytes (``/proc/self/status``; the peak so far where that is missing)."""
    now = _proc_bytes("/proc/self/status", "VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``VmHWM``), bytes."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_available_bytes() -> int:
    """Memory this machine can still give (``MemAvailable``), bytes; the free pages where that is missing."""
    free = _proc_bytes("/proc/meminfo", "MemAvailable")
    return free if free is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_total_bytes() -> int | None:
    """This machine's memory (``MemTotal`` of ``/proc/meminfo``), bytes; None where it cannot be read."""
    return _proc_bytes("/proc/meminfo", "MemTotal")
