"""What a run cuts: :class:`Target` (a sparsity with its allocation, or N:M), the tags of cuts, and the targets of
a config, with the defaults each method answers for (:mod:`.method`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import nn

from omegaconf import DictConfig

from . import masks as M
from .channels import channel_masks, mlp_channels
from .experts import EXPERT_SCORES, ExpertRouting
from .heads import attention_heads, attention_names, head_counts, head_masks
from ..core.errors import UserError
from ..models.layouts import text_config
from .layer_budgets import gamma_offsets, layerwise_masks, owl_offsets
from .method import DEFAULT_ALLOCATION, method_of

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ALLOCATION", "SHARED_BUDGET", "NM_TAG", "EXPERTS", "Target", "baselines_of", "calibration_mode",
           "is_experts_tag", "is_heads_tag", "is_sliced_tag", "check_targets_fit", "default_allocation", "extra_patterns", "extra_sparsities", "make_target", "nm_of_tag",
           "target_sparsity", "targets_of"]

#: The allocations that share the budget across matrices: they need every score at once, and the per-matrix cap.
SHARED_BUDGET = ("global", "owl", "gamma")
#: The structural allocation of ``pattern=channels``: whole MLP channels, the same share in every MLP
#: (:mod:`.channels`); its masks are rows and columns, and its export a smaller model.
CHANNELS = "channels"
#: ``pattern.allocation=auto``: the allocation chosen per run and target on held-out calibration windows
#: (:mod:`..stages.allocation`); the target records the one picked.
AUTO = "auto"
#: The structural allocation of ``pattern=heads``: whole KV groups with their query heads, the same share in every
#: attention layer (:mod:`.heads`); its masks are rows and columns, and its export a smaller model.
HEADS = "heads"
#: The structural allocation of ``pattern=experts``: whole experts removed from every MoE layer (:mod:`.experts`).
EXPERTS = "experts"
#: An experts cut's tag: ``s0.25_experts-reap`` (a share removed), ``k2_experts-saliency`` (a count removed).
EXPERTS_TAG = re.compile(r"^(?:s(\d\.\d+)|k(\d+))_experts-([a-z]+)(?:-floor(\d+))?$")


def target_sparsity(cfg: DictConfig) -> float:
    """The sparsity the run aims at: explicit, or implied by N:M, or 0.5."""
    if cfg.pattern.kind == "nm":
        return 1.0 - cfg.pattern.n / cfg.pattern.m
    return 0.5 if cfg.sparsity is None else float(cfg.sparsity)


#: An N:M cut's tag, ``2of4``; a baseline's cut is ``<label>:<tag>`` (``wanda@one_shot:2of4``).
NM_TAG = re.compile(r"^(\d+)of(\d+)$")


def is_channels_tag(tag: str) -> bool:
    """Whether a cut's tag (``s0.20_channels``, a baseline's ``wanda@one_shot:s0.20_channels``) is a channels cut."""
    return bool(re.match(r"^s\d\.\d+_" + CHANNELS + "(-flap)?$", (tag or "").rsplit(":", 1)[-1]))


def is_heads_tag(tag: str) -> bool:
    """Whether a cut's tag (``s0.33_heads``, ``s0.33_heads-flap``, a baseline's ``wanda@one_shot:s0.33_heads``) removes
    whole KV groups of attention heads."""
    return bool(re.match(r"^s\d\.\d+_" + HEADS + "(-flap)?$", (tag or "").rsplit(":", 1)[-1]))


def is_sliced_tag(tag: str) -> bool:
    """Whether a cut's masks are whole rows and columns sliced out at export (channels, heads): evaluated as masks,
    compensated by ``reconstruct=ls``."""
    return is_channels_tag(tag) or is_heads_tag(tag)


def is_experts_tag(tag: str) -> bool:
    """Whether a cut's tag (``s0.25_experts-reap``, a baseline's ``wanda@one_shot:k2_experts-saliency``) removes
    whole experts."""
    return bool(EXPERTS_TAG.match((tag or "").rsplit(":", 1)[-1]))


def nm_of_tag(tag: str) -> tuple[int, int] | None:
    """(N, M) of an N:M cut's tag (``2of4``, or a baseline's ``wanda:2of4``), None for any other tag."""
    m = NM_TAG.match((tag or "").rsplit(":", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Target:
    """What to cut: unstructured at ``sparsity`` with ``allocation``, or N:M when ``n`` > 0; ``allocation="channels"``
    removes the share ``sparsity`` of every MLP's channels whole (``pattern=channels``); ``allocation="experts"`` the
    share ``sparsity`` (or the count ``removed``) of every MoE layer's experts, ranked by ``score``
    (``pattern=experts``, :data:`.experts.EXPERT_SCORES`)."""

    sparsity: float
    allocation: str = "per_matrix"
    n: int = 0
    m: int = 0
    cap: float = 1.0  # the most one matrix may lose where the budget is shared (global): pattern.max_matrix_sparsity
    owl: tuple[float, float] = (5.0, 0.08)  # allocation=owl: M, λ (pattern.owl_m, pattern.owl_lambda)
    gamma_delta: float = 0.08  # allocation=gamma: pattern.gamma_delta
    removed: int = 0  # allocation=experts: experts removed per layer as a count (0: the share ``sparsity``)
    score: str = ""  # allocation=experts: pattern.expert_score (""= saliency); channels/heads: "flap" or "" (weights)
    heads: tuple[int, int] = (0, 0)  # allocation=heads: the model's (num_attention_heads, num_key_value_heads)
    floor: int = 0  # allocation=experts: one budget over the layers, each keeping at least this many (0: per layer)
    picked: str = ""  # allocation=auto: the allocation chosen on held-out calibration windows (stages/allocation.py)

    @property
    def is_nm(self) -> bool:
        return self.n > 0

    @property
    def tag(self) -> str:
        if self.is_experts:
            return (f"k{self.removed}" if self.removed else f"s{self.sparsity:.2f}") + f"_{EXPERTS}-" + (
                self.score or "saliency") + (f"-floor{self.floor}" if self.floor else "")
        if (self.is_channels or self.is_heads) and self.score:
            return f"s{self.sparsity:.2f}_{self.allocation}-{self.score}"
        return f"{self.n}of{self.m}" if self.is_nm else f"s{self.sparsity:.2f}_{self.allocation}"

    @property
    def is_channels(self) -> bool:
        """Whole MLP channels (``pattern=channels``): a structural cut, exported as a smaller model."""
        return self.allocation == CHANNELS and not self.is_nm

    @property
    def is_experts(self) -> bool:
        """Whole experts (``pattern=experts``): a structural cut, exported with a smaller expert count."""
        return self.allocation == EXPERTS and not self.is_nm

    @property
    def is_heads(self) -> bool:
        """Whole KV groups of attention heads (``pattern=heads``): a structural cut, exported as a smaller model."""
        return self.allocation == HEADS and not self.is_nm

    @property
    def is_sliced(self) -> bool:
        """Whole rows and columns (channels, heads): evaluated as masks, sliced out at export."""
        return self.is_channels or self.is_heads

    @property
    def is_structural(self) -> bool:
        """Whole channels, heads or experts: the export slices them out (a smaller standard model)."""
        return self.is_sliced or self.is_experts

    def for_model(self, model) -> "Target":
        """This target with what a heads cut needs of ``model``'s config (its head counts); itself otherwise."""
        if not self.is_heads:
            return self

        return replace(self, heads=head_counts(text_config(model)))

    @property
    def shares_budget(self) -> bool:
        """Whether the cut shares one budget across matrices (``global``, ``owl``, ``gamma``): it needs every score
        at once."""
        return not self.is_nm and self.allocation in SHARED_BUDGET

    def unstructured(self, sparsity: float, allocation: str) -> "Target":
        """An unstructured cut at ``sparsity`` with ``allocation``, with this target's cap and layer-budget knobs."""
        return Target(sparsity=sparsity, allocation=allocation, cap=self.cap, owl=self.owl,
                      gamma_delta=self.gamma_delta)

    def cut(self, scores: Mapping[str, torch.Tensor], experts: ExpertRouting | None = None,
            flap: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Keep masks (bool ``[out, in]``) of every matrix of ``scores`` (name -> ``[out, in]``, higher = keep);
        an experts cut reads ``experts`` (the run's MoE layers and routing) and masks the experts' matrices only; a
        FLAP channels cut reads ``flap`` (:func:`.channels.flap_scores`) instead of ``scores``. Raises ``ValueError``
        for an experts cut without ``experts``, a FLAP cut without ``flap``."""
        if self.allocation == AUTO and not self.is_nm:
            if not self.picked:
                raise ValueError(f"{self.tag}: allocation=auto is chosen on held-out calibration windows in the run")
            return replace(self, allocation=self.picked, picked="").cut(scores, experts, flap)
        if self.is_experts:
            if experts is None:
                raise ValueError(f"{self.tag}: an experts cut needs the run's routing statistics")
            return experts.masks(self.sparsity, self.removed, self.score or "saliency", scores, self.floor)
        if self.is_sliced and self.score == "flap":
            if flap is None:
                raise ValueError(f"{self.tag}: a FLAP cut needs the calibration statistics (Σx, Σx²)")
            scores = flap
        if self.is_heads:
            if not self.heads[0]:
                raise ValueError(f"{self.tag}: a heads cut needs the model's head counts (Target.for_model)")
            return head_masks(scores, self.sparsity, *self.heads)
        if self.is_channels and self.score == "flap":
            return channel_masks(flap, self.sparsity)
        if self.is_nm:
            return M.nm_masks(scores, self.n, self.m)
        if self.is_channels:
            return channel_masks(scores, self.sparsity)
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
    """The run's primary target: its N:M pattern, or its sparsity with ``pattern.allocation`` as the method takes it
    (:meth:`.method.Method.allocation`: null is its default; SparseGPT's own blocks of columns)."""
    p = cfg.pattern
    if p.kind == "nm":
        return Target(sparsity=target_sparsity(cfg), allocation="per_row", n=p.n, m=p.m)
    if p.kind in (CHANNELS, HEADS):
        return Target(sparsity=target_sparsity(cfg), allocation=p.kind, score="flap" if p.channel_score == "flap" else "")
    if p.kind == EXPERTS:
        asked = p.experts_removed
        floor = int(p.experts_floor or 0)
        if asked is not None and float(asked) >= 1:
            return Target(sparsity=0.0, allocation=EXPERTS, removed=int(asked), score=p.expert_score, floor=floor)
        return Target(sparsity=float(asked) if asked is not None else target_sparsity(cfg), allocation=EXPERTS,
                      score=p.expert_score, floor=floor)
    return Target(sparsity=target_sparsity(cfg), allocation=method_of(cfg).allocation(p.allocation),
                  cap=float(p.max_matrix_sparsity), owl=(float(p.owl_m), float(p.owl_lambda)),
                  gamma_delta=float(p.gamma_delta))


def check_targets_fit(layers: Mapping[str, nn.Module], targets: list[Target]) -> None:
    """Raise :class:`UserError` when an N:M target does not fit a prunable matrix (``layers``: name -> module with a
    ``weight``, loaded or on the ``meta`` device), naming every matrix that cannot take it, or a channels target
    finds no dense MLP (:func:`.channels.mlp_channels`)."""
    for t in targets:
        if t.is_channels:
            mlp_channels({n: tuple(m.weight.shape) for n, m in layers.items()})
        if t.is_heads and t.heads[0]:
            attention_heads({n: tuple(layers[n].weight.shape) for n in attention_names(layers)}, *t.heads)
        if t.is_nm:
            try:
                M.check_nm_applicable({n: tuple(m.weight.shape) for n, m in layers.items()}, t.n, t.m)
            except ValueError as err:
                raise UserError(str(err)) from None


def calibration_mode(cfg: DictConfig) -> str:
    """``calibration.mode`` resolved: as set, or (``auto``) the method's published block protocol
    (:meth:`.method.Method.calibration_mode`)."""
    mode = cfg.calibration.mode
    return mode if mode != "auto" else method_of(cfg).calibration_mode()


def default_allocation(cfg: DictConfig) -> str:
    """``pattern.allocation`` where it is null: the method's (:meth:`.method.Method.default_allocation`)."""
    return method_of(cfg).default_allocation()


def _default_cuts(cfg: DictConfig, value, key: str) -> list:
    return list(value) if value is not None else list(method_of(cfg).default_cuts[key])


def extra_sparsities(cfg: DictConfig) -> list[float]:
    """``export.sparsities``; null: the method's default cuts (UniPruning's 0.5, 0.6, 0.7; none for the others)."""
    return [float(s) for s in _default_cuts(cfg, cfg.export.sparsities, "sparsities")]


def extra_patterns(cfg: DictConfig) -> list[str]:
    """``export.patterns`` (N:M strings); null: the method's default (UniPruning's 2:4, none for the others)."""
    return [str(p) for p in _default_cuts(cfg, cfg.export.patterns, "patterns")]


def baselines_of(cfg: DictConfig) -> list[str]:
    """``eval.baselines``; null: the method's default (UniPruning's ``wanda@one_shot``, none for the others)."""
    return [str(b) for b in _default_cuts(cfg, cfg.eval.baselines, "baselines")]


def targets_of(cfg: DictConfig, primary: Target) -> list[Target]:
    """The primary target, then every extra sparsity of ``export.sparsities`` and N:M of ``export.patterns``
    (a searching method only, UniPruning: the cuts of one Γ; :func:`extra_sparsities`, :func:`extra_patterns`)."""
    out = [primary]
    if primary.is_experts and method_of(cfg).searches:  # the other scores at the same share, then the explicit extra shares (no default ones:
        shares = [(primary.sparsity, primary.removed)]  # the methods' 0.5-0.7 are weight sparsities, not expert ones)
        shares += [(float(s), 0) for s in (cfg.export.sparsities or [])]
        for sparsity, removed in shares:
            for score in (primary.score, *(s for s in EXPERT_SCORES if s != primary.score)):
                t = Target(sparsity=sparsity, allocation=EXPERTS, removed=removed, score=score, floor=primary.floor)
                if t not in out:
                    out.append(t)
        return out
    if method_of(cfg).searches and primary.is_sliced:  # other shares; FLAP's cut beside Γ's (Γ's beside FLAP's)
        for sp in extra_sparsities(cfg):
            if replace(primary, sparsity=float(sp)) not in out:
                out.append(replace(primary, sparsity=float(sp)))
        other = "" if primary.score == "flap" else "flap"
        out += [replace(t, score=other) for t in out]
        for pat in cfg.export.patterns or []:  # N:M masks beside, where asked (no default one in a structural run)
            n, m = (int(v) for v in str(pat).split(":"))
            out.append(Target(sparsity=1 - n / m, allocation="per_row", n=n, m=m))
        return out
    if method_of(cfg).searches and not primary.is_experts:
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
