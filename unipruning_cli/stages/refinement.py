"""Training-free mask refinement (``refine=swap``): each cut's mask refined by swaps of a pruned and a kept weight
inside a row (inside an N:M group) that lower the layer's exact output error on the calibration data
(:func:`..pruning.swaps.swap_refine`), the counts kept, until no swap helps (or ``refine_rounds`` /
``refine_seconds`` end it).

Block by block on the calibration samples, sequentially (block i's ``H`` from the outputs of the refined blocks
< i), like :mod:`.reconstruction`. The model keeps its original weights times the (refined) mask.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Optional

import torch

from ..pruning.block_loop import PassSettings, block_pass
from ..core.context import RunContext
from ..core.lazymap import LazyMap
from ..pruning.mask_files import pack_mask, packed_masks, read_masks_header, save_masks, unpack_mask
from ..pruning.mask_solvers import MASK_SOLVERS
from ..pruning.swaps import output_error, swap_refine
from ..pruning.targets import is_experts_tag, is_sliced_tag, nm_of_tag

log = logging.getLogger(__name__)


class SwapRefiner:
    """:func:`..pruning.swaps.swap_refine` of each layer of a cut, one block at a time (the step of a sequential
    pass: :func:`refine`, or the reconstruction pass that refines before it updates, :func:`.reconstruction.
    reconstruct`), with the record of the whole cut. ``masks``: name -> bool ``[out, in]`` (every prunable layer);
    ``nm``: the (N, M) of an N:M cut, whose swaps stay inside a group; ``max_rounds``: a cap per matrix (None:
    until no swap helps); ``seconds``: a budget for the cut, shared out evenly over its matrices (time left by one
    passes to the next); ``target``: ``"pruned"`` (the error against the layer's own output on the pruned model's
    inputs) or ``"dense"`` (against the dense layer's output on the dense model's inputs: the pass then carries dense
    targets, :mod:`..data.dense_stream`, and its :attr:`drift` per block); ``batch``: several swaps per row per round
    (False: one, the earlier rule)."""

    def __init__(self, masks: Mapping[str, torch.Tensor], *, nm: Optional[tuple[int, int]] = None,
                 max_rounds: Optional[int] = None, seconds: Optional[float] = None, target: str = "pruned",
                 batch: bool = True) -> None:
        self.masks, self.group, self.max_rounds, self.seconds = masks, nm[1] if nm else None, max_rounds, seconds
        self.dense, self.batch = target == "dense", batch
        self.drift: list[float] = []  # per block, with dense targets: Σ‖h_m - h_d‖² / Σ‖h_d‖² after its step
        self.untargeted = 0  # layers with no dense target (experts routed differently in the two streams)
        self.start = time.monotonic()
        self._packed: dict[str, torch.Tensor] = {}  # name -> the refined mask, 1 bit per weight on the host
        self._shapes: dict[str, tuple] = {}
        self.before = self.after = 0.0
        self.swaps = self.numel = self.rounds = self.done = self.unconverged = 0

    def block(self, i: int, layers: Mapping[str, torch.nn.Linear], stats) -> dict[str, torch.Tensor]:
        """The refined masks of one block's ``layers`` (name -> ``nn.Linear`` on the compute device), from their
        statistics' ``xtx`` (``[in, in]`` fp32, the inputs as the pass left them)."""
        out = {}
        for name, layer in layers.items():
            w = layer.weight.data
            xtx = stats[name].xtx.to(w.device)
            keep = self.masks[name].to(w.device)
            self.done += 1
            deadline = None if self.seconds is None else self.start + self.seconds * self.done / len(self.masks)
            cross = stats[name].cross if self.dense else None
            self.untargeted += self.dense and cross is None
            got = swap_refine(w, keep, xtx, group=self.group, max_rounds=self.max_rounds, deadline=deadline,
                              cross=cross, batch=self.batch)
            out[name] = got.keep
            self._packed[name], self._shapes[name] = pack_mask(got.keep.cpu()), tuple(got.keep.shape)
            self.before += output_error(w.float() * ~keep, xtx)
            self.after += output_error(w.float() * ~got.keep, xtx)
            self.swaps += got.swaps
            self.numel += w.numel()
            self.rounds = max(self.rounds, got.rounds)
            self.unconverged += not got.converged
        return out

    @property
    def refined(self) -> LazyMap:
        """The refined masks so far: name -> bool ``[out, in]`` (CPU), held packed, each unpacked when asked for."""
        return LazyMap(self._packed, lambda n: unpack_mask(self._packed[n], self._shapes[n]))

    def record(self) -> dict:
        """``{"method": "swap", "target": "pruned" | "dense", "swaps": n, "fraction": swaps per weight,
        "error_ratio": r, "rounds": the most any matrix ran, "converged": every matrix ended where no swap helps,
        "unconverged": matrices that did not}``, r being the output error (on the pruned model's inputs) of the
        refined masks over that of the given ones, summed over every layer on its calibration inputs; with dense
        targets also ``"drift"`` (per block, :func:`..data.dense_stream.relative_drift` after its step) and
        ``"untargeted"`` (layers refined without a dense target)."""
        ratio = self.after / self.before if self.before > 0 else 1.0
        log.info("swap refinement: %d swaps (%.3g%% of the weights) in at most %d rounds per matrix, %s; output error "
                 "on the calibration data %.3g of the given masks'", self.swaps, 100 * self.swaps / max(self.numel, 1),
                 self.rounds, "converged" if not self.unconverged else f"{self.unconverged} matrices stopped by "
                 "refine_rounds / refine_seconds before converging", ratio)
        if self.untargeted:
            log.warning("layer_target=dense: %d layers had no dense target (experts the pruned and the dense model "
                        "routed differently) and were refined on their own output error", self.untargeted)
        dense = {"drift": [round(d, 6) for d in self.drift], "untargeted": self.untargeted} if self.dense else {}
        return {"method": "swap", "target": "dense" if self.dense else "pruned", "swaps": self.swaps,
                "fraction": self.swaps / max(self.numel, 1), "error_ratio": ratio, "rounds": self.rounds,
                "converged": not self.unconverged, "unconverged": self.unconverged, **dense}


def refiner_of(ctx: RunContext, tag: str, masks: Mapping[str, torch.Tensor]) -> SwapRefiner:
    """The run's :class:`SwapRefiner` for the cut ``tag`` (``refine_rounds``, ``refine_seconds``; an N:M tag keeps its
    swaps inside groups)."""
    cfg = ctx.cfg
    return SwapRefiner(masks, nm=nm_of_tag(tag), max_rounds=cfg.refine_rounds, seconds=cfg.refine_seconds,
                       target=cfg.layer_target)


@torch.no_grad()
def refine(model, windows, refiner: SwapRefiner, settings: PassSettings = PassSettings()
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """``refiner``'s swaps on every prunable layer of ``model`` (dense on entry and on return: each block is pruned
    with its refined masks for the blocks after it, and the values it zeroed are put back at the end, as
    :func:`.baselines.sequential_masks` does), block by block on ``windows`` (the calibration samples, int64
    ``[n, seqlen]`` or :class:`..data.sampling.TokenSamples`), sequentially. Returns (the refined masks on the host,
    :meth:`SwapRefiner.record`)."""
    refined = block_pass(model, windows, refiner.block, settings, want_hessian=True, restore=True,
                         dense_targets=refiner.dense, drift=refiner.drift).masks
    return refined, refiner.record()


def refines_in_reconstruction(cfg) -> bool:
    """Whether a run's cuts are refined inside their reconstruction's pass (``refine=swap`` with ``reconstruct=obs``
    or ``admm``: one calibration pass per cut, :func:`.evaluation.evaluate_masks`) rather than by :func:`refine_stage`
    (a pass of their own)."""
    return cfg.reconstruct in MASK_SOLVERS and cfg.refine == "swap"


def unrefined(ctx: RunContext, all_masks: Mapping[str, Mapping[str, torch.Tensor]]) -> set[str]:
    """The tags of ``all_masks`` that ``refine=swap`` still has to refine: not those whose file in ``ctx.rd/masks/``
    already says ``"refine": "swap"`` (a resumed run), nor channels, heads or experts cuts (a swap moves single
    weights: they stay whole units). Empty with ``refine=none``."""
    if ctx.cfg.refine != "swap":
        return set()
    done = {tag for tag in all_masks if (p := ctx.rd / f"masks/{tag}.safetensors").is_file()
            and read_masks_header(p)[1].get("refine") == "swap"}
    return {tag for tag in all_masks if tag not in done and not is_sliced_tag(tag) and not is_experts_tag(tag)}


def save_refined(ctx: RunContext, tag: str, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` packed (:func:`..pruning.mask_files.packed_masks`) and, where the run holds ``tag``'s file in
    ``ctx.rd/masks/``, written over it with ``"refine": "swap"`` in its header; returns the packed masks."""
    packed = packed_masks(masks)
    path = ctx.rd / f"masks/{tag}.safetensors"
    if path.is_file():
        save_masks(path, packed, {**read_masks_header(path)[1], "refine": "swap"})
    return packed


def refine_stage(ctx: RunContext, all_masks: dict[str, dict[str, torch.Tensor]]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """``refine=swap`` in a run: :func:`refine` of each cut of ``all_masks`` (tag -> name -> bool ``[out, in]``) that
    is :func:`unrefined`, on the run's calibration samples (``ctx.calibration()``; ``ctx.model`` dense on entry and
    on return), each refined mask saved (:func:`save_refined`). Where :func:`refines_in_reconstruction`, nothing is done here: the
    reconstruction refines each cut in its own pass (:func:`.evaluation.evaluate_masks`), one calibration pass per
    cut instead of two. With ``refine=none``: ``all_masks`` unchanged. Returns (tag -> masks, tag -> record)."""
    todo = unrefined(ctx, all_masks)
    if not todo or refines_in_reconstruction(ctx.cfg):
        return all_masks, {}
    windows, _ = ctx.calibration()
    masks, records = dict(all_masks), {}
    with ctx.timer.stage("refine"):
        for tag in sorted(todo, key=list(all_masks).index):
            log.info("refine=swap: %s", tag)
            new, records[tag] = refine(ctx.model, windows, refiner_of(ctx, tag, all_masks[tag]), ctx.passes)
            masks[tag] = save_refined(ctx, tag, new)
    return masks, records
