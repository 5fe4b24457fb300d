"""The search state per prunable matrix, V (dual) and Γ (saliency), and its checkpoints.

Both are fp32 whatever the model dtype: the reference's bf16 accumulation leaves ~1.5k distinct |Γ|
values per matrix and makes top-k tie-breaking arbitrary (spec §1.5). Checkpoints are safetensors
(tensors) plus a JSON sidecar (step, RNG states as tensors, config fingerprint); a checkpoint is
written atomically, so an interrupted write leaves the previous one usable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..rundir import atomic_save_tensors, atomic_write_json, load_tensors


@dataclass
class SearchState:
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    gamma: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # mode-specific: Adam moments, W, grads, RNG

    @classmethod
    def zeros(cls, shapes: dict[str, torch.Size], device: torch.device | str = "cpu", pin: bool = False) -> "SearchState":
        """V = Γ = 0 (fp32) per matrix on ``device``; ``pin``: in page-locked host memory (fast copies to a GPU)."""
        def z(shape):
            return torch.zeros(shape, dtype=torch.float32, device=device, pin_memory=pin)

        return cls(v={n: z(s) for n, s in shapes.items()}, gamma={n: z(s) for n, s in shapes.items()})

    def to(self, device: torch.device, pin: bool = False) -> None:
        """Move V and Γ to ``device`` (``pin``: page-locked host memory), in place of the current tensors."""
        def move(t):
            return t.to(device).pin_memory() if pin else t.to(device)

        self.v = {n: move(t) for n, t in self.v.items()}
        self.gamma = {n: move(t) for n, t in self.gamma.items()}

    def save(self, path: Path, fp: str) -> None:
        tensors = {f"v/{n}": t for n, t in self.v.items()}
        tensors |= {f"gamma/{n}": t for n, t in self.gamma.items()}
        tensors |= {f"extra/{n}": t for n, t in self.extra.items()}
        atomic_save_tensors(path, tensors)
        atomic_write_json(path.with_suffix(".json"), {"step": self.step, "fingerprint": fp})

    @classmethod
    def load(cls, path: Path, fp: str) -> "SearchState | None":
        """The checkpoint at ``path`` if it exists and was made by the same configuration."""
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fp:
            return None
        tensors = load_tensors(path)
        state = cls(step=int(meta["step"]))
        for key, t in tensors.items():
            kind, name = key.split("/", 1)
            getattr(state, kind)[name] = t
        return state
