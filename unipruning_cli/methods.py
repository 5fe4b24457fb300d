"""Pruning methods: small classes with a narrow interface; the runner owns the loop over layers.

A method turns one calibrated block (its linear layers and their activation statistics) into keep
masks, and may update the block's weights (SparseGPT). Methods that only rank weights (``local``)
also expose ``scores`` so masks can be cut with a global budget over all layers.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn

from omegaconf import DictConfig

from . import masks as M
from .config import SHARED_BUDGET, target_sparsity
from .errors import UserError
from .layer_budgets import gamma_offsets, layerwise_masks, owl_offsets
from .metrics import METRICS, LocalMetric
from .registry import Registry
from .stats import ActivationStats

log = logging.getLogger(__name__)

METHODS: Registry[type] = Registry("method")

# Each metric's own comparison group in the paper that introduced it.
DEFAULT_ALLOCATION = {"magnitude": "per_matrix", "wanda": "per_row", "ria": "per_matrix", "stochria": "per_matrix"}
# SparseGPT chooses its mask in each block of 128 columns as it goes (adaptive mask selection, SparseGPT §3.2):
# a label for metrics.json and tags; pattern.allocation does not apply to it and is refused.
SPARSEGPT_ALLOCATION = "per_block"
#: UniPruning's cut of Γ where ``pattern.allocation`` is null: OWL's layer budgets (published M = 5, λ = 0.08), the
#: best of per_matrix / per_row / global / owl / gamma at 60 and 70 % on the embedded model (README, "Beyond the
#: paper"); inside a layer the cut is per row.
UNIPRUNING_ALLOCATION = "owl"
#: ``unipruning prune`` with no overrides: one Γ cut at these sparsities and N:M patterns, beside these local metrics
#: at the same targets (one-shot: from the same calibration statistics as the search), so the summary compares them.
UNIPRUNING_CUTS = {"sparsities": (0.5, 0.6, 0.7), "patterns": ("2:4",), "baselines": ("wanda@one_shot",)}


#: An N:M cut's tag, ``2of4``; a baseline's cut is ``<label>:<tag>`` (``wanda@one_shot:2of4``).
NM_TAG = re.compile(r"^(\d+)of(\d+)$")


def nm_of_tag(tag: str) -> tuple[int, int] | None:
    """(N, M) of an N:M cut's tag (``2of4``, or a baseline's ``wanda:2of4``), None for any other tag."""
    m = NM_TAG.match((tag or "").rsplit(":", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Target:
    """What to cut: unstructured at ``sparsity`` with ``allocation``, or N:M when ``n`` > 0."""

    sparsity: float
    allocation: str = "per_matrix"
    n: int = 0
    m: int = 0
    cap: float = 1.0  # the most one matrix may lose where the budget is shared (global): pattern.max_matrix_sparsity
    owl: tuple[float, float] = (5.0, 0.08)  # allocation=owl: M, λ (pattern.owl_m, pattern.owl_lambda)
    gamma_delta: float = 0.08  # allocation=gamma: pattern.gamma_delta

    @property
    def is_nm(self) -> bool:
        return self.n > 0

    @property
    def tag(self) -> str:
        return f"{self.n}of{self.m}" if self.is_nm else f"s{self.sparsity:.2f}_{self.allocation}"

    @property
    def shares_budget(self) -> bool:
        """Whether the cut shares one budget across matrices (``global``, ``owl``, ``gamma``): it needs every score
        at once."""
        return not self.is_nm and self.allocation in SHARED_BUDGET

    def unstructured(self, sparsity: float, allocation: str) -> "Target":
        """An unstructured cut at ``sparsity`` with ``allocation``, with this target's cap and layer-budget knobs."""
        return Target(sparsity=sparsity, allocation=allocation, cap=self.cap, owl=self.owl,
                      gamma_delta=self.gamma_delta)

    def cut(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep masks (bool ``[out, in]``) of every matrix of ``scores`` (name -> ``[out, in]``, higher = keep)."""
        if self.is_nm:
            return M.nm_masks(scores, self.n, self.m)
        if self.allocation in ("owl", "gamma"):
            offsets = (owl_offsets(scores, *self.owl) if self.allocation == "owl"
                       else gamma_offsets(scores, self.gamma_delta))
            masks, per_layer = layerwise_masks(scores, self.sparsity, offsets, self.cap)
            log.info("%s: layer sparsities from %.3f to %.3f (%s)", self.tag, min(per_layer.values()),
                     max(per_layer.values()), ", ".join(f"{k.rsplit('.', 1)[-1]}: {v:.3f}" for k, v in
                                                        sorted(per_layer.items(), key=lambda kv: _natural(kv[0]))))
            return masks
        return M.masks_for(scores, self.sparsity, self.allocation, self.cap)


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def make_target(cfg: DictConfig) -> Target:
    """The run's primary target: its N:M pattern, or its sparsity with ``pattern.allocation`` (default: the
    local metric's own comparison group, ``DEFAULT_ALLOCATION``; SparseGPT's own blocks of columns)."""
    p = cfg.pattern
    if p.kind == "nm":
        return Target(sparsity=target_sparsity(cfg), allocation="per_row", n=p.n, m=p.m)
    allocation = SPARSEGPT_ALLOCATION if cfg.method == "sparsegpt" else p.allocation or default_allocation(cfg)
    return Target(sparsity=target_sparsity(cfg), allocation=allocation,
                  cap=float(p.get("max_matrix_sparsity", 1.0)),  # a run made before the cap existed: none
                  owl=(float(p.get("owl_m", 5.0)), float(p.get("owl_lambda", 0.08))),
                  gamma_delta=float(p.get("gamma_delta", 0.08)))


def check_targets_fit(layers: Mapping[str, nn.Module], targets: list[Target]) -> None:
    """Raise :class:`UserError` when an N:M target does not fit a prunable matrix (``layers``: name -> module with a
    ``weight``, loaded or on the ``meta`` device), naming every matrix that cannot take it."""
    for t in targets:
        if t.is_nm:
            try:
                M.check_nm_applicable({n: tuple(m.weight.shape) for n, m in layers.items()}, t.n, t.m)
            except ValueError as err:
                raise UserError(str(err)) from None


def calibration_mode(cfg: DictConfig) -> str:
    """``calibration.mode`` resolved. ``auto`` is each method's published block protocol: ``sequential`` for
    SparseGPT and for activation-aware local metrics (Wanda, RIA: their reference code calibrates block i on the
    outputs of the already-pruned blocks < i; SparseGPT §3.4), ``one_shot`` for a data-free metric, for
    ``pattern.allocation=global`` (every score at once) and for UniPruning, whose search reads the dense model."""
    mode = cfg.calibration.mode
    if mode != "auto":
        return mode
    if cfg.method == "sparsegpt":
        return "sequential"
    if cfg.method == "local" and METRICS.get(cfg.local_metric.name).uses_activations \
            and not make_target(cfg).shares_budget:
        return "sequential"
    return "one_shot"


def default_allocation(cfg: DictConfig) -> str:
    """``pattern.allocation`` where it is null: UniPruning's ``UNIPRUNING_ALLOCATION``, else the local metric's own
    comparison group (``DEFAULT_ALLOCATION``: Wanda per row, RIA and magnitude per matrix)."""
    if cfg.method == "unipruning":
        return UNIPRUNING_ALLOCATION
    return DEFAULT_ALLOCATION.get(cfg.local_metric.name, "per_matrix")


def _default_cuts(cfg: DictConfig, value, key: str) -> list:
    if value is not None:
        return list(value)
    return list(UNIPRUNING_CUTS[key]) if cfg.method == "unipruning" else []


def extra_sparsities(cfg: DictConfig) -> list[float]:
    """``export.sparsities``; null: UniPruning's default cuts (``UNIPRUNING_CUTS``), none for other methods."""
    return [float(s) for s in _default_cuts(cfg, cfg.export.sparsities, "sparsities")]


def extra_patterns(cfg: DictConfig) -> list[str]:
    """``export.patterns`` (N:M strings); null: UniPruning's default (2:4), none for other methods."""
    return [str(p) for p in _default_cuts(cfg, cfg.export.patterns, "patterns")]


def baselines_of(cfg: DictConfig) -> list[str]:
    """``eval.baselines``; null: UniPruning's default (``wanda@one_shot``), none for other methods."""
    return [str(b) for b in _default_cuts(cfg, cfg.eval.baselines, "baselines")]


def targets_of(cfg: DictConfig, primary: Target) -> list[Target]:
    """The primary target, then every extra sparsity of ``export.sparsities`` and N:M of ``export.patterns``
    (UniPruning only: the cuts of one Γ; :func:`extra_sparsities`, :func:`extra_patterns`)."""
    out = [primary]
    if cfg.method == "unipruning":
        allocation = primary.allocation if not primary.is_nm else cfg.pattern.allocation or default_allocation(cfg)
        for sp in extra_sparsities(cfg):
            t = primary.unstructured(float(sp), allocation)
            if t not in out:
                out.append(t)
        for pat in extra_patterns(cfg):
            n, m = (int(v) for v in str(pat).split(":"))
            t = Target(sparsity=1 - n / m, allocation="per_row", n=n, m=m)
            if t not in out:
                out.append(t)
    return out


class PruningMethod(ABC):
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False

    @abstractmethod
    def prune_block(
        self, layers: Mapping[str, nn.Linear], stats: Mapping[str, ActivationStats], target: Target
    ) -> dict[str, torch.Tensor]:
        """Masks for one block's layers (per-row, per-matrix or N:M targets only)."""


@METHODS.register("local")
class LocalMetricPruning(PruningMethod):
    """Rank weights by a local metric (magnitude, Wanda, RIA, stochRIA) and keep the top ones."""

    name = "local"

    def __init__(self, metric: LocalMetric, seed: int = 0) -> None:
        self.metric = metric
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, layer: nn.Linear, stats: ActivationStats | None) -> torch.Tensor:
        return self.metric.score(layer.weight.detach().cpu(), stats, generator=self.generator)

    def scores(self, layers: Mapping[str, nn.Linear], stats: Mapping[str, ActivationStats]) -> dict[str, torch.Tensor]:
        return {n: self.score(layer, stats.get(n)) for n, layer in layers.items()}

    def prune_block(self, layers, stats, target):
        return target.cut(self.scores(layers, stats))


@METHODS.register("sparsegpt")
class SparseGPTPruning(PruningMethod):
    """SparseGPT (OBS with blocked lazy updates): prunes and reconstructs the kept weights."""

    name = "sparsegpt"
    needs_hessian = True
    updates_weights = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune_block(self, layers, stats, target):
        from .baselines.sparsegpt import sparsegpt_prune

        out = {}
        for name, layer in layers.items():
            s = stats[name]
            hessian = (2.0 / max(s.count, 1)) * s.xtx
            w, keep = sparsegpt_prune(layer.weight.data, hessian.to(layer.weight.device),
                                      sparsity=target.sparsity, n=target.n, m=target.m,
                                      blocksize=self.blocksize, percdamp=self.percdamp, name=name)
            layer.weight.data.copy_(w)
            out[name] = keep.cpu()
        return out


@METHODS.register("unipruning")
class UniPruning:
    """Not a block-by-block method: the search (``search/``) learns Γ over the whole model, then masks for
    every target are cut from |Γ| (``search.stage.run_search`` and ``pruning.cut_masks``)."""

    name = "unipruning"


def restore_weights(layers: Mapping[str, nn.Linear], weights: Mapping[str, torch.Tensor]) -> None:
    """W ← the saved ``weights`` (name -> a copy, on any device), in place."""
    with torch.no_grad():
        for name, w in weights.items():
            layers[name].weight.copy_(w)


def apply_masks(layers: Mapping[str, nn.Linear], masks: Mapping[str, torch.Tensor]) -> None:
    """W ← W ⊙ mask, in place; weights outside ``masks`` are left alone."""
    with torch.no_grad():
        for name, mask in masks.items():
            w = layers[name].weight
            w.mul_(mask.to(device=w.device, dtype=w.dtype))
