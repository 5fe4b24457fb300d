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


class Timer:
    """Wall-clock seconds per named stage (summed when a stage runs more than once), the process's peak host memory
    so far at the end of each stage (``VmHWM``, MiB: the first stage that reaches the run's peak is the one that set
    it; the peak is never reset, so callers' own peak readings stay whole) and, where CUDA is in use, the peak GPU
    memory each stage allocated (``torch.cuda.max_memory_allocated``, MiB), for ``metrics.json``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cuda_peak_mib: dict[str, float] = {}
        self.host_peak_mib: dict[str, float] = {}

    def _host_peak(self, name: str) -> None:
        from .provenance import peak_rss_bytes

        self.host_peak_mib[name] = round(max(self.host_peak_mib.get(name, 0.0), peak_rss_bytes() / 2**20), 1)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:  # what ran since the last stage keeps its peak too, then counting starts again
            self.cuda_peak_mib["between stages"] = round(max(self.cuda_peak_mib.get("between stages", 0.0),
                                                             torch.cuda.max_memory_allocated() / 2**20), 1)
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
            self._host_peak(name)
            if cuda:
                self.cuda_peak_mib[name] = round(max(self.cuda_peak_mib.get(name, 0.0),
                                                     torch.cuda.max_memory_allocated() / 2**20), 1)
