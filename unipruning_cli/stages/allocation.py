"""``pattern.allocation=auto``: how an unstructured cut of Γ spreads its sparsity (per row, per matrix, global, OWL,
Γ-budgets) chosen per run and per target by data the run may look at: the LM loss of each candidate's masks on
calibration windows held out from the search (drawn from the calibration corpus with the run's seed + 1, never the
evaluation corpus). The candidate of lowest loss is cut; what was picked and the losses that chose it are recorded in
``metrics.json`` (``results.<tag>.allocation``) and the masks file's header. Its cost: per target and candidate, one
cut of |Γ| (seconds) and one forward of the held-out windows.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping

import torch
from omegaconf import OmegaConf

from ..core.context import RunContext
from ..core.pinned import HostCopy
from ..data.calibration_set import calibration_set
from ..evaluation.perplexity import window_nlls
from ..pruning.targets import AUTO, Target
from ..pruning.weights import apply_masks, restore_weights

log = logging.getLogger(__name__)

#: The allocations ``auto`` chooses among (:mod:`..pruning.masks`, :mod:`..pruning.layer_budgets`).
CANDIDATES = ("per_row", "per_matrix", "global", "owl", "gamma")
#: Held-out calibration samples the choice is measured on.
HOLDOUT_SAMPLES = 8


def holdout_windows(ctx: RunContext) -> list[torch.Tensor]:
    """:data:`HOLDOUT_SAMPLES` samples of the calibration corpus (``calibration.source``, its sampling and seqlen, BOS as
    the run's) drawn with ``seed + 1``: other windows than the search's, never the evaluation corpus."""
    cfg = OmegaConf.merge(ctx.cfg, {"calibration": {"nsamples": HOLDOUT_SAMPLES}, "seed": int(ctx.cfg.seed) + 1})
    return list(calibration_set(cfg, ctx.tok)[0])


@torch.no_grad()
def holdout_loss(ctx: RunContext, windows: list[torch.Tensor]) -> float:
    """Mean next-token NLL of ``ctx.model`` as it is over ``windows`` (each a 1-D int64 sample)."""
    device = next(ctx.model.parameters()).device
    return float(torch.cat([window_nlls(ctx.model, w[None].to(device), 1, "held-out loss") for w in windows]).mean())


def choose_allocations(ctx: RunContext, scores: Mapping[str, torch.Tensor], targets: list[Target]) -> tuple[list[Target], dict]:
    """``targets`` with every ``allocation=auto`` one given the candidate (:data:`CANDIDATES`) whose masks of
    ``scores`` (|Γ|, name -> ``[out, in]``) give ``ctx.model`` the lowest held-out loss (:func:`holdout_loss`); the
    model's weights are as they were on return. Returns (the targets, tag -> ``{"picked", "losses"}``)."""
    auto = [t for t in targets if t.allocation == AUTO and not t.is_nm]
    if not auto:
        return targets, {}
    windows = holdout_windows(ctx)
    original = HostCopy({n: m.weight for n, m in ctx.layers.items()})
    record, out = {}, []
    try:
        for t in targets:
            if t not in auto:
                out.append(t)
                continue
            losses = {}
            for candidate in CANDIDATES:
                apply_masks(ctx.layers, replace(t, allocation=candidate).cut(scores))
                losses[candidate] = holdout_loss(ctx, windows)
                restore_weights(ctx.layers, original.tensors)
            picked = min(losses, key=losses.get)
            log.info("%s: allocation=auto picked %s (held-out loss %s)", t.tag, picked,
                     ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            record[t.tag] = {"picked": picked, "losses": losses, "windows": len(windows)}
            out.append(replace(t, picked=picked))
    finally:
        restore_weights(ctx.layers, original.tensors)
        original.release()
    return out, record
