"""stochRIA: the randomised RIA variant that UniPruning's search actually optimises against.

Exact RIA needs full row and column sums of ``|W|``; the UniPruning reference instead sums over
random subsets that are redrawn at every step, which injects noise into the per-step metric
(the search's Γ/EMA recursion averages it out). See spec §2.4.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import METRICS, SUM_EPS, LocalMetric, abs_fp32, check_float, require_stats, set_knob
from ..data.stats import ActivationStats

NORMALIZE_MODES = ("mean_abs", "none")
SAMPLERS = ("auto", "exact", "cyclic")


def subset_size(beta: float, out_features: int, in_features: int) -> int:
    """``τ_s = max(1, floor(β · min(out, in)))``: entries summed per row and per column."""
    return max(1, math.floor(beta * min(out_features, in_features)))


def draw_subsets(
    out_features: int,
    in_features: int,
    tau: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the random subsets: ``τ`` distinct columns per row, ``τ`` distinct rows per column.

    Returns ``(row_cols, col_rows)``: ``row_cols[i]`` ([out, τ]) holds the columns summed for
    row ``i``; ``col_rows[:, j]`` ([τ, in]) holds the rows summed for column ``j``.

    Each subset is the top-``τ`` of a fresh U(0,1) matrix ``[out, in]`` (along dim 1 for rows,
    dim 0 for columns), which picks ``τ`` distinct indices uniformly at random for all rows at
    once. The order of draws is fixed, and is part of the contract that makes a seeded run
    reproducible: first the row-subset matrix, then the column-subset matrix, both with
    ``torch.rand(out, in, generator=generator)``.

    Draws happen on the generator's device (else on ``device``, from the global RNG), so a CPU
    generator gives the same subsets whatever device the weight lives on.
    """
    draw_device = generator.device if generator is not None else device
    row_noise = torch.rand(out_features, in_features, generator=generator, device=draw_device)
    row_cols = row_noise.topk(tau, dim=1, sorted=False).indices
    del row_noise  # free before the second draw: two [out, in] fp32 buffers are not needed
    col_noise = torch.rand(out_features, in_features, generator=generator, device=draw_device)
    col_rows = col_noise.topk(tau, dim=0, sorted=False).indices
    return row_cols.to(device), col_rows.to(device)


def cyclic_subset_sums(
    abs_w: torch.Tensor, tau: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subset sums ``(r [out], c [in])`` from cyclic windows of one random permutation.

    Row ``i`` sums the ``τ`` columns ``π[(o_i + t) mod in]``, t < τ, for a random permutation ``π``
    of the columns and a random offset ``o_i`` (columns likewise with their own ``π'``, ``o'_j``).
    Each row's subset is marginally a uniform ``τ``-subset, exactly as in ``draw_subsets``, but the
    subsets of different rows share ``π``: the joint law differs from independent draws. In
    exchange it costs a permutation and a cumulative sum instead of two top-k selections over
    random ``[out, in]`` matrices (about 10x cheaper on CPU; ``scripts/bench_search.py``).
    Draw order: column permutation, row offsets, row permutation, column offsets.
    """
    out_features, in_features = abs_w.shape
    dev = generator.device if generator is not None else abs_w.device
    perm_cols = torch.randperm(in_features, generator=generator, device=dev).to(abs_w.device)
    row_offsets = torch.randint(0, in_features, (out_features,), generator=generator, device=dev)
    perm_rows = torch.randperm(out_features, generator=generator, device=dev).to(abs_w.device)
    col_offsets = torch.randint(0, out_features, (in_features,), generator=generator, device=dev)
    row_sum = _cyclic_window_sums(abs_w[:, perm_cols], row_offsets.to(abs_w.device), tau)
    col_sum = _cyclic_window_sums(abs_w[perm_rows, :].t(), col_offsets.to(abs_w.device), tau)
    return row_sum, col_sum


def _cyclic_window_sums(a: torch.Tensor, offsets: torch.Tensor, tau: int) -> torch.Tensor:
    """For each row k of ``a`` [K, n]: Σ_{t<τ} a[k, (offsets[k] + t) mod n], via one fp64 cumsum."""
    padded = torch.cat([torch.zeros_like(a[:, :1]), a, a[:, :tau]], dim=1).double().cumsum(dim=1)
    idx = offsets.long().unsqueeze(1)
    return (padded.gather(1, idx + tau) - padded.gather(1, idx)).squeeze(1).float()


@METRICS.register("stochria")
@dataclass(frozen=True)
class StochRIA(LocalMetric):
    """Stochastic RIA: ``M_ij = (|W_ij| / c_j + |W_ij| / r_i) · (E[x_j²])^act_exponent``.

    With ``τ_s = max(1, floor(beta · min(out, in)))`` and fresh random subsets per call:

    * ``r_i = Σ_{j ∈ S_i} |W_ij|`` over ``τ_s`` distinct random columns ``S_i`` of row ``i``;
    * ``c_j = Σ_{i ∈ T_j} |W_ij|`` over ``τ_s`` distinct random rows ``T_j`` of column ``j``;
    * both floored at 1e-12 (an all-zero subset gives a zero term, not NaN).

    The subset sums are *not* rescaled by default, as in the UniPruning reference: relative to
    exact RIA the column term is then weighted ``out/τ_s`` and the row term ``in/τ_s``, which
    differ for rectangular matrices. ``rescale_subsums=True`` multiplies ``r_i`` by ``in/τ_s``
    and ``c_j`` by ``out/τ_s`` so they estimate the full sums. ``E[x_j²]`` is
    ``stats.mean_sq``; exponent 0.35 on the mean square is ``RMS_j^0.7``.

    With ``normalize="mean_abs"`` the result is divided by ``mean(|M|)`` over the matrix (skipped
    when that mean is 0 or non-finite), so every matrix contributes on the same scale at every
    step whatever its size or activation range.

    Random draws: see ``draw_subsets`` (row-subset matrix first, then column-subset matrix).

    Knobs:
        beta: subset fraction, ``0 < beta <= 1``.
        act_exponent: exponent on ``E[x_j²]``, ``>= 0``.
        rescale_subsums: scale subset sums to full-sum estimates (bool).
        normalize: ``"mean_abs"`` or ``"none"``.
        sampler: ``"exact"`` (independent subsets per row/column, as the reference),
            ``"cyclic"`` (same marginals, shared permutation; see ``cyclic_subset_sums``), or
            ``"auto"``: exact, except where the same W is scored over and over (the frozen search,
            see ``for_repeated_scoring``).
    """

    name: ClassVar[str] = "stochria"
    stochastic: ClassVar[bool] = True

    beta: float = 0.2
    act_exponent: float = 0.35
    rescale_subsums: bool = False
    normalize: str = "mean_abs"
    sampler: str = "auto"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"local metric '{self.name}': sampler={self.sampler!r} is not allowed; "
                f"allowed sampler in {', '.join(repr(m) for m in SAMPLERS)}"
            )
        beta = check_float(self.name, "beta", self.beta, low=0.0, high=1.0, low_inclusive=False)
        act_exponent = check_float(self.name, "act_exponent", self.act_exponent, low=0.0)
        set_knob(self, "beta", beta)
        set_knob(self, "act_exponent", act_exponent)
        if not isinstance(self.rescale_subsums, bool):
            raise ValueError(
                f"local metric '{self.name}': rescale_subsums must be true or false, "
                f"got {self.rescale_subsums!r}"
            )
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(
                f"local metric '{self.name}': normalize={self.normalize!r} is not allowed; "
                f"allowed normalize in {', '.join(repr(m) for m in NORMALIZE_MODES)}"
            )

    def score(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        abs_w = abs_fp32(weight)
        stats = require_stats(self.name, stats, abs_w.shape[1])
        metric = self.stochastic_ri(abs_w, generator)
        metric = metric * stats.mean_sq.to(abs_w.device).pow(self.act_exponent)
        if self.normalize == "mean_abs":
            metric = normalize_mean_abs(metric)
        return metric

    def for_repeated_scoring(self) -> "StochRIA":
        """``auto`` becomes ``cyclic`` when one fixed W is scored at every step of a search.

        With W frozen, Γ is an exponential average of the step metrics, so what it estimates is
        each entry's expectation over the draws, and that depends only on the law of row i's subset
        and of column j's subset: the marginals, which the cyclic sampler shares with the exact
        one. Their joint laws differ, so only the noise around that average changes, at about a
        third of the cost per step (``scripts/bench_frozen_cost.py``). An explicit sampler is kept.
        """
        if self.sampler == "auto":
            return dataclasses.replace(self, sampler="cyclic")
        return self

    def stochastic_ri(
        self, abs_w: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``|W| / c_j + |W| / r_i`` from random subset sums of ``abs_w`` (fp32 ``|W|``)."""
        out_features, in_features = abs_w.shape
        tau = subset_size(self.beta, out_features, in_features)
        if self.sampler == "cyclic":
            row_sum, col_sum = cyclic_subset_sums(abs_w, tau, generator)
        else:
            row_cols, col_rows = draw_subsets(out_features, in_features, tau, generator, abs_w.device)
            row_sum = abs_w.gather(1, row_cols).sum(dim=1)  # [out]
            col_sum = abs_w.gather(0, col_rows).sum(dim=0)  # [in]
        if self.rescale_subsums:
            row_sum = row_sum * (in_features / tau)
            col_sum = col_sum * (out_features / tau)
        row_sum = row_sum.clamp_min(SUM_EPS).unsqueeze(1)
        col_sum = col_sum.clamp_min(SUM_EPS).unsqueeze(0)
        return abs_w / col_sum + abs_w / row_sum


def normalize_mean_abs(metric: torch.Tensor) -> torch.Tensor:
    """Divide by ``mean(|metric|)`` unless that mean is 0 or non-finite (then return as is).

    Decided on device with ``torch.where`` to avoid a host sync per matrix per step.
    """
    scale = metric.abs().mean()
    usable = torch.isfinite(scale) & (scale > 0)
    return metric / torch.where(usable, scale, torch.ones_like(scale))
