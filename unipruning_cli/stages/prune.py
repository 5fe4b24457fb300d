"""From scores to a pruned model: the prune stage of the block-wise methods, and the cuts of one Γ at every target.

- :func:`prune_stage` (a block-wise method's pruner: ``method=local``, ``method=sparsegpt``): calibrate, then per block score or
  solve, cut the target and apply it (one-shot local metrics score every matrix from the cached dense
  statistics instead). Masks are saved bit-packed (:mod:`..pruning.mask_files`) with a stage marker.
- :func:`cut_masks` (UniPruning): masks for every target from |Γ|, no forward pass (the same targets from plain
  local metrics, ``eval.baselines``, are in :mod:`.baselines`).
"""

from __future__ import annotations

import json
import logging

import torch

from ..pruning.block_loop import block_pass
from ..data.calibration import stats_to_tensors
from ..data.calibration_set import dense_statistics
from ..core.context import RunContext
from ..core.config import model_values, plain
from ..core.lazymap import LazyMap
from ..pruning.mask_files import load_masks, packed_masks, save_masks, save_packed_masks
from ..pruning.method import Cuts, method_name
from ..pruning.blockwise import LocalMetricPruning, PruningMethod
from ..pruning.channels import flap_scores
from ..pruning.targets import Target, calibration_mode
from ..pruning.mask_solvers import MASK_SOLVERS
from .routing import routing_of
from ..pruning.weights import apply_masks
from ..pruning.weights import restore_weights
from ..pruning.mask_files import pack_mask
from ..core.rundir import RunDir, atomic_save_tensors, atomic_write_json, fingerprint

log = logging.getLogger(__name__)


class PackedMasks:
    """Keep masks as a block-wise method produces them, packed at 1 bit per weight (a 70B model's bool masks
    would take 64 GiB of host memory, packed 8 GiB), then written as one masks file (:mod:`..pruning.mask_files`)."""

    def __init__(self) -> None:
        self.packed: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[int]] = {}

    def add(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep ``masks`` (name -> bool ``[out, in]``) packed; returns them unchanged."""
        for name, mask in masks.items():
            self.packed[name] = pack_mask(mask.cpu())
            self.shapes[name] = list(mask.shape)
        return masks

    def save(self, path, info: dict) -> None:
        save_packed_masks(path, self.packed, self.shapes, info)


def calibrate_and_prune(ctx: RunContext, method: PruningMethod) -> tuple[PackedMasks, dict]:
    """Masks of every prunable layer of ``ctx.model`` at ``ctx.primary``; weights are pruned in place on return.

    Writes ``calibration.safetensors`` (Σx² per input channel, counts in the metadata) and
    ``calibration.json`` into ``ctx.rd``. Returns (the packed masks, calibration info). Scores and masks are
    made matrix by matrix (block by block when calibrating), except for a shared budget (``global``, ``owl``,
    ``gamma``) or whole channels, whose one-shot cut takes every score at once. Raises :class:`..core.errors.UserError` naming the first layer whose calibration
    inputs overflowed the model's dtype (:func:`..data.calibration.calibrate_blockwise`), before anything is saved.
    """
    cfg, model, layers, target, rd = ctx.cfg, ctx.model, ctx.layers, ctx.primary, ctx.rd
    windows, calib_info = ctx.calibration()
    masks = PackedMasks()
    mode = calibration_mode(cfg)
    calib_info["mode"] = mode
    if isinstance(method, LocalMetricPruning) and mode == "one_shot":
        # Scores need only the dense statistics (none at all for magnitude): no pass per run.
        flap = target.is_sliced and target.score == "flap"  # FLAP's score reads the statistics, not the metric's
        if not method.metric.uses_activations and not flap:
            stats, cached = {}, False
        else:
            stats, cached = dense_statistics(cfg, model, windows)
        calib_info["cached"] = cached
        if target.shares_budget or target.is_structural:  # every score at once (channels: rows and columns
            # together, in the order and random draws of the baselines; experts: with the dense model's routing)
            every = target.cut({} if flap else method.scores(layers, stats),
                               routing_of(ctx) if target.is_experts else None, flap_scores(layers, stats))
            apply_masks(layers, every)
            masks.add(every)
        else:  # the cuts are per matrix: one score alive at a time, in the order (and random draws) of scores()
            for name, layer in layers.items():
                one = target.cut({name: method.score(layer, stats.get(name))})
                apply_masks({name: layer}, one)
                masks.add(one)
    else:
        def step(i, block_layers, block_stats):
            return masks.add(method.prune_block(block_layers, block_stats, target))

        stats = block_pass(model, windows, step, ctx.passes, sequential=mode == "sequential",
                           want_hessian=method.needs_hessian, apply=not method.updates_weights).stats
    calib_info["experts_pooled"] = {n: s.own_count for n, s in stats.items() if s.own_count is not None}
    tensors, meta = stats_to_tensors(stats, per_sample=False)
    atomic_save_tensors(rd / "calibration.safetensors", tensors, meta)
    atomic_write_json(rd / "calibration.json", calib_info)
    return masks, calib_info


def prune_stage(ctx: RunContext, method: PruningMethod) -> dict:
    """The block-wise ``method`` (a local metric's pruner, SparseGPT's) applied to ``ctx.model`` in place at
    ``ctx.primary``, its masks in ``ctx.rd/masks/<tag>.safetensors`` (reloaded and applied when the stage is already complete). Returns the
    calibration info."""
    cfg, layers, target, rd, timer = ctx.cfg, ctx.layers, ctx.primary, ctx.rd, ctx.timer
    prune_fp = fingerprint({"model": model_values(cfg.model),
                            **{k: plain(cfg[k]) for k in ("calibration", "local_metric", "method", "pattern", "sparsity",
                                                          "seed")}})
    mask_path = f"masks/{target.tag}.safetensors"
    if rd.is_complete("prune", prune_fp) and not method.updates_weights:
        log.info("prune stage complete in %s: loading %s", rd.path, mask_path)
        apply_masks(layers, load_masks(rd / mask_path))
        return json.loads((rd / "calibration.json").read_text())
    with timer.stage("calibrate_prune"):
        masks, calib_info = calibrate_and_prune(ctx, method)
    masks.save(rd / mask_path, {"target": target.tag, "method": method_name(cfg), **reconstruct_info(cfg.reconstruct, target)})
    rd.mark_complete("prune", prune_fp, [mask_path, "calibration.safetensors", "calibration.json"],
                     timer.seconds["calibrate_prune"])
    return calib_info


def blockwise_cuts(ctx: RunContext, method: PruningMethod) -> Cuts:
    """A block-wise method's one cut (:func:`prune_stage`): left in the model where it is evaluated as it is, or
    handed over as masks on the dense weights (restored) where ``refine`` or ``reconstruct`` works on them next or
    the cut removes whole experts."""
    cfg, layers = ctx.cfg, ctx.layers
    if cfg.reconstruct == "none" and cfg.refine == "none" and not ctx.primary.is_experts:  # (experts: evaluated
        return Cuts(prune_stage(ctx, method), in_place=True)  # with the experts removed, from the masks)
    dense = {n: m.weight.detach().to("cpu", copy=True) for n, m in layers.items()}
    calibration = prune_stage(ctx, method)
    restore_weights(layers, dense)
    del dense
    return Cuts(calibration, {ctx.primary.tag: load_masks(ctx.rd / f"masks/{ctx.primary.tag}.safetensors")})


def reconstruct_info(reconstruct: str, target: Target) -> dict:
    """What a masks file's header says of the weights its run evaluated for ``target``: ``{"reconstruct": "obs"}`` (or ``"admm"``),
    ``{"reconstruct": "ls"}`` (a channels cut with the projection after it refit) or nothing (``reconstruct``: the
    run's ``reconstruct``; ``ls`` leaves every cut but a channels one as masks)."""
    if reconstruct in MASK_SOLVERS or (reconstruct == "ls" and target.is_sliced) or (reconstruct == "bias" and target.is_channels):
        return {"reconstruct": reconstruct}
    return {}


def cut_masks(gamma: dict[str, torch.Tensor], targets: list[Target], rd: RunDir, reconstruct: str = "none",
              experts=None, flap=None) -> dict[str, dict[str, torch.Tensor]]:
    """Masks for every target from one Γ (|Γ| as the score; seconds, no model forward), each saved to
    ``rd/masks/<tag>.safetensors`` (with :func:`reconstruct_info` of the run's ``reconstruct`` in its header);
    ``experts``: the run's routing (:func:`.routing.routing_of`), for experts cuts; ``flap``: FLAP's scores
    (:func:`..pruning.channels.flap_scores`), for its channels cuts. Returns tag -> name -> bool
    ``[out, in]`` (held packed, :func:`..pruning.mask_files.packed_masks`)."""
    # one matrix's |Γ| at a time, not a second copy of Γ (4 bytes per prunable weight: 255 GiB for a 70B model)
    scores = LazyMap(gamma, lambda name: gamma[name].abs())
    out = {}
    for t in targets:
        cut = t.cut(scores, experts, flap)
        save_masks(rd / f"masks/{t.tag}.safetensors", cut, {"target": t.tag, "method": "unipruning",
                                                            **({"allocation": t.picked} if t.picked else {}),
                                                            **reconstruct_info(reconstruct, t)})
        out[t.tag] = packed_masks(cut)
        del cut
    return out
