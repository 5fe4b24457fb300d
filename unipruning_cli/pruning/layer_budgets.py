"""Layer-wise sparsity budgets: how much of each decoder layer to prune, for one global target; inside a layer the
cut is per row (Wanda's comparison group).

Two rules give each layer l an offset ``o_l`` from the target ``s``; the layer's sparsity is then
``s_l = clamp(u + o_l, 0, cap)``, with the one shift ``u`` (near ``s``) that makes the size-weighted mean of the
``s_l`` exactly ``s``. The offsets never depend on ``s``, and ``u`` grows with ``s``, so every ``s_l`` grows with
``s`` and the cuts of one score nest across sparsities.

- ``owl``: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024, §3; their ``prune_wanda_outlier``). A
  layer's outlier ratio D_l is the share of its scores above ``M`` times their mean, over all its matrices
  together. The ratios are scaled to ``[0, 2λ]``, and ``o_l`` is minus that, centred: layers with more outliers
  keep more weights. Published values: M = 5, λ = 0.08.
- ``gamma``: from the scores alone (UniPruning's |Γ|). A global cut of every layer's scores at 50 % says which
  layers hold the model's smallest scores. ``o_l`` is that layer's share cut, minus 0.5, within ``±δ``. It is
  the ``global`` allocation at one reference sparsity, bounded per layer and applied at every target.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from .masks import _check_sparsity, _prepare, global_masks, mask_sparsity, per_row_mask

#: A decoder layer's name within a matrix's name: up to its first numeric component ("model.layers.3").
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")

#: OWL's published values (Yin et al. 2024, their scripts for LLaMA at 70 %): M and λ.
OWL_M, OWL_LAMBDA = 5.0, 0.08


def layer_of(name: str) -> str:
    """The decoder layer that matrix ``name`` belongs to (``model.layers.3.mlp.experts.5.down_proj`` ->
    ``model.layers.3``); a name without a numeric component is its own layer."""
    found = _LAYER.match(name)
    return found.group(1) if found else name


def _by_layer(scores: Mapping[str, Tensor]) -> dict[str, list[str]]:
    layers: dict[str, list[str]] = {}
    for name in scores:
        layers.setdefault(layer_of(name), []).append(name)
    return layers


def owl_offsets(scores: Mapping[str, Tensor], m: float = OWL_M, lam: float = OWL_LAMBDA) -> dict[str, float]:
    """OWL's offsets per layer (module docstring): ``-(norm_l - mean(norm))`` with ``norm`` the outlier ratios
    scaled to ``[0, 2λ]``; all zero when every layer has the same ratio. ``scores``: name -> ``[out, in]``."""
    ratios = {}
    for layer, names in _by_layer(scores).items():
        above = total = 0
        mean = sum(float(_prepare(scores[n], n).sum()) for n in names) / sum(scores[n].numel() for n in names)
        for n in names:
            above += int((_prepare(scores[n], n) > m * mean).sum())
            total += scores[n].numel()
        ratios[layer] = above / total
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi == lo:
        return {layer: 0.0 for layer in ratios}
    norm = {layer: (r - lo) / (hi - lo) * 2 * lam for layer, r in ratios.items()}
    centre = sum(norm.values()) / len(norm)
    return {layer: -(v - centre) for layer, v in norm.items()}


def gamma_offsets(scores: Mapping[str, Tensor], delta: float) -> dict[str, float]:
    """The ``gamma`` rule's offsets (module docstring): each layer's share of a global cut at 50 %, minus 0.5,
    within ``±delta``."""
    cut = global_masks(scores, 0.5)
    offsets = {}
    for layer, names in _by_layer(scores).items():
        pruned = sum(mask_sparsity(cut[n]) * cut[n].numel() for n in names) / sum(cut[n].numel() for n in names)
        offsets[layer] = max(-delta, min(delta, pruned - 0.5))
    return offsets


def layer_sparsities(sizes: Mapping[str, int], offsets: Mapping[str, float], sparsity: float,
                     cap: float = 1.0) -> dict[str, float]:
    """``s_l = clamp(u + o_l, 0, cap)`` with the smallest ``u`` whose size-weighted mean is ``sparsity`` (to
    1e-12, by bisection). ``sizes``: layer -> weights. Raises ``ValueError`` when the cap cannot hold the target."""
    _check_sparsity(sparsity)
    total = sum(sizes.values())
    if sparsity > cap + 1e-12:
        raise ValueError(f"sparsity {sparsity} is more than a cap of {cap} per layer allows")

    def mean(u: float) -> float:
        return sum(n * min(cap, max(0.0, u + offsets[k])) for k, n in sizes.items()) / total

    lo, hi = -1.0 - max(offsets.values(), default=0), 1.0 - min(offsets.values(), default=0)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean(mid) < sparsity:
            lo = mid
        else:
            hi = mid
    return {k: min(cap, max(0.0, hi + offsets[k])) for k in sizes}


def layerwise_masks(scores: Mapping[str, Tensor], sparsity: float, offsets: Mapping[str, float],
                    cap: float = 1.0) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Masks (bool ``[out, in]``, True = keep) for every matrix: its layer's sparsity (:func:`layer_sparsities`),
    cut per row. Returns (masks, layer -> sparsity)."""
    layers = _by_layer(scores)
    sizes = {layer: sum(scores[n].numel() for n in names) for layer, names in layers.items()}
    per_layer = layer_sparsities(sizes, {k: offsets.get(k, 0.0) for k in sizes}, sparsity, cap)
    return {n: per_row_mask(scores[n], per_layer[layer_of(n)], name=n) for n in scores}, per_layer
