"""Training-free mask refinement (``refine=swap``): swaps of a pruned and a kept weight inside a row (inside an N:M
group for N:M masks) that lower the layer's output error on the calibration data, the counts kept.

The idea is DSnoT's (Zhang et al., "Dynamic Sparse No Training", ICLR 2024: grow the pruned weight that most
reduces the reconstruction error, prune the kept one that adds the least). DSnoT scores a swap with the mean of
the inputs (its expected error); here the error is the exact quadratic one on the calibration tokens,
``E_r = δ_r H δ_rᵀ`` per row r with ``δ = W ⊙ (1 - mask)`` and ``H = XᵀX``, so every accepted swap lowers it.

Block by block on the calibration samples, sequentially (block i's ``H`` from the outputs of the refined blocks
< i), like :mod:`.reconstruction`. The model keeps its original weights times the (refined) mask.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import torch

from ..pruning.block_loop import PassSettings, block_pass
from ..core.context import RunContext
from ..pruning.mask_files import packed_masks, read_masks_header, save_masks
from ..pruning.targets import is_experts_tag, is_sliced_tag, nm_of_tag
from .reconstruction import output_error, row_output_errors

log = logging.getLogger(__name__)

#: Rounds of swaps per matrix (each round: at most one swap per row). DSnoT's published cap is 50 cycles.
MAX_ROUNDS = 50


def row_errors(weight: torch.Tensor, keep: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """Output error per row ``[out]`` (fp32): ``δ_r H δ_rᵀ`` with ``δ = W ⊙ ¬keep`` ``[out, in]``, ``H = XᵀX [in, in]``."""
    return row_output_errors(weight.float() * ~keep, xtx)


@torch.no_grad()
def swap_refine(weight: torch.Tensor, keep: torch.Tensor, xtx: torch.Tensor, *, group: Optional[int] = None,
                max_rounds: int = MAX_ROUNDS, rel_tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Refine ``keep`` (bool ``[out, in]``, True = kept) of ``weight`` ``[out, in]`` by swaps that lower the output
    error ``δ_r H δ_rᵀ`` of each row, with ``xtx`` = ``H`` = ``Σ x xᵀ`` ``[in, in]`` over the calibration tokens.

    Each round makes at most one swap per row, and only one that lowers that row's error by more than ``rel_tol``
    of it (so the error never rises and the loop ends):

    - unstructured (``group=None``): revive the pruned weight whose revival lowers the error most, then prune the
      kept weight that, given that revival, adds the least (DSnoT's grow-then-prune order);
    - N:M (``group=M``): the best pair of one pruned and one kept weight of the same group of M consecutive input
      columns, searched exactly over every group of the row.

    With ``g = δ H``: reviving j changes the error by ``-2 w_j g_j + w_j² H_jj``, then pruning i by
    ``2 w_i g_i - 2 w_i w_j H_ij + w_i² H_ii``. Returns (the refined mask, the number of swaps); the kept count of
    every row (and every group) is the input's. Raises ``ValueError`` for shapes that do not match."""
    if keep.shape != weight.shape or keep.dtype != torch.bool or xtx.shape != (weight.shape[1],) * 2:
        raise ValueError(f"swap_refine: weight {tuple(weight.shape)}, keep {tuple(keep.shape)} {keep.dtype}, "
                         f"xtx {tuple(xtx.shape)}: keep must be bool like weight, xtx [in, in]")
    if group is not None and weight.shape[1] % group:
        raise ValueError(f"swap_refine: {weight.shape[1]} input columns are not groups of {group}")
    w = weight.detach().float()
    h = xtx.to(w.device).float()
    keep = keep.to(w.device).clone()
    out, d = w.shape
    rows = torch.arange(out, device=w.device)
    diag = h.diagonal()
    delta = w * ~keep
    g = delta @ h
    inf = torch.tensor(float("inf"), device=w.device)
    swaps = 0
    for _ in range(max_rounds):
        err = (delta * g).sum(1)
        grow = torch.where(keep, inf, -2 * w * g + w * w * diag)   # revive j (pruned)
        drop = torch.where(keep, 2 * w * g + w * w * diag, inf)    # prune i (kept), before the cross term
        if group is None:
            j = grow.argmin(1)
            wj = w[rows, j]
            drop = drop - 2 * w * wj[:, None] * h[j]
            i = drop.argmin(1)
            change = grow[rows, j] + drop[rows, i]
        else:
            m, n_groups = group, d // group
            hb = h.view(n_groups, m, n_groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, M, M] blocks
            wg = w.view(out, n_groups, m)
            pair = (grow.view(out, n_groups, m, 1) + drop.view(out, n_groups, 1, m)
                    - 2 * wg[..., :, None] * wg[..., None, :] * hb)
            k = pair.view(out, -1).argmin(1)
            change = pair.view(out, -1)[rows, k]
            base = (k // (m * m)) * m
            j, i = base + (k // m) % m, base + k % m
        ok = change < -rel_tol * err.clamp_min(0)
        ok &= torch.isfinite(change)
        if not ok.any():
            break
        r, jr, ir = rows[ok], j[ok], i[ok]
        keep[r, jr] = True
        keep[r, ir] = False
        delta[r, jr] = 0
        delta[r, ir] = w[r, ir]
        g[r] += w[r, ir, None] * h[ir] - w[r, jr, None] * h[jr]
        swaps += int(ok.sum())
    return keep, swaps


@torch.no_grad()
def refine(model, windows, masks: Mapping[str, torch.Tensor], *, nm: Optional[tuple[int, int]] = None,
           settings: PassSettings = PassSettings()) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`swap_refine` of every prunable layer of ``model`` (dense on entry and on return: each block is pruned
    with its refined masks for the blocks after it, and the values it zeroed are put back at the end, as
    :func:`.baselines.sequential_masks` does), block by block on ``windows`` (the calibration samples, int64 ``[n, seqlen]`` or
    :class:`..data.sampling.TokenSamples`), sequentially. ``masks``: name -> bool ``[out, in]``; ``nm``: the (N, M) of
    an N:M cut, whose swaps stay inside a group. Returns (the refined masks on the host, the record
    ``{"method": "swap", "swaps": n, "fraction": swaps per weight, "error_ratio": r}``, r being the output error of
    the refined masks over that of the given ones, summed over every layer on its calibration inputs)."""
    before = after = 0.0
    swaps = numel = 0

    def step(i, layers, stats):
        nonlocal before, after, swaps, numel
        block = {}
        for name, layer in layers.items():
            w = layer.weight.data
            xtx = stats[name].xtx.to(w.device)
            keep = masks[name].to(w.device)
            block[name], n = swap_refine(w, keep, xtx, group=nm[1] if nm else None)
            before += output_error(w.float() * ~keep, xtx)
            after += output_error(w.float() * ~block[name], xtx)
            swaps += n
            numel += w.numel()
        return block

    refined = block_pass(model, windows, step, settings, want_hessian=True, restore=True).masks
    ratio = after / before if before > 0 else 1.0
    log.info("swap refinement: %d swaps (%.3g%% of the weights), output error on the calibration data %.3g of the "
             "given masks'", swaps, 100 * swaps / max(numel, 1), ratio)
    return refined, {"method": "swap", "swaps": swaps, "fraction": swaps / max(numel, 1), "error_ratio": ratio}


def refine_cuts(ctx: RunContext, all_masks: Mapping[str, Mapping[str, torch.Tensor]]
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """:func:`refine` of every cut of ``all_masks`` (tag -> name -> bool ``[out, in]``; an N:M tag, ``2of4`` or
    ``wanda:2of4``, keeps its swaps inside groups) on the run's calibration samples (``ctx.calibration()``).
    ``ctx.model`` is dense on entry and on return. Returns (tag -> refined masks, tag -> record)."""
    windows, _ = ctx.calibration()
    masks, records = {}, {}
    for tag, cut in all_masks.items():
        log.info("refine=swap: %s", tag)
        new, records[tag] = refine(ctx.model, windows, cut, nm=nm_of_tag(tag), settings=ctx.passes)
        masks[tag] = packed_masks(new)
    return masks, records


def refine_stage(ctx: RunContext, all_masks: dict[str, dict[str, torch.Tensor]]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """``refine=swap`` in a run: :func:`refine_cuts` of the cuts in ``all_masks``, each refined mask written over its
    file in ``ctx.rd/masks/`` (its header then says ``"refine": "swap"``); a file that already says so (a resumed run)
    is taken as it is. With ``refine=none``: ``all_masks`` unchanged and no records."""
    if ctx.cfg.refine != "swap":
        return all_masks, {}
    rd = ctx.rd
    paths = {tag: rd / f"masks/{tag}.safetensors" for tag in all_masks}
    headers = {tag: read_masks_header(p)[1] for tag, p in paths.items() if p.is_file()}
    todo = {tag: m for tag, m in all_masks.items() if headers.get(tag, {}).get("refine") != "swap"
            and not is_sliced_tag(tag) and not is_experts_tag(tag)}  # a swap moves single weights: a channels cut stays whole channels
    with ctx.timer.stage("refine"):
        refined, records = refine_cuts(ctx, todo)
    for tag in refined:
        if tag in headers:
            save_masks(paths[tag], refined[tag], {**headers[tag], "refine": "swap"})
    return {**all_masks, **refined}, records
