"""Reconstruction on a given mask (``reconstruct=obs|admm``): after a mask is cut, by any method, each layer's kept
weights are updated with the mask fixed (:mod:`..pruning.mask_solvers`: ``obs``, SparseGPT's update without its mask
choice, llm-compressor's "preserve the sparsity mask"; ``admm``, ALPS's exact solve on the mask). After a cut of whole
MLP channels (``reconstruct=ls``), the projection that reads them is refit on the kept ones by least squares
(:func:`..pruning.channels.ls_refit`).

Block by block on the calibration samples, sequentially as SparseGPT prunes: block i's statistics come from the
outputs of the already-reconstructed blocks < i, and its outputs are recomputed with its new weights before they
feed block i + 1. The model then holds different weights than the dense model times the mask: a run says so in
``metrics.json`` (``reconstruct``), and export and apply treat its cuts accordingly.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from omegaconf import OmegaConf

from ..data.calibration_set import dense_statistics
from ..pruning.channels import bias_shift, channels_of_masks, ls_refit, mlp_channels
from ..pruning.weights import apply_masks
from ..pruning.heads import attention_heads, head_counts, heads_of_masks
from ..models.layouts import text_config
from ..pruning.obs import dense_target_weight
from ..pruning.mask_solvers import MASK_SOLVERS, percdamp_of, solve_on_mask
from ..pruning.swaps import output_error
from ..pruning.block_loop import PassSettings, block_pass
from ..core.context import RunContext
from .refinement import SwapRefiner

log = logging.getLogger(__name__)

RECONSTRUCTIONS = ("none", *MASK_SOLVERS, "ls", "bias")


@torch.no_grad()
def _rewrite_pass(model, windows, settings: PassSettings, rewrite, what: str,
                  masks: Mapping[str, torch.Tensor] | None = None, prepare=None,
                  refiner: SwapRefiner | None = None, dense: bool = False) -> dict:
    """One sequential pass in which ``rewrite(name, W, stats)`` gives a layer's new weight and the keep mask it
    honours (``(new, keep)``; None: the layer is left alone); ``masks``, if given, are applied by the loop after each
    block's rewrites; ``prepare(i, layers, stats)``, if given, runs on each block before its rewrites; the pass
    carries dense targets where ``dense`` or ``refiner`` wants them. Returns ``{"layers": n, "error_ratio": r}``: ‖ΔW X‖² of the new weights over that of W ⊙ keep,
    summed over the rewritten layers on their calibration inputs."""
    before = after = 0.0
    count = 0

    def step(i, layers, stats):
        nonlocal before, after, count
        if prepare is not None:
            prepare(i, layers, stats)
        for name, layer in layers.items():
            w = layer.weight.data
            got = rewrite(name, w, stats[name])
            if got is None:
                continue
            new, keep = got
            xtx = stats[name].xtx
            before += output_error(w.float() * keep.to(w.device) - w.float(), xtx)
            after += output_error(new.float() - w.float(), xtx)
            w.copy_(new)
            count += 1
        return None if masks is None else {n: masks[n] for n in layers if n in masks}

    targets = dense or (refiner is not None and refiner.dense)
    block_pass(model, windows, step, settings, want_hessian=True, dense_targets=targets,
               drift=refiner.drift if refiner is not None and refiner.dense else None)
    ratio = after / before if before > 0 else 1.0
    log.info("%s of %d matrices: output error on the calibration data %.3g of the masked weights'", what, count, ratio)
    return {"layers": count, "error_ratio": ratio}


def reconstruct(model, windows, masks: Mapping[str, torch.Tensor], settings: PassSettings = PassSettings(),
                refiner: SwapRefiner | None = None, dense: bool = False, solver: str = "obs",
                percdamp: float | None = None) -> dict:
    """Set every prunable weight of ``model`` (dense on entry) to its reconstruction on ``masks`` (name -> bool
    ``[out, in]``, True = keep) by ``solver`` (:data:`..pruning.mask_solvers.MASK_SOLVERS`: ``obs``, SparseGPT's
    sweep; ``admm``, ALPS's exact solve on the mask), H damped by ``percdamp`` of its mean diagonal (None: the solver's
    :data:`..pruning.mask_solvers.DEFAULT_PERCDAMP`). ``windows``: the calibration samples (int64 ``[n, seqlen]`` or
    :class:`..data.sampling.TokenSamples`). With a ``refiner`` (``refine=swap``), each block's masks are first
    refined by swaps (:class:`.refinement.SwapRefiner`, its refined masks and record then in it) on the same
    statistics, so refinement and reconstruction share one calibration pass. ``dense`` (``layer_target=dense``): the
    update lowers the error against the dense layer's output on the dense model's inputs (the solve from
    :func:`..pruning.obs.dense_target_weight`, the pass carrying dense targets). Returns ``{"layers": n,
    "error_ratio": r}``: the output error on the calibration data of the reconstructed weights over that of the
    masked dense weights, ‖ΔW X‖² summed over every layer (below 1 where it helped). Raises ``ValueError`` from the
    solve (a non-finite Hessian). The record also says ``"target"``: ``"pruned"`` or ``"dense"`` (``error_ratio`` is
    always on the pruned model's inputs against the layer's own output), and ``"percdamp"``, the damping used. Raises
    ``ValueError`` for an unknown ``solver``, before the pass."""
    percdamp = percdamp_of(solver, percdamp)
    keeps = dict(masks)

    def prepare(i, layers, stats):
        keeps.update(refiner.block(i, layers, stats))

    def rewrite(name, w, st):
        keep = keeps[name].to(w.device)
        start = w if not dense or st.cross is None else dense_target_weight(w, st.xtx, st.cross, percdamp).to(w.dtype)
        return solve_on_mask(solver, start, (2.0 / max(st.count, 1)) * st.xtx.to(w.device), keep, name, percdamp), keep

    what = f"swap refinement, then {solver} reconstruction on the refined masks" if refiner else \
        f"{solver} reconstruction on the fixed masks"
    record = _rewrite_pass(model, windows, settings, rewrite, what, prepare=prepare if refiner else None,
                           refiner=refiner, dense=dense)
    return {**record, "target": "dense" if dense else "pruned", "percdamp": percdamp}


def with_solver_damping(cfg):
    """``cfg`` (a run's config) with ``reconstruct_percdamp`` made the solver's own number
    (:data:`..pruning.mask_solvers.DEFAULT_PERCDAMP`) where it is null and ``reconstruct`` is ``obs`` or ``admm``; else
    ``cfg`` itself. A run saves the number, so its export and re-evaluation redo the update with the damping it used
    even after the default changes."""
    if cfg.get("reconstruct") not in MASK_SOLVERS or cfg.get("reconstruct_percdamp") is not None:
        return cfg
    return OmegaConf.merge(cfg, {"reconstruct_percdamp": percdamp_of(cfg.reconstruct, None)})


def reconstruct_cut(ctx: RunContext, masks: Mapping[str, torch.Tensor], refiner: SwapRefiner | None = None) -> dict:
    """:func:`reconstruct` of ``ctx.model`` (dense on entry) on ``masks`` with the run's calibration samples
    (``ctx.calibration()``: source, nsamples, seqlen, seed, BOS as the run's), refined first by ``refiner`` if
    given; returns its record."""
    return reconstruct(ctx.model, ctx.calibration()[0], masks, ctx.passes, refiner, ctx.cfg.layer_target == "dense",
                       ctx.cfg.reconstruct, ctx.cfg.reconstruct_percdamp)


def kept_columns(model, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projection after each cut of a channels or heads cut's ``masks`` (``down_proj``, ``o_proj``) -> its kept
    input columns (bool); ``ValueError`` for masks that are not whole channels or KV groups."""
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    if any(n.rpartition(".")[2] == "o_proj" for n in masks):  # a heads cut: whole KV groups
        atts = attention_heads(shapes, *head_counts(text_config(model)))
        return {a.o: a.expand(heads_of_masks(masks, a), a.o) for a in atts}
    return {mlp.output: channels_of_masks(masks, mlp) for mlp in mlp_channels(shapes)}


def refit_channels(model, windows, masks: Mapping[str, torch.Tensor], settings: PassSettings = PassSettings()) -> dict:
    """Apply a channels (or heads) cut's ``masks`` (name -> bool ``[out, in]``, whole channels: :func:`..pruning.
    channels.channel_masks`; whole KV groups: :func:`..pruning.heads.head_masks`) to ``model`` (dense on entry) with
    each MLP's output projection (``o_proj``) refit on its kept channels (heads)
    (:func:`..pruning.channels.ls_refit`), block by block on ``windows`` (the calibration samples), sequentially.
    Returns ``{"layers": n, "error_ratio": r}``: the projections' output error on the calibration data after the
    refit over that of the masked weights. Raises ``ValueError`` for masks that are not whole channels."""
    keeps = kept_columns(model, masks)

    def rewrite(name, w, st):
        return (ls_refit(w, st.xtx, keeps[name]), keeps[name]) if name in keeps else None

    return _rewrite_pass(model, windows, settings, rewrite, "least-squares refit on the kept channels (heads)", masks)


def refit_cut(ctx: RunContext, masks: Mapping[str, torch.Tensor]) -> dict:
    """:func:`refit_channels` of ``ctx.model`` (dense on entry) with the run's calibration samples; its record."""
    return refit_channels(ctx.model, ctx.calibration()[0], masks, ctx.passes)


@torch.no_grad()
def compensate_cut(ctx: RunContext, masks: Mapping[str, torch.Tensor]) -> tuple[dict, list]:
    """``reconstruct=bias``: apply a channels cut's ``masks`` to ``ctx.model`` (dense on entry) and add FLAP's bias
    compensation (:func:`..pruning.channels.bias_shift`, An et al. 2024, Eq. 8) to each MLP's output projection, from
    the dense model's mean input on the run's calibration samples (one-shot, as FLAP computes it). A projection
    without a bias gets one. Returns (the record ``{"layers": n}``, the undo list: (module, its bias before)) for
    :func:`undo_biases`. Raises ``ValueError`` for masks that are not whole channels."""
    stats = dense_statistics(ctx.cfg, ctx.model, ctx.calibration()[0])[0]
    mlps = mlp_channels({n: tuple(m.shape) for n, m in masks.items()})
    shifts = {}
    for mlp in mlps:  # from the dense weights: the masks zero the very columns the shift reads
        layer = ctx.layers[mlp.output]
        shifts[mlp.output] = bias_shift(layer.weight, stats[mlp.output].mean, channels_of_masks(masks, mlp))
    apply_masks(ctx.layers, masks)
    undo = []
    for name, shift in shifts.items():
        layer = ctx.layers[name]
        undo.append((layer, layer.bias))
        base = layer.bias.detach().float() if layer.bias is not None else torch.zeros_like(shift)
        layer.bias = torch.nn.Parameter((base + shift.to(base.device)).to(layer.weight.dtype), requires_grad=False)
    log.info("FLAP's bias compensation of %d projections after the channels", len(shifts))
    return {"layers": len(shifts)}, undo


def undo_biases(undo: list) -> None:
    """Put back the biases :func:`compensate_cut` replaced."""
    for layer, bias in reversed(undo):
        layer.bias = bias
