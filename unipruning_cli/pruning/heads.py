"""Structural cuts of attention heads: whole KV groups removed, each with the query heads that read it, so the pruned
model is a standard one with fewer ``num_attention_heads`` and ``num_key_value_heads`` (``head_dim`` unchanged).

KV group g of an attention layer with H query heads, G KV heads (GQA: r = H / G query heads per group) and head size
d is rows ``[g·d, (g+1)·d)`` of ``k_proj`` and ``v_proj``, rows ``[g·r·d, (g+1)·r·d)`` of ``q_proj`` and the same
columns of ``o_proj``. Removing it keeps r the same (so every family's ``repeat_kv`` still holds) and every kept
head's computation unchanged; its contribution leaves through the removed columns of ``o_proj``, so the masked model
computes what the sliced one does (FLAP, An et al. 2024, prunes heads the same way; with GQA, whole groups).

A group's score is the sum of per-weight scores over its weights (its rows of q/k/v and its columns of o_proj): |Γ|
for UniPruning, Wanda's scores for the structured Wanda baseline, or FLAP's fluctuation (:func:`.channels.flap_scores`:
nonzero in o_proj's columns only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ..core.errors import UserError
from .channels import kept_channels, sliced_linear

#: The attention projections by the last part of their names: (query, key, value), output.
ATTENTION_ROLES = (("q_proj", "k_proj", "v_proj"), "o_proj")


@dataclass(frozen=True)
class AttentionHeads:
    """One attention layer's KV groups: its ``q``, ``k``, ``v``, ``o`` matrices' names, ``groups`` (G), ``ratio``
    (query heads per group, r) and ``head_dim`` (d)."""

    parent: str
    q: str
    k: str
    v: str
    o: str
    groups: int
    ratio: int
    head_dim: int

    def group_rows(self, name: str) -> int:
        """How many rows of q/k/v (columns of o) one KV group holds: d in k and v, r·d in q and o."""
        return self.head_dim * (1 if name in (self.k, self.v) else self.ratio)

    def expand(self, keep: torch.Tensor, name: str) -> torch.Tensor:
        """bool per row of q/k/v (per column of o): the kept groups ``keep`` (bool ``[G]``) spread over their rows."""
        return keep.repeat_interleave(self.group_rows(name))


def head_counts(config) -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads) of a text config (no KV field: every head its own group);
    :class:`UserError` where the config has no head count."""
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise UserError(f"pattern=heads: {type(config).__name__} has no num_attention_heads")
    kv = getattr(config, "num_key_value_heads", None)
    return heads, kv if isinstance(kv, int) else heads


def attention_heads(shapes: Mapping[str, tuple[int, ...]], heads: int, kv_heads: int) -> list[AttentionHeads]:
    """Every attention layer among the prunable matrices ``shapes`` (name -> ``(out, in)``), by the names of its
    projections, with the config's head counts. Raises :class:`UserError` where none is found or the shapes do not
    divide into ``heads`` query and ``kv_heads`` KV heads of one size."""
    by_parent: dict[str, dict[str, str]] = {}
    for name in shapes:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = name
    (qkv, out) = ATTENTION_ROLES
    found = []
    for parent, leaves in by_parent.items():
        if not all(r in leaves for r in (*qkv, out)):
            continue
        q, k, v, o = (leaves[r] for r in (*qkv, out))
        d = shapes[q][0] // heads
        ok = (kv_heads and heads % kv_heads == 0 and shapes[q][0] == heads * d and shapes[k][0] == shapes[v][0]
              == kv_heads * d and shapes[o][1] == heads * d)
        if not ok:
            raise UserError(f"pattern=heads: {parent}'s projections {[shapes[n] for n in (q, k, v, o)]} are not "
                            f"{heads} query and {kv_heads} KV heads of one size")
        found.append(AttentionHeads(parent, q, k, v, o, kv_heads, heads // kv_heads, d))
    if not found:
        raise UserError("pattern=heads: no attention layer with q_proj, k_proj, v_proj and o_proj among the prunable "
                        "matrices")
    return found


def group_scores(att: AttentionHeads, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Score of each KV group (float64 ``[G]``): the per-weight ``scores`` (name -> ``[out, in]``) summed over its
    rows of q/k/v and its columns of o."""
    out = torch.zeros(att.groups, dtype=torch.float64)
    for name in (att.q, att.k, att.v, att.o):
        s = scores[name].double()
        per = s.sum(1) if name != att.o else s.sum(0)
        out += per.reshape(att.groups, -1).sum(1).cpu()
    return out


def head_masks(scores: Mapping[str, torch.Tensor], sparsity: float, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Keep masks (bool ``[out, in]``) of every attention matrix in ``scores``: the same share ``sparsity`` of KV
    groups (with their query heads) removed from every layer, the lowest-scored (:func:`group_scores`). The other
    matrices get no mask and their scores are never read."""
    shapes = {n: tuple(scores[n].shape) for n in scores if n in attention_names(scores)}
    masks = {}
    for att in attention_heads(shapes, heads, kv_heads):
        keep = kept_channels(group_scores(att, scores), sparsity, "KV heads")
        for name in (att.q, att.k, att.v):
            masks[name] = att.expand(keep, name)[:, None].expand(shapes[name]).clone()
        masks[att.o] = att.expand(keep, att.o)[None, :].expand(shapes[att.o]).clone()
    return masks


def heads_of_masks(masks: Mapping[str, torch.Tensor], att: AttentionHeads) -> torch.Tensor:
    """The kept KV groups (bool ``[G]``) that ``masks`` give ``att``; ``ValueError`` where they are not whole groups."""
    keep = masks[att.o].any(0).cpu().reshape(att.groups, -1).any(1)
    for name in (att.q, att.k, att.v, att.o):
        rows = att.expand(keep, name)
        want = rows[None, :] if name == att.o else rows[:, None]
        if not torch.equal(masks[name].cpu(), want.expand(masks[name].shape)):
            raise ValueError(f"{name}: the mask is not whole KV groups of {att.parent}")
    return keep


def attention_names(names: Iterable[str]) -> set[str]:
    """The names among ``names`` of attention projections (q/k/v/o_proj)."""
    return {n for n in names if n.rpartition(".")[2] in (*ATTENTION_ROLES[0], ATTENTION_ROLES[1])}


def check_heads_fit(model: nn.Module, layers: Mapping[str, nn.Module], removed: int = 1) -> None:
    """Raise :class:`UserError` where a heads cut of ``model`` (its prunable ``layers``; on the ``meta`` device too)
    could not be written as a standard model: no attention layer of q/k/v/o Linears, or a family whose attention
    does not take its head count and ``head_dim`` from the config (built here on the ``meta`` device from a config
    with ``removed`` fewer KV groups, through its dict, and its projections' shapes compared). Before any weight."""
    from ..models.layouts import text_config

    config = text_config(model)
    heads, kv = head_counts(config)
    atts = attention_heads({n: tuple(m.weight.shape) for n, m in layers.items() if n in attention_names(layers)},
                           heads, kv)
    for att in atts:
        for name in (att.q, att.k, att.v, att.o):
            if type(layers[name]) is not nn.Linear:
                raise UserError(f"pattern=heads: {name} is a {type(layers[name]).__name__}, not an nn.Linear")
    new_kv = kv - removed
    if new_kv < 1:
        raise UserError(f"pattern=heads: the cut removes all {kv} KV heads of a layer")
    smaller = copy.deepcopy(config)
    smaller.num_attention_heads, smaller.head_dim = new_kv * atts[0].ratio, atts[0].head_dim
    if hasattr(smaller, "num_key_value_heads"):
        smaller.num_key_value_heads = new_kv
    try:
        again = type(config).from_dict(smaller.to_dict())
        with torch.device("meta"):
            rebuilt = type(model)._from_config(again) if type(model.config) is type(config) else None
    except Exception as err:  # noqa: BLE001 - a family that cannot take the smaller config
        raise UserError(f"pattern=heads: {type(config).__name__} cannot hold {new_kv} KV heads of {atts[0].head_dim}: "
                        f"{err}") from None
    if rebuilt is None:
        return  # a multimodal wrapper: its language part was checked by the shapes above only
    from ..models.layouts import as_linears

    as_linears(rebuilt)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for att in atts:
        for name in (att.q, att.k, att.v, att.o):
            rows = att.group_rows(name) * new_kv
            w = expected[f"{name}.weight"]
            expected[f"{name}.weight"] = (w[0], rows) if name == att.o else (rows, w[1])
            if f"{name}.bias" in expected and name != att.o:
                expected[f"{name}.bias"] = (rows,)
    got = {n: tuple(p.shape) for n, p in rebuilt.named_parameters()}
    wrong = [n for n in sorted(set(expected) | set(got)) if expected.get(n) != got.get(n)]
    if wrong:  # a per-head tensor besides the projections (gpt-oss's sinks), or heads not read from the config
        raise UserError(f"pattern=heads: {type(config).__name__} with {new_kv} KV heads does not have the shapes of "
                        f"the sliced projections ({wrong[0]}: {got.get(wrong[0])} where {expected.get(wrong[0])} "
                        "was expected): a smaller standard model cannot be written")


@torch.no_grad()
def slice_heads(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict:
    """Remove, in place, the KV groups a heads cut's ``masks`` drop (whole groups, the same count in every layer):
    q/k/v lose their rows (and bias entries), o its columns, and the config's ``num_attention_heads``,
    ``num_key_value_heads`` and ``head_dim`` say what is kept, so ``save_pretrained`` writes a standard model.
    Returns ``{"heads": (before, after), "kv_heads": (before, after), "field": "num_key_value_heads",
    "parameters": (before, after)}``. Raises :class:`UserError` where the layers keep different counts."""
    from ..models.layouts import text_config

    config = text_config(model)
    heads, kv = head_counts(config)
    before = sum(p.numel() for p in model.parameters())
    shapes = {n: tuple(m.shape) for n, m in masks.items() if n in attention_names(masks)}
    atts = attention_heads(shapes, heads, kv)
    keeps = [heads_of_masks(masks, att) for att in atts]
    kept = {int(k.sum()) for k in keeps}
    if len(kept) != 1:
        raise UserError(f"pattern=heads: the layers keep {sorted(kept)} KV heads; a standard config has one count")
    modules = dict(model.named_modules())
    for att, keep in zip(atts, keeps):
        for name in (att.q, att.k, att.v, att.o):
            idx = att.expand(keep, name).nonzero().flatten()
            parent, _, leaf = name.rpartition(".")
            setattr(modules[parent], leaf, sliced_linear(modules[name], idx, name != att.o))
    new_kv = kept.pop()
    config.num_attention_heads, config.head_dim = new_kv * atts[0].ratio, atts[0].head_dim
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = new_kv
    return {"heads": (heads, config.num_attention_heads), "kv_heads": (kv, new_kv), "field": "num_key_value_heads",
            "parameters": (before, sum(p.numel() for p in model.parameters()))}
