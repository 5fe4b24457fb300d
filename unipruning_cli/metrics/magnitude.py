"""Magnitude pruning: the data-free baseline every other metric is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import METRICS, LocalMetric, abs_fp32
from ..data.stats import ActivationStats


@METRICS.register("magnitude")
@dataclass(frozen=True)
class Magnitude(LocalMetric):
    """Weight magnitude: ``score_ij = |W_ij|``.

    Needs no calibration, so ``stats`` may be None (and is ignored when given).
    """

    name: ClassVar[str] = "magnitude"
    uses_activations: ClassVar[bool] = False

    def score(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return abs_fp32(weight)
