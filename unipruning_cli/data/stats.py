"""Per-layer activation statistics: what calibration hands to a local metric.

Kept separate from calibration (which produces them) and from metrics (which consume them) so
both sides, and saved calibration artifacts, share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..core.errors import UserError


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
    sum:      Σ_tokens x_j, per input channel j, fp64: the channel means of FLAP's fluctuation and bias
              compensation (None in statistics saved before it was kept).
    cross:    Σ_tokens x xᵈᵀ (in x in), fp32, x the input in the pruned model and xᵈ the same token's input in the
              dense model: only in a pass with dense targets (:mod:`.dense_stream`), dropped with ``xtx``.
    """

    sq_sum: torch.Tensor
    count: int
    xtx: Optional[torch.Tensor] = None
    sample_mean_sq: Optional[torch.Tensor] = None
    own_count: Optional[int] = None
    sum: Optional[torch.Tensor] = None
    cross: Optional[torch.Tensor] = None

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's and RIA's activation term), fp32."""
        return self.sq_sum.sqrt().float()

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x_j²] over all calibration tokens, fp32."""
        return (self.sq_sum / max(self.count, 1)).float()

    @property
    def mean(self) -> torch.Tensor:
        """E[x_j] over all calibration tokens, fp64; ``ValueError`` where the sums were not kept."""
        if self.sum is None:
            raise ValueError("these statistics hold no Σx (saved before it was kept): calibrate again")
        return self.sum / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """The sample variance of x_j over the calibration tokens (N - 1 in the denominator), fp64: FLAP's
        fluctuation of the channel (An et al. 2024, Eq. 5); ``ValueError`` where the sums were not kept."""
        n = max(self.count, 2)
        return ((self.sq_sum - self.mean.square() * self.count) / (n - 1)).clamp(min=0)

    @classmethod
    def pooled(cls, group: list["ActivationStats"], own_count: int) -> "ActivationStats":
        """The sums of ``group`` (one projection over all the experts of a layer), for an expert that saw
        ``own_count`` tokens; per-sample rows are concatenated."""
        rows = [s.sample_mean_sq for s in group if s.sample_mean_sq is not None]
        xtx = [s.xtx for s in group if s.xtx is not None]
        sums = [s.sum for s in group if s.sum is not None]
        return cls(sq_sum=sum(s.sq_sum for s in group), count=sum(s.count for s in group),
                   sum=sum(sums[1:], sums[0].clone()) if len(sums) == len(group) else None,
                   xtx=sum(xtx[1:], xtx[0].clone()) if xtx else None,
                   sample_mean_sq=torch.cat(rows) if rows else None, own_count=own_count)

    @classmethod
    def from_mean_sq(cls, mean_sq: torch.Tensor, count: int) -> "ActivationStats":
        """Stats of one batch given its E[x²]; used by the search's per-step metric."""
        return cls(sq_sum=mean_sq.double() * count, count=count)


def check_finite(stats: Mapping[str, ActivationStats], dtype: torch.dtype) -> None:
    """Return if every statistic in ``stats`` (Σx² and, where held, XᵀX) is finite; else raise :class:`UserError`
    naming the first layer, in ``stats``' order (the model's, block by block), whose inputs are not, the ``dtype``
    the model ran in and what to do.

    A NaN or inf here is an overflow of the activations in ``dtype`` at that layer's input or upstream (float16 stops
    at 65504): no score, cut or Hessian built on it means anything, so the run must stop before any of them."""
    for name, s in stats.items():
        bad = [t for t in (s.sq_sum, s.xtx) if t is not None and not torch.isfinite(t).all()]
        if not bad:
            continue
        kind = "NaN" if any(torch.isnan(t).any() for t in bad) else "inf"
        shown = str(dtype).removeprefix("torch.")
        if dtype == torch.float16:
            fix = "model.dtype=bfloat16 (the range of float32) or model.dtype=float32"
        elif dtype != torch.float32:
            fix = "model.dtype=float32"
        else:
            fix = "a finite model: even float32 overflows here, so its weights (or the inputs) hold NaN or inf"
        raise UserError(f"the calibration inputs of {name} are not finite ({kind}) in {shown}: the model's activations "
                        f"overflow {shown}" + (" (largest value 65504)" if dtype == torch.float16 else "")
                        + f" at that layer or before it, so no score or Hessian can rank its weights; try {fix}. "
                        "Nothing was cached and no masks were saved.")
