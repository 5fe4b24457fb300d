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
    own_count: for an expert whose own routed tokens were too few, and whose statistics are its layer's
              pooled ones: the tokens the router sent it (None otherwise).
    """

    sq_sum: torch.Tensor
    count: int
    xtx: Optional[torch.Tensor] = None
    sample_mean_sq: Optional[torch.Tensor] = None
    own_count: Optional[int] = None

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's and RIA's activation term), fp32."""
        return self.sq_sum.sqrt().float()

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_j²] over all calibration tokens, fp32."""
        return (self.sq_sum / max(self.count, 1)).float()

    @classmethod
    def pooled(cls, group: list["ActivationStats"], own_count: int) -> "ActivationStats":
        """The sums of ``group`` (one projection over all the experts of a layer), for an expert that saw
        ``own_count`` tokens; per-sample rows are concatenated."""
        rows = [s.sample_mean_sq for s in group if s.sample_mean_sq is not None]
        xtx = [s.xtx for s in group if s.xtx is not None]
        return cls(sq_sum=sum(s.sq_sum for s in group), count=sum(s.count for s in group),
                   xtx=sum(xtx[1:], xtx[0].clone()) if xtx else None,
                   sample_mean_sq=torch.cat(rows) if rows else None, own_count=own_count)

    @classmethod
    def from_mean_sq(cls, mean_sq: torch.Tensor, count: int) -> "ActivationStats":
        """Stats of one batch given its E[x²]; used by the search's per-step metric."""
        return cls(sq_sum=mean_sq.double() * count, count=count)
