"""The run directory: atomic writes, stage completion markers, resume.

Every artifact is written to a temporary sibling and moved into place with ``os.replace``, so a
crash leaves either the old file or the new one, never half of one. A stage is complete only when
its marker ``stages/<stage>.json`` exists and records the same fingerprint (the config values the
stage depends on); a rerun in the same directory skips complete stages and redoes the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch


def _atomic_write(path: Path, write: "callable[[Path], None]") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(data, str(p), metadata=dict(metadata or {})))


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` atomically: a hard link where possible, else a copy.

    Artifacts are only ever replaced (``os.replace``), never rewritten in place, so two runs can
    share one file through a link without one run's later write reaching the other.
    """
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@contextmanager
def file_locks(paths: Iterable[Path]) -> Iterator[None]:
    """Hold exclusive ``flock`` locks on ``paths`` (created if missing) for the block.

    Taken in sorted order, so two processes wanting overlapping sets cannot deadlock. The kernel
    drops a lock when its process dies, so a crashed job never leaves a stale one behind. Used so
    that parallel sweep jobs wanting the same search wait for one of them instead of all searching.
    """
    with ExitStack() as stack:
        for path in sorted({Path(p) for p in paths}):
            path.parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(path, "a"))
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            stack.callback(fcntl.flock, f.fileno(), fcntl.LOCK_UN)
        yield


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-able value: what a stage's result depends on."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunDir:
    """One run's folder. Knows where each artifact goes and which stages are complete."""

    def __init__(self, path: Path, create: bool = True) -> None:
        """``create=False`` only reads: e.g. checking another run's stages must not recreate a deleted run."""
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def _marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def is_complete(self, stage: str, fp: str) -> bool:
        marker = self._marker(stage)
        if not marker.exists():
            return False
        info = json.loads(marker.read_text())
        return info.get("fingerprint") == fp and all((self.path / a).exists() for a in info.get("artifacts", []))

    def mark_complete(self, stage: str, fp: str, artifacts: list[str], seconds: float, **extra: Any) -> None:
        atomic_write_json(
            self._marker(stage),
            {"stage": stage, "fingerprint": fp, "artifacts": artifacts, "seconds": seconds,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra},
        )

    def stage_info(self, stage: str) -> dict:
        return json.loads(self._marker(stage).read_text())

    def invalidate(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)
