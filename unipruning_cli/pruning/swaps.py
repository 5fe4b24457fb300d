"""Swaps of a pruned and a kept weight inside a row (inside an N:M group) that lower the layer's exact output error
on the calibration tokens, the counts kept: the primitive behind ``refine=swap`` (:mod:`..stages.refinement`).

The idea is DSnoT's (Zhang et al., "Dynamic Sparse No Training", ICLR 2024: grow the pruned weight that most
reduces the reconstruction error, prune the kept one that adds the least). DSnoT scores a swap with the mean of the
inputs and stops after a fixed number of cycles (50); here the error is the exact quadratic one per row r,
``E_r = δ_r H δ_rᵀ`` with ``δ = W ⊙ (1 - mask)`` and ``H = XᵀX``, every accepted move lowers it, and a round takes a
batch of swaps per row whose joint change is computed exactly, so the loop runs until no swap helps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.errors import UserError
from .mask_solvers import MASK_SOLVERS


@dataclass
class SwapResult:
    """What :func:`swap_refine` leaves: the refined mask (bool ``[out, in]``), the swaps made (a swap: one weight
    revived, one pruned), the rounds run, and whether it stopped because no swap lowers any row's error (False: the
    round cap or the deadline ended it)."""

    keep: torch.Tensor
    swaps: int
    rounds: int
    converged: bool


def row_output_errors(delta: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """‖ΔW_r X‖² per output row ``[out]`` (fp32) over the calibration tokens, from ``ΔW [out, in]`` and
    ``XᵀX = Σ x xᵀ [in, in]``."""
    d = delta.float()
    return ((d @ xtx.to(d.device).float()) * d).sum(1)


def output_error(delta: torch.Tensor, xtx: torch.Tensor) -> float:
    """‖ΔW X‖² over the calibration tokens: :func:`row_output_errors` summed."""
    return float(row_output_errors(delta, xtx).sum())


def row_errors(weight: torch.Tensor, keep: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """Output error per row ``[out]`` (fp32): ``δ_r H δ_rᵀ`` with ``δ = W ⊙ ¬keep`` ``[out, in]``, ``H = XᵀX [in, in]``."""
    return row_output_errors(weight.float() * ~keep, xtx)


def _single(w, keep, g, h, group):
    """The best single swap per row: (its error change ``[out]``, revived column ``[out]``, pruned column ``[out]``).
    With ``g = δ H``: reviving j changes the error by ``-2 w_j g_j + w_j² H_jj``, then pruning i by
    ``2 w_i g_i - 2 w_i w_j H_ij + w_i² H_ii``. Also returns, for the batch, the per-candidate changes: unstructured,
    (grow ``[out, in]``, drop ``[out, in]`` without the cross term); N:M, (per group best change ``[out, G]``, its
    revived and pruned column inside the group ``[out, G]``)."""
    out, d = w.shape
    rows = torch.arange(out, device=w.device)
    inf = torch.tensor(float("inf"), device=w.device)
    diag = h.diagonal()
    grow = torch.where(keep, inf, -2 * w * g + w * w * diag)
    drop = torch.where(keep, 2 * w * g + w * w * diag, inf)
    if group is None:
        j = grow.argmin(1)
        cross = drop - 2 * w * w[rows, j][:, None] * h[j]
        i = cross.argmin(1)
        return grow[rows, j] + cross[rows, i], j, i, (grow, drop)
    m, n_groups = group, d // group
    hb = h.view(n_groups, m, n_groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, M, M] diagonal blocks
    wg = w.view(out, n_groups, m)
    pair = (grow.view(out, n_groups, m, 1) + drop.view(out, n_groups, 1, m)
            - 2 * wg[..., :, None] * wg[..., None, :] * hb).view(out, n_groups, m * m)
    best, k = pair.min(-1)
    jl, il = k // m, k % m
    gbest = best.argmin(1)
    base = gbest * m
    return best[rows, gbest], base + jl[rows, gbest], base + il[rows, gbest], (best, jl, il)


def _batch(cand, k, group, shape, device):
    """Bool (revive ``[out, in]``, prune ``[out, in]``) of each row's first ``k[r]`` candidate swaps: unstructured,
    ``cand = (grow, drop)`` paired in order (the k best revivals with the k cheapest prunings); N:M, the k groups of
    the best single changes, each with its best pair."""
    out, d = shape
    if group is None:
        grow, drop = cand
        take = torch.arange(d, device=device)[None] < k[:, None]
        z = torch.zeros(shape, dtype=torch.bool, device=device)
        return (z.scatter(1, grow.argsort(1), take), z.clone().scatter(1, drop.argsort(1), take))
    best, jl, il = cand
    n_groups = best.shape[1]
    take = torch.arange(n_groups, device=device)[None] < k[:, None]
    sel = torch.zeros_like(best, dtype=torch.bool).scatter(1, best.argsort(1), take)
    z = torch.zeros(out, n_groups, group, dtype=torch.bool, device=device)
    return (z.scatter(2, jl[..., None], sel[..., None]).view(shape),
            z.clone().scatter(2, il[..., None], sel[..., None]).view(shape))


def _joint_change(w, g, h, grow, drop):
    """Exact change of each row's error ``[out]`` when the columns in ``grow`` are revived and those in ``drop``
    pruned at once: ``2 Δ gᵀ + Δ H Δᵀ`` with ``Δ = W ⊙ (drop - grow)``; also ``Δ H`` ``[out, in]``, what ``g`` gains."""
    delta = w * drop - w * grow
    moved = delta @ h
    return 2 * (delta * g).sum(1) + (moved * delta).sum(1), moved


@torch.no_grad()
def swap_refine(weight: torch.Tensor, keep: torch.Tensor, xtx: torch.Tensor, *, group: Optional[int] = None,
                max_rounds: Optional[int] = None, deadline: Optional[float] = None, batch: bool = True,
                cross: Optional[torch.Tensor] = None, rel_tol: float = 1e-6) -> SwapResult:
    """Refine ``keep`` (bool ``[out, in]``, True = kept) of ``weight`` ``[out, in]`` by swaps that lower the output
    error ``δ_r H δ_rᵀ`` of each row, with ``xtx`` = ``H`` = ``Σ x xᵀ`` ``[in, in]`` over the calibration tokens.

    The best single swap of a row: unstructured (``group=None``), revive the pruned weight whose revival lowers the
    error most, then prune the kept weight that, given it, adds the least (DSnoT's grow-then-prune order); N:M
    (``group=M``), the best pair of one pruned and one kept weight of the same group of M input columns, searched
    exactly over every group. With ``batch``, a round first tries, per row, every swap that helps on its own (N:M:
    the best pair of each such group; unstructured: the k best revivals paired with the k cheapest prunings, as long
    as each pair's own change is negative), halving the batch until its exact joint change (:func:`_joint_change`)
    is at most the best single swap's; a row where no batch does that takes the single swap. A move is taken only
    when it lowers the row's error by more than ``rel_tol`` of it, so the error never rises and the loop ends.

    With ``cross`` = ``X_mᵀ X_d`` ``[in, in]`` (``xtx`` being ``X_mᵀ X_m``: a pass with dense targets,
    :mod:`..data.dense_stream`), the error lowered is the one against the dense layer's output on the dense model's
    inputs, ``‖W X_d - (W ⊙ mask) X_m‖²`` per row ``= δ H δᵀ - 2 δ·b + const`` with ``b = W (H - crossᵀ)``: the same
    moves with ``g = δ H - b`` (the tolerance is then relative to ``δ H δᵀ``).

    Runs until no row has such a move (``converged``), ``max_rounds`` rounds (None: no cap) or past ``deadline``
    (a ``time.monotonic()`` value). The kept count of every row (and every group) is the input's. Raises
    ``ValueError`` for shapes that do not match."""
    if keep.shape != weight.shape or keep.dtype != torch.bool or xtx.shape != (weight.shape[1],) * 2:
        raise ValueError(f"swap_refine: weight {tuple(weight.shape)}, keep {tuple(keep.shape)} {keep.dtype}, "
                         f"xtx {tuple(xtx.shape)}: keep must be bool like weight, xtx [in, in]")
    if group is not None and weight.shape[1] % group:
        raise ValueError(f"swap_refine: {weight.shape[1]} input columns are not groups of {group}")
    w = weight.detach().float()
    h = xtx.to(w.device).float()
    keep = keep.to(w.device).clone()
    rows = torch.arange(w.shape[0], device=w.device)
    if cross is not None and cross.shape != h.shape:
        raise ValueError(f"swap_refine: cross {tuple(cross.shape)} is not [in, in] like xtx {tuple(h.shape)}")
    b = 0.0 if cross is None else w @ (h - cross.to(w.device).float().t())
    g = (w * ~keep) @ h - b
    swaps = rounds = 0
    converged = False
    while max_rounds is None or rounds < max_rounds:
        if deadline is not None and time.monotonic() > deadline:
            break
        err = ((w * ~keep) * (g + b)).sum(1).clamp_min(0)
        change, j, i, cand = _single(w, keep, g, h, group)
        ok = (change < -rel_tol * err) & torch.isfinite(change)
        if not ok.any():
            converged = True
            break
        rounds += 1
        grow = torch.zeros_like(keep)
        drop = torch.zeros_like(keep)
        r, jr, ir = rows[ok], j[ok], i[ok]
        grow[r, jr] = True
        drop[r, ir] = True
        gain = torch.zeros_like(g)  # what g = δ H gains this round, row by row (δ_i: 0 -> w_i, δ_j: w_j -> 0)
        gain[r] = w[r, ir, None] * h[ir] - w[r, jr, None] * h[jr]
        if batch:
            if group is None:
                helps = cand[0].sort(1).values + cand[1].sort(1).values < -rel_tol * err[:, None]
            else:
                helps = cand[0] < -rel_tol * err[:, None]
            k = torch.where(ok, helps.sum(1), 0)
            while bool((k >= 2).any()):
                trial = (k >= 2).nonzero().flatten()
                tg, td = _batch(tuple(c[trial] for c in cand), k[trial], group, (len(trial), w.shape[1]), w.device)
                joint, moved = _joint_change(w[trial], g[trial], h, tg, td)
                good = joint <= change[trial]
                grow[trial[good]], drop[trial[good]] = tg[good], td[good]
                gain[trial[good]] = moved[good]
                k[trial[good]] = 0
                k[trial[~good]] //= 2
        keep = (keep | grow) & ~drop
        g += gain
        swaps += int(grow.sum())
    return SwapResult(keep, swaps, rounds, converged)


def validate_refine(cfg) -> None:
    """Raise :class:`UserError` for ``refine``, ``refine_rounds``, ``refine_seconds`` or ``layer_target`` out of
    range."""
    if cfg.refine not in ("none", "swap"):
        raise UserError(f"refine={cfg.refine!r}: expected one of none, swap")
    if cfg.layer_target not in ("pruned", "dense"):
        raise UserError(f"layer_target={cfg.layer_target!r}: expected one of pruned, dense")
    if cfg.layer_target == "dense" and cfg.refine == "none" and cfg.reconstruct not in MASK_SOLVERS:
        raise UserError("layer_target=dense sets what refine=swap and reconstruct=obs|admm lower; this run does neither: "
                        "add one of them, or drop layer_target")
    rounds, seconds = cfg.refine_rounds, cfg.refine_seconds
    if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
        raise UserError(f"refine_rounds={rounds!r}: expected a whole number of rounds >= 1, or null (until no swap "
                        "lowers the error)")
    if seconds is not None and not seconds > 0:
        raise UserError(f"refine_seconds={seconds!r}: expected a time budget in seconds > 0 per cut, or null")
