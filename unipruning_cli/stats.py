"""Per-layer activation statistics: what calibration hands to a local metric.

Kept separate from calibration (which produces them) and from metrics (which consume them) so
both sides, and saved calibration artifacts, share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ActivationStats:
    """Statistics of the inputs X (tokens x in_features) that entered one linear layer.

    sq_sum:   Σ_tokens x_j², per input channel j, fp64 (sums of many small squares).
    count:    number of tokens summed.
    xtx:      Σ_tokens x xᵀ (in x in), fp32, only when a method needs the Hessian (SparseGPT).
    sample_mean_sq: per calibration sample mean of x_j² (nsamples x in), fp32, only when the
              search needs one statistic per step (UniPruning frozen mode).
    """

    sq_sum: torch.Tensor
    count: int
    xtx: Optional[torch.Tensor] = None
    sample_mean_sq: Optional[torch.Tensor] = None

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's and RIA's activation term), fp32."""
        return self.sq_sum.sqrt().float()

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_j²] over all calibration tokens, fp32."""
        return (self.sq_sum / max(self.count, 1)).float()

    @classmethod
    def from_mean_sq(cls, mean_sq: torch.Tensor, count: int) -> "ActivationStats":
        """Stats of one batch given its E[x²]; used by the search's per-step metric."""
        return cls(sq_sum=mean_sq.double() * count, count=count)
