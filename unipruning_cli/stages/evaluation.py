"""A run's evaluation protocol: windows per corpus, then perplexity, zero-shot and measured sparsity of a model.

The perplexity protocol is the papers' (docs/methods.md, "Methods and what they compute"): WikiText-2 (and the
offline corpora, files) joined and tokenised once, cut into non-overlapping ``eval.seqlen`` windows; C4
``eval.random_windows`` (256) random windows inside one document each, seed 0 (GPTQ / SparseGPT
``datautils.py``); at most ``eval.max_windows`` either way, BOS put first when ``model.add_bos``;
PPL = exp(mean per-window NLL). Zero-shot goes through
lm-eval on the model object in memory (:mod:`..evaluation.zeroshot`).
"""

from __future__ import annotations

from typing import Mapping

import torch
from omegaconf import DictConfig
from torch import nn

from ..data.corpora import eval_samples
from ..pruning.masks import count_zeros
from ..pruning.mask_solvers import MASK_SOLVERS
from ..pruning.weights import apply_masks, restore_weights
from ..models.loading import prunable_layers, resolve_add_bos
from ..core.pinned import HostCopy
from ..core.context import RunContext
from .reconstruction import compensate_cut, reconstruct_cut, refit_cut, undo_biases
from .refinement import refiner_of, refines_in_reconstruction, save_refined, unrefined
from ..pruning.experts import experts_of_masks, moe_layers, remove_experts
from ..pruning.targets import is_channels_tag, is_experts_tag, is_sliced_tag
from ..data.sampling import with_bos
from ..evaluation.perplexity import perplexity


def eval_windows_of(cfg: DictConfig, tok) -> dict[str, torch.Tensor]:
    """Evaluation windows per corpus (``int64 [windows, seqlen]``, :func:`..data.corpora.eval_samples`), tokenised once per run.

    Raises :class:`UserError` (from :mod:`..data.corpora`) for a corpus too short for one window: early, before any search.
    """
    return {c: _eval_windows(cfg, tok, c) for c in cfg.eval.corpora}


def _eval_windows(cfg: DictConfig, tok, corpus: str) -> torch.Tensor:
    e = cfg.eval
    windows = eval_samples(tok, corpus, e.seqlen, e.max_windows, e.get("random_windows", 256))
    if resolve_add_bos(cfg.model, tok):
        windows = with_bos(windows, tok.bos_token_id)
    return windows


def max_length(cfg: DictConfig) -> int:
    """lm-eval's context length: ``eval.max_length``, else ``eval.seqlen`` (never the model's 32k default)."""
    return cfg.eval.max_length or cfg.eval.seqlen


def zero_shot_of(cfg: DictConfig, model, tok) -> dict:
    """``eval.tasks`` zero-shot on ``model`` as it is now (per-task acc / acc_norm and their mean)."""
    from ..evaluation.zeroshot import zero_shot

    return zero_shot(model, tok, cfg.eval.tasks, cfg.eval.task_limit, cfg.eval.task_batch_size, max_length(cfg))


def measured_sparsity(model: nn.Module) -> dict:
    """Zeros counted in the weights: per prunable matrix, over the prunable weights and over every parameter."""
    layers = prunable_layers(model)
    per_layer, zeros, total = {}, 0, 0
    for name, layer in layers.items():
        z = count_zeros(layer.weight)
        per_layer[name] = round(z / layer.weight.numel(), 6)
        zeros += z
        total += layer.weight.numel()
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(count_zeros(p) for p in model.parameters())
    return {"overall": zeros / total, "prunable_params": total, "zeros": zeros,
            "overall_all_params": all_zeros / all_params, "all_params": all_params, "per_layer": per_layer}


def evaluate_pruned(ctx: RunContext, windows: dict[str, torch.Tensor], label: str, sparsity: dict | None = None) -> dict:
    """Measured sparsity (``sparsity`` where the caller measured it already), perplexity per corpus (``windows``:
    corpus -> int64 ``[windows, seqlen]``) and zero-shot of ``ctx.model`` as it is now."""
    cfg, model = ctx.cfg, ctx.model
    return {"sparsity": sparsity if sparsity is not None else measured_sparsity(model),
            "perplexity": {c: perplexity(model, w, cfg.eval.batch_size, f"pruned ppl {c} {label}").to_dict()
                           for c, w in windows.items()},
            "zero_shot": zero_shot_of(cfg, model, ctx.tok) if cfg.eval.tasks else {}}


def evaluate_without_experts(ctx: RunContext, windows: dict[str, torch.Tensor], label: str, masks) -> dict:
    """:func:`evaluate_pruned` of ``ctx.model`` with the experts an experts cut's ``masks`` drop removed, with their
    router rows (:func:`..pruning.experts.remove_experts`: the model the export writes), then put back; the measured
    sparsity is that of the masks (the share of the prunable weights the cut removes). Adds ``structure``: the
    experts per layer and the parameters before and after."""
    model = ctx.model
    keeps = {layer.experts: experts_of_masks(masks, layer) for layer in moe_layers(model)}
    sparsity = measured_sparsity(model)
    removed = remove_experts(model, keeps, uniform=False)  # one budget over the layers: evaluated, not exported
    try:
        out = evaluate_pruned(ctx, windows, label, sparsity)
    finally:
        removed.restore()
    out["structure"] = {k: removed.structure[k] for k in ("experts", "parameters")}
    return out


def evaluate_masks(ctx: RunContext, all_masks: dict[str, dict], windows: dict[str, torch.Tensor],
                   refined: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """Evaluate each set of masks on ``ctx.model`` in turn (``tag -> name -> bool [out, in]``); the original weights are
    restored between sets, from one full copy of the prunable weights (``scripts/bench_eval_memory.py``)
    kept in host memory (pinned under CUDA, and handed back to the OS at the end), so a GPU holds no second copy of
    them. ``refined``: tag -> the record of its mask's refinement (``refine=swap``, :mod:`.refinement`), kept with its
    results. With ``reconstruct=obs`` and ``refine=swap``, a cut not yet refined is refined in its reconstruction's
    pass (:func:`.reconstruction.reconstruct`), its refined masks saved over its file and recorded the same way."""
    layers, timer = ctx.layers, ctx.timer
    original = HostCopy({n: m.weight for n, m in layers.items()})
    results, refined = {}, dict(refined or {})
    fused = unrefined(ctx, all_masks) if refines_in_reconstruction(ctx.cfg) else set()  # refine_stage left them to us
    for tag, masks in all_masks.items():
        rebuilt, undo = None, []
        how = ctx.cfg.reconstruct
        if how in MASK_SOLVERS:  # the kept weights updated on the fixed mask (refined first, in the same pass, if asked)
            refiner = refiner_of(ctx, tag, masks) if tag in fused else None
            with timer.stage("reconstruct"):
                rebuilt = reconstruct_cut(ctx, masks, refiner)
            if refiner is not None:
                masks = save_refined(ctx, tag, refiner.refined)
                refined[tag] = refiner.record()
        elif how == "ls" and is_sliced_tag(tag):  # the projection after the channels (heads) refit on the kept ones
            with timer.stage("reconstruct"):
                rebuilt = refit_cut(ctx, masks)
        elif how == "bias" and is_channels_tag(tag):  # FLAP's bias compensation of the projection after them
            with timer.stage("reconstruct"):
                rebuilt, undo = compensate_cut(ctx, masks)
        else:
            apply_masks(layers, masks)
        with timer.stage("pruned_eval"):
            if is_experts_tag(tag):  # evaluated as exported: the experts leave the model, the router routes around them
                results[tag] = evaluate_without_experts(ctx, windows, tag, masks)
            else:
                results[tag] = evaluate_pruned(ctx, windows, tag)
        if rebuilt is not None:
            results[tag]["reconstruction"] = {"method": how, **rebuilt}
        if how in MASK_SOLVERS:
            restore_weights(layers, original.tensors)
            apply_masks(layers, masks)  # the same masks on the original weights: what the update added, measured
            with timer.stage("pruned_eval"):
                results[tag]["weights_kept"] = {"ppl": {c: perplexity(ctx.model, w, ctx.cfg.eval.batch_size,
                                                                      f"pruned ppl {c} {tag} (weights kept)").ppl
                                                        for c, w in windows.items()}}
        if tag in refined:
            results[tag]["refinement"] = refined[tag]
        if tag in ctx.allocation_choices:  # allocation=auto: what was picked, on which held-out losses
            results[tag]["allocation"] = ctx.allocation_choices[tag]
        if is_sliced_tag(tag):  # what the export slices out: the model's parameters before and after
            total = results[tag]["sparsity"]["all_params"]
            removed = sum(int((~m).sum()) for m in masks.values())
            removed += sum(int((~m).all(1).sum()) for n, m in masks.items() if layers[n].bias is not None)
            new = sum(layer.out_features for layer, before in undo if before is None)  # compensation biases held
            results[tag]["structure"] = {"parameters": [total - new, total - removed + _biases_added(ctx, masks, undo)]}
        undo_biases(undo)
        restore_weights(layers, original.tensors)
    original.release()
    return results


def _biases_added(ctx: RunContext, masks, undo: list) -> int:
    """Bias entries the export of a bias-compensated channels cut adds beyond those the model holds while it is
    evaluated (each output projection's new bias): where the config then turns ``mlp_bias`` on, a zero bias for each
    kept row of the input matrices without one."""
    if all(before is not None for _, before in undo):
        return 0
    return sum(int(m.any(1).sum()) for n, m in masks.items() if ctx.layers[n].bias is None)


def result_entry(r: dict) -> dict:
    """The compact per-cut record of metrics.json["results"] (with the protocol each number used)."""
    return {"ppl": {c: p["ppl"] for c, p in r["perplexity"].items()},
            "protocol": {c: {"seqlen": p["seqlen"], "windows": p["windows"]} for c, p in r["perplexity"].items()},
            "measured_sparsity": r["sparsity"]["overall"], "per_layer_sparsity": r["sparsity"]["per_layer"],
            "zero_shot_mean": r["zero_shot"].get("mean"),
            **{k: r[k] for k in ("reconstruction", "refinement", "structure", "allocation", "weights_kept", "weights")
               if k in r}}
