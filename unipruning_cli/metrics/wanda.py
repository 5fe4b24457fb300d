"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import METRICS, LocalMetric, abs_fp32, require_stats
from ..data.stats import ActivationStats


@METRICS.register("wanda")
@dataclass(frozen=True)
class Wanda(LocalMetric):
    """Weights times activations: ``score_ij = |W_ij| · ‖X_j‖₂``.

    ``‖X_j‖₂`` is the L2 norm of input channel ``j`` over all calibration tokens
    (``stats.norm``). A small weight on a channel with large activations can matter more than a
    large weight on a quiet channel, which magnitude alone cannot see.
    """

    name: ClassVar[str] = "wanda"

    def score(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        abs_w = abs_fp32(weight)
        stats = require_stats(self.name, stats, abs_w.shape[1])
        return abs_w * stats.norm.to(abs_w.device)
