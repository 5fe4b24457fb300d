"""The one loop over decoder blocks that every block-wise stage shares (llm-compressor's sequential pipeline).

A stage gives a :class:`BlockStep` (what to do with one block's layers once their calibration statistics are
complete); :func:`block_pass` owns the rest: the calibration pass (:func:`..data.calibration.calibrate_blockwise`,
sequential onloading included), applying the masks a step returns before the block's outputs are recomputed for
the next block (the sequential protocol of Wanda / SparseGPT's code), and, where the pass must leave the model as
it found it, the weights the masks zeroed kept on the host and written back after the pass, bit for bit, even when
it fails. Used by the prune stage (:mod:`..stages.prune`), the published-protocol baselines (:mod:`..stages.baselines`),
``refine=swap`` (:mod:`..stages.refinement`), ``reconstruct=obs`` and ``ls`` (:mod:`..stages.reconstruction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..data.calibration import calibrate_blockwise
from .weights import apply_masks, restore_removed
from .mask_files import pack_mask, unpack_mask
from ..core.lazymap import LazyMap
from ..models.loading import prunable_layers
from ..data.stats import ActivationStats

#: ``step(i, layers, stats)``: block ``i``'s prunable layers (name -> ``nn.Linear``, on the compute device) and their
#: statistics; returns the block's masks (name -> bool ``[out, in]``, True = keep) or None where it changed the
#: weights itself (OBS reconstruction).
BlockStep = Callable[[int, Mapping[str, nn.Linear], Mapping[str, ActivationStats]],
                     Optional[Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class PassSettings:
    """How a calibration pass runs (the ``calibration`` group's part of it): where captured block inputs live
    between blocks (``"cpu"`` or a device) and the fewest routed tokens an expert needs for statistics of its own."""

    offload: str = "cpu"
    min_expert_tokens: int = 1

    @classmethod
    def of(cls, calibration) -> "PassSettings":
        """From the ``calibration`` config group (any object with ``offload`` and ``min_expert_tokens``)."""
        return cls(str(calibration.offload), int(calibration.min_expert_tokens))


@dataclass
class BlockPassResult:
    """What :func:`block_pass` leaves: every prunable layer's statistics (Hessians dropped) and, for a pass with
    ``restore=True``, the masks its steps returned (name -> bool ``[out, in]``, held packed on the host, 1 bit per
    weight, each unpacked when asked for)."""

    stats: dict[str, ActivationStats]
    masks: Mapping[str, torch.Tensor]


@torch.no_grad()
def block_pass(model: nn.Module, windows, step: BlockStep, settings: PassSettings = PassSettings(), *,
               sequential: bool = True, want_hessian: bool = False, apply: bool = True,
               restore: bool = False, dense_targets: bool = False, drift: list | None = None) -> BlockPassResult:
    """Run ``step`` on every decoder block of ``model`` in order over ``windows`` (the calibration samples: int64
    ``[n, seqlen]`` or :class:`..data.sampling.TokenSamples`).

    ``sequential``: block i sees the outputs of the blocks < i as the steps left them (else the dense outputs).
    ``want_hessian``: the statistics carry XᵀX (fp32 ``[in, in]``) while the step runs. ``apply``: the masks a step
    returns are applied (W ⊙ mask) before the block's outputs are recomputed; a step whose method rewrote the
    weights itself (SparseGPT) passes False. ``restore``: the values the masks zeroed are kept on the host and
    written back after the pass, so the model is bit for bit as it was (on return and on an exception).
    ``dense_targets``: the statistics also carry ``cross`` = ``X_mᵀ X_d`` (:mod:`..data.dense_stream`); ``drift``, if a
    list, gets each block's relative distance to the dense model's outputs after its step.
    Raises :class:`..core.errors.UserError` at the first block whose statistics are not finite (an overflow of the
    model's dtype), before its step.
    """
    kept: dict[str, torch.Tensor] = {}  # packed: a second bool copy of every mask would cost P bytes of host memory
    shapes: dict[str, tuple] = {}
    unpack = lambda n: unpack_mask(kept[n], shapes[n])  # noqa: E731  (the maps are built after the pass: keys then)
    removed: dict[str, torch.Tensor] = {}

    def visit(i, layers, stats):
        masks = step(i, layers, stats)
        if masks is None:
            return
        if restore:
            for name, mask in masks.items():
                w = layers[name].weight
                removed[name] = w.detach().masked_select(~mask.to(w.device)).cpu()
                kept[name], shapes[name] = pack_mask(mask.cpu()), tuple(mask.shape)
        if apply:
            apply_masks(layers, masks)

    try:
        stats = calibrate_blockwise(model, windows, sequential=sequential, want_hessian=want_hessian, on_block=visit,
                                    offload=settings.offload, min_expert_tokens=settings.min_expert_tokens,
                                    dense_targets=dense_targets, drift=drift)
        return BlockPassResult(stats, LazyMap(kept, unpack))
    finally:
        if removed:
            restore_removed(prunable_layers(model), LazyMap(kept, unpack), removed)
