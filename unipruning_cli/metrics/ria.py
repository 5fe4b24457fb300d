"""RIA (Zhang et al., 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for LLMs")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import METRICS, SUM_EPS, LocalMetric, abs_fp32, check_float, require_stats, set_knob
from ..data.stats import ActivationStats


def relative_importance(abs_w: torch.Tensor) -> torch.Tensor:
    """Exact RI of ``|W|``: each weight relative to its column sum plus relative to its row sum.

    ``RI_ij = |W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|``. Sums are floored at ``SUM_EPS`` so
    an all-zero column or row contributes 0 rather than NaN.
    """
    col_sum = abs_w.sum(dim=0, keepdim=True).clamp_min(SUM_EPS)  # [1, in]: over output rows
    row_sum = abs_w.sum(dim=1, keepdim=True).clamp_min(SUM_EPS)  # [out, 1]: over input cols
    return abs_w / col_sum + abs_w / row_sum


@METRICS.register("ria")
@dataclass(frozen=True)
class RIA(LocalMetric):
    """Relative importance and activations: ``score_ij = RI_ij · (‖X_j‖₂)^a``.

    ``RI_ij = |W_ij| / Σ_i |W_ij| + |W_ij| / Σ_j |W_ij|`` (column sum over output rows plus row
    sum over input columns). Normalising by both sums keeps every row and every column from
    being emptied wholesale, which plain magnitude or Wanda can do to a weak channel.

    Knobs:
        a: exponent on the activation norm, ``a >= 0`` (RIA's default 0.5; 0 ignores
           activations, though statistics are still required).
    """

    name: ClassVar[str] = "ria"

    a: float = 0.5

    def __post_init__(self) -> None:
        set_knob(self, "a", check_float(self.name, "a", self.a, low=0.0))

    def score(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        abs_w = abs_fp32(weight)
        stats = require_stats(self.name, stats, abs_w.shape[1])
        act = stats.norm.to(abs_w.device).pow(self.a)
        return relative_importance(abs_w) * act
