"""The search state per prunable matrix, V (dual) and Γ (saliency), and its checkpoints, written one matrix at a time.

Both are fp32 whatever the model dtype: the reference's bf16 accumulation leaves ~1.5k distinct |Γ|
values per matrix and makes top-k tie-breaking arbitrary (spec §1.5).

A checkpoint at ``<dir>/<stem>`` (the run's is ``checkpoints/search``) is a folder ``<stem>.step<N>/`` with one
safetensors file per matrix (its Γ, its V where held, and what the search adds: W, its gradient, Adam's moments)
and one ``common.safetensors`` (RNG states, Adam's step), plus the pointer ``<stem>.json`` (step, config
fingerprint, folder, files). Each file is one group: its tensors come to the host, are written atomically and
released before the next group, so the host never holds more than one matrix's state for a checkpoint (a single
file of everything would hold all of it, about 100 GiB for a 7B model in drift mode). The pointer is replaced
last, atomically, and only then is the previous folder deleted: a checkpoint interrupted half-way is never taken
for a complete one, and the previous one stays usable until then. Reading goes one file at a time as well.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..core.pinned import HostArena
from ..core.rundir import atomic_save_tensors, atomic_write_json, load_tensors

_COMMON = "common.safetensors"


def _pointer(path: Path) -> Path:
    return path.with_suffix(".json")


def _folder(path: Path, step: int) -> Path:
    return path.parent / f"{path.stem}.step{step}"


def write_checkpoint(path: Path, fp: str, step: int, groups: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
                     common: Mapping[str, torch.Tensor] | None = None,
                     extra: Iterable[tuple[str, Mapping[str, torch.Tensor]]] = ()) -> None:
    """Write the checkpoint of ``step`` at ``path``: each ``(name, tensors)`` of ``groups`` (one per matrix) and
    then of ``extra`` (other per-parameter state) to its own file, one after the other (either may be a generator
    that hands out live device tensors: each group is copied to the host only while its file is written), then
    ``common``, then the pointer; then the older folders go."""
    folder = _folder(path, step)
    pointer = _pointer(path)
    current = _read_pointer(pointer)
    if folder.exists():  # a write of this step that was interrupted, or another configuration's checkpoint
        if current is not None and current.get("dir") == folder.name:
            pointer.unlink()
        shutil.rmtree(folder)
    files: dict[str, str] = {}
    extra_files: dict[str, str] = {}
    for k, (name, tensors) in enumerate(groups):
        files[name] = f"m{k:05d}.safetensors"
        atomic_save_tensors(folder / files[name], tensors, {"name": name})
        del tensors
    for k, (name, tensors) in enumerate(extra):
        extra_files[name] = f"x{k:05d}.safetensors"
        atomic_save_tensors(folder / extra_files[name], tensors, {"name": name})
        del tensors
    if common:
        atomic_save_tensors(folder / _COMMON, common)
    atomic_write_json(pointer, {"step": step, "fingerprint": fp, "dir": folder.name, "files": files,
                                "extra": extra_files, "common": _COMMON if common else None})
    for old in path.parent.glob(f"{path.stem}.step*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def _read_pointer(pointer: Path) -> dict | None:
    try:
        return json.loads(pointer.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint, read one group at a time: ``read(name)`` gives that matrix's tensors (on the host)."""

    folder: Path
    step: int
    files: dict[str, str]
    common_file: str | None
    extra_files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, fp: str) -> "Checkpoint | None":
        """The checkpoint at ``path`` if one is complete there and was made by the same configuration."""
        meta = _read_pointer(_pointer(path))
        if meta is None or meta.get("fingerprint") != fp or "dir" not in meta:  # no "dir": an older single-file one
            return None
        folder = path.parent / meta["dir"]
        if not folder.is_dir():
            return None
        return cls(folder, int(meta["step"]), dict(meta["files"]), meta.get("common"), dict(meta.get("extra", {})))

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def read(self, name: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.folder / self.files[name])

    def read_extra(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of the ``extra`` group ``name``; ``KeyError`` when the checkpoint has none of that name."""
        return load_tensors(self.folder / self.extra_files[name])

    def common(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.folder / self.common_file) if self.common_file else {}


@dataclass
class SearchState:
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    gamma: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    arenas: dict[str, HostArena] = field(default_factory=dict)  # "v", "gamma": the pinned memory they are views of

    @classmethod
    def zeros(cls, shapes: dict[str, torch.Size], device: torch.device | str = "cpu", pin: bool = False) -> "SearchState":
        """V = Γ = 0 (fp32) per matrix on ``device``; ``pin``: in page-locked host memory (fast copies to a GPU), each
        of V and Γ one :class:`..core.pinned.HostArena` (power-of-two chunks: not a power of two per matrix)."""
        if pin:
            arenas = {k: HostArena(shapes, torch.float32, pin=True) for k in ("v", "gamma")}
            return cls(v=arenas["v"].tensors, gamma=arenas["gamma"].tensors, arenas=arenas)
        return cls(v={n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in shapes.items()},
                   gamma={n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in shapes.items()})

    def free(self, kind: str) -> None:
        """Drop ``kind`` ("v" or "gamma") and its arena: its memory goes back once no view of it is alive."""
        setattr(self, kind, {})
        arena = self.arenas.pop(kind, None)
        if arena is not None:
            arena.release()

    def save(self, path: Path, fp: str, per_matrix: Callable[[str], Mapping[str, torch.Tensor]] | None = None,
             common: Mapping[str, torch.Tensor] | None = None,
             extra: Iterable[tuple[str, Mapping[str, torch.Tensor]]] = ()) -> None:
        """Checkpoint: per matrix its Γ, its V where held, and ``per_matrix(name)``, one matrix at a time; then
        the ``extra`` groups (see :func:`write_checkpoint`)."""
        def groups():
            for n, g in self.gamma.items():
                tensors = {"gamma": g, **({"v": self.v[n]} if n in self.v else {})}
                yield n, (tensors | dict(per_matrix(n)) if per_matrix else tensors)

        write_checkpoint(path, fp, self.step, groups(), common, extra)

    @classmethod
    def load(cls, path: Path, fp: str) -> "SearchState | None":
        """The state of the checkpoint at ``path`` in new host tensors (Γ, and V where saved), or None (see
        :meth:`Checkpoint.open`). A search that has its tensors already reads :class:`Checkpoint` into them."""
        ck = Checkpoint.open(path, fp)
        if ck is None:
            return None
        state = cls(step=ck.step)
        for n in ck.names:
            tensors = ck.read(n)
            state.gamma[n] = tensors["gamma"]
            if "v" in tensors:
                state.v[n] = tensors["v"]
        return state
