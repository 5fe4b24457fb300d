"""Structural cuts of a mixture of experts: whole experts removed from every MoE layer, so the pruned model is a
standard one with a smaller expert count (``num_local_experts`` / ``num_experts`` / ``n_routed_experts``).

An MoE layer here is a list of experts (transformers 5's fused experts taken as :class:`..models.layouts.ExpertLinears`
at load, or a ``ModuleList`` of identical Linear experts) and its router: the module beside the list whose ``weight``
is ``[E, hidden]`` (Mixtral's ``gate``, gpt-oss's ``router``; Qwen2-MoE's ``shared_expert_gate`` ``[1, hidden]`` and
shared experts are not it and are never touched). Removing expert e drops it from the list and row e from the router
(and entry e of every ``[E]`` router tensor: gpt-oss's bias, DeepSeek's ``e_score_correction_bias``), so the router's
softmax and top-k run over the kept experts only: the function of the exported model, not that of a zeroed expert
that still receives tokens.

Scores of expert e of a layer, higher = keep (``pattern.expert_score``):

- ``frequency``: the share of the layer's routed (token, slot) pairs that go to e on the calibration tokens;
- ``reap``: REAP (Lasby et al. 2025, "REAP the Experts", Eq. 6): the mean over the tokens routed to e of the router
  weight times the L2 norm of the expert's output, ``(1/|X_e|) Σ_{x∈X_e} g_e(x) ‖f_e(x)‖₂`` (0 for an expert never
  routed to);
- ``saliency``: the method's per-weight scores (|Γ| for UniPruning, the local metric's otherwise) summed over the
  expert's matrices, times its ``frequency`` (UniPruning's Γ carried to whole experts, weighted by how often the router
  picks each one).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from ..core.errors import UserError, check
from ..models.layouts import EXPERT_FIELDS, ExpertLinears, expert_counts, expert_lists, text_config
from ..models.loading import find_blocks
from .channels import kept_channels

#: The expert scores of ``pattern.expert_score``.
EXPERT_SCORES = ("saliency", "reap", "frequency")
#: Attributes of an experts module, router or MoE block that hold the expert count (set to the kept count).
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer: ``experts`` (module name of the list), ``router`` (module name of the module holding the router
    ``weight [E, hidden]``), ``count`` (E) and ``matrices`` (per expert, its prunable matrices' names)."""

    experts: str
    router: str
    count: int
    matrices: tuple[tuple[str, ...], ...]
    fused: bool = True

    @property
    def parent(self) -> str:
        return self.experts.rpartition(".")[0]


def _router_of(parent: nn.Module, parent_name: str, experts_list: nn.Module, count: int) -> str:
    """The router of ``experts_list`` among the modules of ``parent`` (its MoE block): the one whose own ``weight`` is
    ``[count, hidden]``. :class:`UserError` where none or several are."""
    inside = {id(m) for m in experts_list.modules()}
    found = [n for n, m in parent.named_modules() if id(m) not in inside
             and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
             and m.weight.shape[0] == count]
    if len(found) != 1:
        raise UserError(f"pattern=experts: {parent_name} has {len(found)} modules with a [{count}, hidden] router "
                        f"weight ({', '.join(found) or 'none'}); its experts cannot be removed with their router rows")
    return ".".join(p for p in (parent_name, found[0]) if p)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model`` (loaded, or on the ``meta`` device), block by block: each list of experts of
    :func:`..models.layouts.expert_lists` with its router. Empty for a dense model; :class:`UserError` where a list has
    no single router."""
    prefix, blocks = find_blocks(model)
    counts = expert_counts(model)
    out = []
    for i, block in enumerate(blocks):
        for name, experts_list in expert_lists(block, counts):
            full = ".".join(p for p in (f"{prefix}.{i}", name) if p)
            parent_rel = name.rpartition(".")[0]
            parent = block.get_submodule(parent_rel) if parent_rel else block
            router = _router_of(parent, full.rpartition(".")[0], experts_list, len(experts_list))
            matrices = tuple(tuple(f"{full}.{e}.{n}" if n else f"{full}.{e}" for n, m in child.named_modules()
                                   if isinstance(m, nn.Linear)) for e, child in enumerate(experts_list))
            out.append(MoELayer(full, router, len(experts_list), matrices, isinstance(experts_list, ExpertLinears)))
    return out


# ==============================================================================================
# routing statistics


@dataclass
class RoutingStats:
    """What the router did on the calibration tokens in one MoE layer: ``tokens`` (int64 ``[E]``: the (token, slot)
    pairs routed to each expert) and ``reap`` (float64 ``[E]``: Σ over them of the router weight times the L2 norm of
    the expert's output; None where the experts are a Linear list, whose router weights are applied outside it)."""

    tokens: torch.Tensor
    reap: Optional[torch.Tensor] = None


@dataclass
class RoutingObserver:
    """Records :class:`RoutingStats` of every MoE layer of a model while it runs forwards (a context manager):
    fused experts report each hit expert's router weights and outputs (:attr:`..models.layouts.ExpertLinears.observer`),
    a Linear list's experts their token counts (forward pre-hooks)."""

    layers: list[MoELayer]
    model: nn.Module
    stats: dict[str, RoutingStats] = field(default_factory=dict)

    def __enter__(self) -> "RoutingObserver":
        self._handles = []
        for layer in self.layers:
            module = self.model.get_submodule(layer.experts)
            st = self.stats[layer.experts] = RoutingStats(torch.zeros(layer.count, dtype=torch.int64),
                                                         torch.zeros(layer.count, dtype=torch.float64)
                                                         if layer.fused else None)
            if layer.fused:
                module.observer = self._fused(st)
            else:
                self._handles += [child.register_forward_pre_hook(self._counter(st, e))
                                  for e, child in enumerate(module)]
        return self

    @staticmethod
    def _fused(st: RoutingStats):
        def observe(e: int, weights: torch.Tensor, out: torch.Tensor) -> None:
            st.tokens[e] += weights.numel()
            st.reap[e] += float((weights.detach().double() * out.detach().double().norm(dim=-1)).sum())
        return observe

    @staticmethod
    def _counter(st: RoutingStats, e: int):
        def count(module, args) -> None:
            st.tokens[e] += args[0].numel() // args[0].shape[-1]
        return count

    def __exit__(self, *exc) -> None:
        for layer in (x for x in self.layers if x.fused):
            self.model.get_submodule(layer.experts).observer = None
        for h in self._handles:
            h.remove()


# ==============================================================================================
# scores and cuts


def expert_scores(layer: MoELayer, how: str, routing: RoutingStats,
                  scores: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Score of each expert of ``layer`` (float64 ``[E]``, higher = keep) by ``how`` (:data:`EXPERT_SCORES`; module
    docstring for the formulas). ``scores`` (name -> per-weight scores ``[out, in]``) is read for ``saliency`` only.
    Raises :class:`UserError` for REAP on a Linear list of experts (no router weights seen) and an unknown ``how``."""
    tokens = routing.tokens.double()
    frequency = tokens / tokens.sum().clamp(min=1)
    if how == "frequency":
        return frequency
    if how == "reap":
        if routing.reap is None:
            raise UserError(f"pattern.expert_score=reap: the experts of {layer.experts} are a list of Linear experts "
                            "whose router weights are applied outside them; use saliency or frequency")
        return routing.reap / tokens.clamp(min=1)
    if how == "saliency":
        weight_sums = torch.tensor([sum(float(scores[n].double().sum()) for n in names) for names in layer.matrices],
                                   dtype=torch.float64)
        return frequency * weight_sums
    raise UserError(f"pattern.expert_score={how!r}: choose one of {', '.join(EXPERT_SCORES)}")


def removed_count(count: int, share: float, removed: int = 0) -> int:
    """Experts removed from a layer of ``count``: ``removed`` where given, else ``round(share * count)``."""
    return removed if removed else round(share * count)


def kept_experts(score: torch.Tensor, share: float, removed: int = 0, top_k: int = 1) -> torch.Tensor:
    """bool ``[E]``: the experts kept, the highest ``score`` (ties to the lower index), after removing
    :func:`removed_count` of them. Raises :class:`UserError` where fewer than ``top_k`` (``num_experts_per_tok``)
    would be left."""
    count = score.numel()
    k = removed_count(count, share, removed)
    if count - k < max(top_k, 1):
        raise UserError(f"pattern=experts: removing {k} of {count} experts leaves {count - k}, fewer than the "
                        f"{top_k} each token is routed to (num_experts_per_tok)")
    return kept_channels(score, k / count, "experts")


def expert_masks(layer: MoELayer, keep: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Keep masks (bool, every weight of an expert True or False) of every matrix of ``layer``'s experts."""
    return {n: torch.full(shapes[n], bool(keep[e])) for e, names in enumerate(layer.matrices) for n in names}


def experts_of_masks(masks: Mapping[str, torch.Tensor], layer: MoELayer) -> torch.Tensor:
    """The kept experts (bool ``[E]``) that ``masks`` give ``layer``; ``ValueError`` where a mask is not a whole expert
    (partly kept, or an expert's matrices disagreeing)."""
    keep = torch.tensor([bool(masks[names[0]].any()) for names in layer.matrices])
    for e, names in enumerate(layer.matrices):
        for n in names:
            m = masks[n]
            if not (bool(m.all()) if keep[e] else not bool(m.any())):
                raise ValueError(f"{n}: the mask is not a whole expert of {layer.experts}")
    return keep


@dataclass
class ExpertRouting:
    """What an experts cut reads: the model's MoE ``layers``, their routing ``stats`` on the calibration tokens (experts
    module name -> :class:`RoutingStats`), the ``shapes`` of every expert matrix (name -> ``(out, in)``) and ``top_k``
    (``num_experts_per_tok``)."""

    layers: list[MoELayer]
    stats: dict[str, RoutingStats]
    shapes: dict[str, tuple[int, ...]]
    top_k: int

    def masks(self, share: float, removed: int, score: str, scores: Mapping[str, torch.Tensor] | None = None,
              floor: int = 0) -> dict[str, torch.Tensor]:
        """Keep masks of every expert matrix: per layer the experts of lowest ``score`` removed (:func:`kept_experts`;
        ``scores``, the per-weight scores, read for ``saliency`` only, one expert matrix at a time); with ``floor``,
        one budget over the layers instead (:func:`global_keeps`)."""
        ranked = [expert_scores(layer, score, self.stats[layer.experts], scores) for layer in self.layers]
        if floor:
            keeps = global_keeps(ranked, share, removed, max(floor, self.top_k))
        else:
            keeps = [kept_experts(s, share, removed, self.top_k) for s in ranked]
        out: dict[str, torch.Tensor] = {}
        for layer, keep in zip(self.layers, keeps):
            out.update(expert_masks(layer, keep, self.shapes))
        return out


def global_keeps(scores: list[torch.Tensor], share: float, removed: int, floor: int) -> list[torch.Tensor]:
    """The kept experts (bool ``[E]`` per layer) of one budget over the layers: :func:`removed_count` per layer times
    the layers, taken from the lowest scores of all layers, each score divided by its layer's mean (REAP and
    saliency differ in scale from layer to layer; a frequency's mean is the same everywhere), never leaving a layer
    fewer than ``floor`` experts. Ties go to the later layer and the higher index. Raises :class:`UserError` where
    the floor leaves too few experts to remove."""
    budget = sum(removed_count(s.numel(), share, removed) for s in scores)
    candidates = sorted(((float(s[e] / s.mean().clamp(min=1e-30)), -i, -e) for i, s in enumerate(scores)
                         for e in range(s.numel())))
    keeps = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    left = budget
    for _, i, e in candidates:
        if left == 0:
            break
        if int(keeps[-i].sum()) > floor:
            keeps[-i][-e] = False
            left -= 1
    if left:
        raise UserError(f"pattern.experts_floor={floor}: every layer keeping {floor} experts leaves {budget - left} "
                        f"of the {budget} to remove")
    return keeps


def validate_experts(cfg: DictConfig) -> None:
    """``pattern=experts``: a share in (0, 1) or a whole count, given once, and a known score."""
    p = cfg.pattern
    check(p.expert_score in EXPERT_SCORES, f"pattern.expert_score={p.expert_score!r} is not allowed; choose one of: "
          f"{', '.join(EXPERT_SCORES)}")
    k = p.experts_removed
    if k is not None:
        check(cfg.sparsity is None, f"sparsity={cfg.sparsity} and pattern.experts_removed={k} both say how many "
              "experts go: give one")
        check(0 < k < 1 or (k >= 1 and float(k).is_integer()), f"pattern.experts_removed={k}: a share in (0, 1) or "
              "a whole count of experts >= 1")
    check(p.experts_floor is None or p.experts_floor >= 1, f"pattern.experts_floor={p.experts_floor}: the fewest "
          "experts a layer keeps under one budget, at least 1 (null: the same count in every layer)")
    check(cfg.reconstruct == cfg.refine == "none", "pattern=experts removes whole experts, so no weight of theirs is "
          "updated or swapped; drop reconstruct and refine")
    check(cfg.calibration.mode != "sequential", "calibration.mode=sequential with pattern=experts: experts are ranked "
          "on the dense model's routing (one-shot); drop calibration.mode")


def top_k_of(model: nn.Module) -> int:
    """``num_experts_per_tok`` (or ``top_k`` / ``moe_top_k``) of the model's config; 1 where it has none."""
    config = text_config(model)
    for key in ("num_experts_per_tok", "top_k", "moe_top_k"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 1


def check_experts_fit(model: nn.Module, share: float, removed: int, score: str, floor: int = 0) -> None:
    """Raise :class:`UserError` where an experts cut of ``model`` (loaded or on the ``meta`` device) cannot be made or
    written as a standard model: no MoE layer, a router without a single ``[E, hidden]`` weight, expert groups
    (DeepSeek's ``n_group > 1``: removing experts unevenly breaks the groups), fewer experts left than
    ``num_experts_per_tok``, a cut that removes none, a ``floor`` that leaves too few to remove, REAP on a Linear list
    of experts, a config without an expert-count field (:data:`..models.layouts.EXPERT_FIELDS`). Called before any
    weight is read."""
    layers = moe_layers(model)
    if not layers:
        raise UserError(f"pattern=experts: {type(model).__name__} has no mixture-of-experts layer (no list of experts "
                        "with a router): use pattern=channels for a dense model")
    config = text_config(model)
    groups = getattr(config, "n_group", None)
    if isinstance(groups, int) and groups > 1:
        raise UserError(f"pattern=experts: {type(config).__name__} routes within n_group={groups} groups of experts; "
                        "removing experts would leave groups of different sizes, which its router cannot express")
    if not any(isinstance(getattr(config, f, None), int) for f in EXPERT_FIELDS):
        raise UserError(f"pattern=experts: {type(config).__name__} has none of {', '.join(EXPERT_FIELDS)}: the smaller "
                        "expert count cannot be written")
    top_k = top_k_of(model)
    for layer in layers:
        kept_experts(torch.zeros(layer.count), share, removed, top_k)
        if removed_count(layer.count, share, removed) == 0:
            raise UserError(f"pattern=experts: a share of {share:g} of {layer.count} experts removes none; raise it "
                            "or give pattern.experts_removed as a count")
    if floor:
        global_keeps([torch.ones(layer.count) for layer in layers], share, removed, max(floor, top_k))
        if score == "reap" and not layer.fused:
            expert_scores(layer, score, RoutingStats(torch.zeros(layer.count, dtype=torch.int64)))


# ==============================================================================================
# removing experts from a model


def _replace_rows(module: nn.Module, keep: torch.Tensor, count: int, undo: list, tensors: bool = True) -> None:
    """Keep entries ``keep`` (along dim 0) of every parameter and buffer of ``module`` (its own) with ``count`` rows
    (``tensors``), and set its expert-count attributes (a Linear router's ``out_features``); what was replaced goes on
    ``undo``."""
    idx = keep.nonzero().flatten()
    kept = int(keep.sum())
    for store in (module._parameters, module._buffers) if tensors else ():
        for name, t in list(store.items()):
            if t is not None and t.dim() >= 1 and t.shape[0] == count:
                undo.append((store, name, t))
                new = t.detach().index_select(0, idx.to(t.device))
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if store is module._parameters else new
    for attr in _COUNT_ATTRS + (("out_features",) if isinstance(module, nn.Linear) else ()):
        if module.__dict__.get(attr) == count:
            undo.append((module.__dict__, attr, count))
            module.__dict__[attr] = kept


class ExpertsRemoved:
    """What :func:`remove_experts` changed, to put back with :meth:`restore` (bit for bit) or keep (an export).
    ``structure``: ``{"experts": [before, after], "field": <config field>, "parameters": [before, after]}``."""

    def __init__(self) -> None:
        self.undo, self.structure = [], {}

    def restore(self) -> None:
        for store, name, value in reversed(self.undo):
            if isinstance(store, dict):
                store[name] = value
            else:  # a module's child, a config's field
                setattr(store, name, value)
        self.undo.clear()


@torch.no_grad()
def remove_experts(model: nn.Module, keeps: Mapping[str, torch.Tensor], uniform: bool = True) -> ExpertsRemoved:
    """Remove, in place, the experts ``keeps`` drops (experts module name -> bool ``[E]``, every MoE layer of
    :func:`moe_layers` keeping the same count): each list loses them, its router their rows (and ``[E]`` entries),
    every expert-count attribute and the config's field (:data:`..models.layouts.EXPERT_FIELDS`) become the kept
    count, so the model routes over the kept experts only and ``save_pretrained`` writes a standard, smaller model.
    Kept experts are copied (one layer's at a time beside the model); the removed ones stay referenced by the returned
    handle until it is dropped or :meth:`ExpertsRemoved.restore` d. ``uniform=False`` lets the layers keep different
    counts (one budget over the layers: the model runs, the config keeps its count and cannot be saved as standard).
    Raises :class:`UserError` where a layer is missing from ``keeps`` or, ``uniform``, the layers keep different
    counts."""
    layers = moe_layers(model)
    kept = {int(keeps[layer.experts].sum()) for layer in layers if layer.experts in keeps}
    missing = [layer.experts for layer in layers if layer.experts not in keeps]
    if missing or (uniform and len(kept) != 1):
        raise UserError(f"pattern=experts: {'no cut for ' + ', '.join(missing[:3]) if missing else 'the layers keep '}"
                        f"{'' if missing else str(sorted(kept))}: a standard config holds one expert count")
    handle = ExpertsRemoved()
    before = sum(p.numel() for p in model.parameters())
    for layer in layers:
        keep = keeps[layer.experts].cpu()
        experts = model.get_submodule(layer.experts)
        parent_name, _, leaf = layer.experts.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(experts, ExpertLinears):
            fused = copy.copy(experts.write_back())  # a new fused module: the old one stays whole for restore
            fused.__dict__["_parameters"], fused.__dict__["_buffers"] = dict(fused._parameters), dict(fused._buffers)
            _replace_rows(fused, keep, layer.count, [])
            new = ExpertLinears(fused)
        else:
            new = nn.ModuleList(child for e, child in enumerate(experts) if keep[e])
        handle.undo.append((parent, leaf, experts))
        setattr(parent, leaf, new)
        _replace_rows(model.get_submodule(layer.router), keep, layer.count, handle.undo)
        _replace_rows(parent, keep, layer.count, handle.undo, tensors=False)
    config = text_config(model)
    after_count = kept.pop() if len(kept) == 1 else sorted(kept)
    fields = [f for f in EXPERT_FIELDS if isinstance(getattr(config, f, None), int)] if uniform else []
    for f in fields:
        handle.undo.append((config, f, getattr(config, f)))
        setattr(config, f, after_count)
    handle.structure = {"experts": [layers[0].count, after_count], "field": fields[0] if fields else None,
                        "parameters": [before, sum(p.numel() for p in model.parameters())]}
    return handle
