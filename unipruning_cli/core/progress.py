"""What a run shows while it works: rich progress bars (quiet off a terminal), console logging, stage timers."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(stderr=True)
log = logging.getLogger(__name__)


_QUIET = False


def quiet() -> None:
    """No progress bars from this process (the ranks of a launch other than rank 0)."""
    global _QUIET
    _QUIET = True


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=_QUIET or not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def rich_handler(level: int | str = "NOTSET"):
    """Logging handler for Hydra's job_logging config: rich output on the shared stderr console."""
    from rich.logging import RichHandler

    return RichHandler(level=level, console=console, show_path=False)


def console_logging() -> None:
    """INFO logging to the shared stderr console, for the commands that are not Hydra apps."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])


def pinned_host_bytes() -> int | None:
    """Bytes of pinned host memory CUDA's caching host allocator holds now (blocks in use and cached, each rounded up
    to a power of two: ``torch.cuda.host_memory_stats``), or None where that is not known (no such statistic in this
    torch, or no CUDA). The key is looked up by pattern, since torch versions name it differently."""
    import torch

    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - a torch without the statistic, or without CUDA
        return None
    for key in ("allocated_bytes.current", "allocated_bytes.all.current"):
        if key in stats:
            return int(stats[key])
    keys = sorted(k for k in stats if k.startswith("allocated_bytes") and k.endswith(".current"))
    return int(stats[keys[0]]) if keys else None


class Timer:
    """Per named stage, for ``metrics.json``: wall-clock seconds (summed when a stage runs more than once); the
    process's peak host memory so far at the stage's end (``VmHWM``, MiB: the first stage that reaches the run's peak
    is the one that set it; the peak is never reset, so callers' own peak readings stay whole); ``MemAvailable`` of
    the machine at the stage's end (MiB, the least over the stage's runs); and, where CUDA is in use by the stage's
    end, the peak GPU memory the stage allocated and reserved (``torch.cuda.max_memory_allocated`` and
    ``max_memory_reserved``, MiB, both reset when a stage begins) and the pinned host memory CUDA's caching host
    allocator holds at its end (:func:`pinned_host_bytes`, MiB). A stage during which CUDA was first used (the load)
    gets its own CUDA figures, counted from CUDA's start."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cuda_peak_mib: dict[str, float] = {}
        self.cuda_reserved_mib: dict[str, float] = {}
        self.pinned_host_mib: dict[str, float] = {}
        self.host_peak_mib: dict[str, float] = {}
        self.mem_available_mib: dict[str, float] = {}

    def _host_peak(self, name: str) -> None:
        from .provenance import host_available_bytes, peak_rss_bytes

        self.host_peak_mib[name] = round(max(self.host_peak_mib.get(name, 0.0), peak_rss_bytes() / 2**20), 1)
        try:
            available = host_available_bytes() / 2**20
        except (OSError, ValueError):  # no /proc/meminfo and no sysconf figure
            return
        self.mem_available_mib[name] = round(min(self.mem_available_mib.get(name, available), available), 1)

    def _cuda_peaks(self, name: str) -> None:
        import torch

        for peaks, value in ((self.cuda_peak_mib, torch.cuda.max_memory_allocated()),
                             (self.cuda_reserved_mib, torch.cuda.max_memory_reserved())):
            peaks[name] = round(max(peaks.get(name, 0.0), value / 2**20), 1)
        pinned = pinned_host_bytes()
        if pinned is not None:
            self.pinned_host_mib[name] = round(max(self.pinned_host_mib.get(name, 0.0), pinned / 2**20), 1)

    @staticmethod
    def _cuda_in_use() -> bool:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_initialized()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        import torch

        if self._cuda_in_use():  # what ran since the last stage keeps its peaks too, then counting starts again
            self._cuda_peaks("between stages")
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
            self._host_peak(name)
            if self._cuda_in_use():
                self._cuda_peaks(name)
