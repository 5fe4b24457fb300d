"""Turning importance scores into keep-masks (per row, per matrix, global, N:M), and counting zeros.

A mask is a ``torch.bool`` tensor of the weight's shape where True means KEEP. Scores are float
tensors of shape ``[out_features, in_features]`` where higher means more important.

Every selection here is a pure function of the fp32 score values: among equal scores the element
with the lower row-major flat index is kept first. Pruning methods are compared against each
other, and heavily quantised or saturated scores are full of ties, so an unstable ``topk`` would
make results depend on the kernel, the device and the run. The same total order also makes the
masks nested: the mask at a higher sparsity is always a subset of the mask at a lower one.

How many entries a group loses is decided in one place, :func:`num_pruned`, so that per-row,
per-matrix, global and reporting code all agree to the element.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "ALLOCATIONS",
    "check_nm_applicable",
    "global_masks",
    "mask_sparsity",
    "masks_for",
    "nm_mask",
    "nm_masks",
    "num_pruned",
    "per_matrix_mask",
    "per_row_mask",
]

# Guards ``g * s + 0.5`` against landing a hair below an integer (e.g. 0.7 * 10 = 6.9999...).
_ROUNDING_EPS = 1e-9

# Lower 31 bits of an int32: flipping them turns the bit patterns of negative floats into
# integers that order the same way as the floats (see ``_order_key``).
_LOW_31_BITS = 0x7FFFFFFF


# --------------------------------------------------------------------------- counting


def num_pruned(size: int, sparsity: float) -> int:
    """Number of entries to prune from a group of ``size`` at ``sparsity``, rounded half up.

    Rounding half up (rather than Python's banker's ``round``) keeps the count monotone in both
    arguments, and the epsilon absorbs float error so 0.7 of 10 is 7, not 6.
    """
    if size < 0:
        raise ValueError(f"group size must be non-negative, got {size}")
    _check_sparsity(sparsity)
    return min(size, math.floor(size * sparsity + 0.5 + _ROUNDING_EPS))


def _check_sparsity(sparsity: float) -> None:
    # ``not (0 <= s <= 1)`` also rejects NaN, which would otherwise silently prune nothing.
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")


# --------------------------------------------------------------------------- input checks


def _layer_label(name: Optional[str]) -> str:
    return f" for layer '{name}'" if name is not None else ""


def _prepare(score: Tensor, name: Optional[str] = None) -> Tensor:
    """The fp32 view of ``score`` that all selection works on; rejects NaN.

    NaN has no place in an order, so any answer would be arbitrary: a NaN score almost always
    means a broken calibration statistic, and failing loudly with the layer name is kinder.
    """
    values = score.detach().float()
    if torch.isnan(values).any():
        raise ValueError(f"score contains NaN{_layer_label(name)}")
    return values


def _require_2d(score: Tensor, what: str, name: Optional[str]) -> None:
    if score.dim() != 2:
        raise ValueError(
            f"{what} needs a 2-D score [out_features, in_features]{_layer_label(name)}, "
            f"got shape {tuple(score.shape)}"
        )


def _check_nm(n: int, m: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < n < m, got {n}:{m}")


# --------------------------------------------------------------------------- local allocations


def _keep_top_by_sort(values: Tensor, keep: int) -> Tensor:
    """Reference rule: a stable descending sort puts equal scores in index order (the promised
    tie-break); the first ``keep`` positions of every slice are kept. O(n log n)."""
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if keep <= 0 or values.numel() == 0:
        return mask
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return mask.scatter_(-1, order[..., :keep], True)


_BAND_SAMPLE = 4096


def kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest value (1-based) of a 1-D tensor, exactly as ``flat.kthvalue(k)`` gives it.

    On CPU ``kthvalue`` over one long slice runs on one thread. Here the order statistics of a strided
    sample bracket the answer in a narrow band [lo, hi]; counting the values below lo and selecting
    inside the band finds it with a few vectorised passes. When the bracket misses (an unlucky or
    adversarially periodic input) the full ``kthvalue`` decides: the sample changes only the time,
    never the answer (scripts/bench_masks.py, tests/test_mask_rules.py).
    """
    n = flat.numel()
    if n <= 8 * _BAND_SAMPLE:
        return flat.kthvalue(k).values
    sample = flat[:: n // _BAND_SAMPLE].sort().values
    size = sample.numel()
    p = k / n
    pos = p * size
    margin = 4.0 * math.sqrt(size * p * (1 - p)) + 2  # 4 sd of the sample rank of the k-th value
    lo = sample[max(0, int(pos - margin))]
    hi = sample[min(size - 1, int(pos + margin))]
    rank = k - int((flat < lo).sum())
    band = flat[(flat >= lo) & (flat <= hi)]
    if 1 <= rank <= band.numel():
        return band.kthvalue(rank).values
    return flat.kthvalue(k).values


def _keep_top_by_selection(values: Tensor, keep: int) -> Tensor:
    """Same mask as ``_keep_top_by_sort`` in O(n): the keep-th largest value of each slice by
    selection, everything above it, then the first (lowest-index) ties up to the quota.
    Several times faster on LLM-sized matrices (scripts/bench_masks.py)."""
    size = values.shape[-1]
    if keep <= 0 or values.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if keep >= size:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if values.dim() == 1:
        thr = kth_smallest(values, size - keep + 1)
    else:
        thr = values.kthvalue(size - keep + 1, dim=-1, keepdim=True).values
    above = values > thr
    need = keep - above.sum(dim=-1, keepdim=True)
    ties = values == thr
    if bool((ties.sum(dim=-1, keepdim=True) == need).all()):  # the usual case: no tie crosses the quota
        return above | ties
    return above | (ties & (ties.cumsum(dim=-1) <= need))


def _keep_top_along_last_dim(values: Tensor, keep: int) -> Tensor:
    """Keep the ``keep`` best entries of every slice along the last dimension, ties to lower index."""
    # Selection wins on long slices (scripts/bench_masks.py, one run over SmolLM2's shapes: a whole
    # matrix 0.043x the sort's time, the rows of a matrix 0.39x); N:M groups of a few entries keep the sort.
    if values.shape[-1] > 64:
        return _keep_top_by_selection(values, keep)
    return _keep_top_by_sort(values, keep)


def per_row_mask(score: Tensor, sparsity: float, *, name: Optional[str] = None) -> Tensor:
    """Keep the same number of entries in every output row (Wanda's comparison group).

    Each output neuron keeps ``in - num_pruned(in, sparsity)`` inputs, so no neuron is wiped out.
    """
    _check_sparsity(sparsity)
    _require_2d(score, "per-row allocation", name)
    values = _prepare(score, name)
    in_features = values.shape[1]
    return _keep_top_along_last_dim(values, in_features - num_pruned(in_features, sparsity))


def per_matrix_mask(score: Tensor, sparsity: float, *, name: Optional[str] = None) -> Tensor:
    """Keep the best ``numel - num_pruned(numel, sparsity)`` entries of the whole matrix."""
    _check_sparsity(sparsity)
    values = _prepare(score, name)
    keep = values.numel() - num_pruned(values.numel(), sparsity)
    return _keep_top_along_last_dim(values.reshape(-1), keep).reshape(values.shape)


def nm_mask(score: Tensor, n: int, m: int, *, name: Optional[str] = None) -> Tensor:
    """Keep the ``n`` best of every ``m`` consecutive inputs of each row (N:M sparsity).

    Groups run along the input dimension: the layout of the published N:M results and of NVIDIA's 2:4 sparse
    tensor cores (compute capability >= 8.0). No mainstream serving engine of 2026 runs it, so the pattern is a
    quality constraint here, not a speed one (:func:`unipruning_cli.stages.export.card.speed_note`).
    """
    _check_nm(n, m)
    _require_2d(score, "N:M allocation", name)
    out_features, in_features = score.shape
    if in_features % m != 0:
        raise ValueError(
            f"pattern {n}:{m} cannot be applied{_layer_label(name)}: shape "
            f"{tuple(score.shape)} has in_features={in_features}, not divisible by {m}"
        )
    values = _prepare(score, name).reshape(out_features, in_features // m, m)
    return _keep_top_along_last_dim(values, n).reshape(out_features, in_features)


def check_nm_applicable(shapes: Mapping[str, tuple[int, int]], n: int, m: int) -> None:
    """Fail before any work if some layer cannot take the N:M pattern, naming all of them.

    Reporting every offending layer at once saves a user one failed run per layer.
    """
    _check_nm(n, m)
    bad = [(name, shape[-1]) for name, shape in shapes.items() if shape[-1] % m != 0]
    if bad:
        listed = ", ".join(f"{name} (in={in_features})" for name, in_features in bad)
        raise ValueError(
            f"pattern {n}:{m} cannot be applied: in_features not divisible by {m} "
            f"for layers: {listed}"
        )


def nm_masks(scores: Mapping[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """N:M masks for every layer, after checking that all layers can take the pattern."""
    for name, score in scores.items():
        _require_2d(score, "N:M allocation", name)
    check_nm_applicable({name: tuple(score.shape) for name, score in scores.items()}, n, m)
    return {name: nm_mask(score, n, m, name=name) for name, score in scores.items()}


# --------------------------------------------------------------------------- global allocation


def _order_key(values: Tensor) -> Tensor:
    """Int32 keys that order exactly like the fp32 ``values`` (NaN-free).

    Non-negative floats already order like their bit patterns read as integers; negative floats
    order in reverse, which flipping the 31 non-sign bits undoes. -0.0 is folded onto +0.0 first
    so that, as in a float comparison, the two zeros tie.
    """
    values = torch.where(values == 0, torch.zeros_like(values), values)
    bits = values.contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ _LOW_31_BITS)


def _count_at_least(scores: Mapping[str, Tensor], threshold: int) -> int:
    return sum(int(torch.count_nonzero(_order_key(s.detach().float()) >= threshold)) for s in scores.values())


def _kth_largest_key(scores: Mapping[str, Tensor], k: int) -> int:
    """The key of the k-th largest score over all layers (1-based), by bisection on keys.

    Only counts are ever needed, so memory stays at one layer's worth; the key range is 2**32
    wide, so about 32 passes over the layers find it exactly.
    """
    lows, highs = [], []
    for score in scores.values():
        if score.numel():
            key = _order_key(score.detach().float())
            lows.append(int(key.min()))
            highs.append(int(key.max()))
    lo, hi = min(lows), max(highs) + 1  # invariant: count(>= lo) >= k > count(>= hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count_at_least(scores, mid) >= k:
            lo = mid
        else:
            hi = mid
    return lo


def global_masks(scores: Mapping[str, Tensor], sparsity: float, cap: float = 1.0,
                 capped: list[str] | None = None) -> dict[str, Tensor]:
    """One threshold across all layers: keep the best entries of the whole model together.

    Exactly ``N - num_pruned(N, sparsity)`` entries are kept. Ties at the threshold are broken
    by layer order (the mapping's iteration order), then by flat index, as if all scores were
    concatenated and stably sorted, but without ever holding more than about one layer.

    ``cap`` < 1: no matrix loses more than ``num_pruned(n, cap)`` of its n entries. A matrix the threshold would
    prune past it is cut at the cap by its own scores (:func:`per_matrix_mask`), and the budget it leaves is
    shared by one threshold over the others, again until none is past the cap (water-filling): the total stays
    exact, and a matrix at the cap keeps its best entries, so cuts still nest across sparsities. Their names go
    to ``capped`` (in layer order). Raises ``ValueError`` when ``sparsity`` exceeds what the cap allows.
    """
    _check_sparsity(sparsity)
    for name, score in scores.items():
        _prepare(score, name)
    total = sum(score.numel() for score in scores.values())
    pruned = num_pruned(total, sparsity)
    if cap >= 1.0:
        return _global_keep(scores, total - pruned)
    room = sum(num_pruned(s.numel(), cap) for s in scores.values())
    if pruned > room:
        raise ValueError(f"sparsity {sparsity} over all matrices is more than a cap of {cap} per matrix allows "
                         f"({room} of {total} entries)")
    at_cap: dict[str, Tensor] = {}
    while True:
        rest = {n: s for n, s in scores.items() if n not in at_cap}
        left = pruned - sum(num_pruned(scores[n].numel(), cap) for n in at_cap)
        masks = _global_keep(rest, sum(s.numel() for s in rest.values()) - left)
        over = [n for n, m in masks.items() if m.numel() - int(torch.count_nonzero(m)) > num_pruned(m.numel(), cap)]
        if not over:
            break
        for n in over:
            at_cap[n] = per_matrix_mask(scores[n], cap, name=n)
    if capped is not None:
        capped.extend(n for n in scores if n in at_cap)
    return {n: at_cap[n] if n in at_cap else masks[n] for n in scores}


def _global_keep(scores: Mapping[str, Tensor], keep: int) -> dict[str, Tensor]:
    """The ``keep`` best entries over all of ``scores`` (see :func:`global_masks`)."""
    total = sum(score.numel() for score in scores.values())
    if keep == 0 or keep == total:
        return {
            name: torch.full(score.shape, keep > 0, dtype=torch.bool, device=score.device)
            for name, score in scores.items()
        }

    threshold = _kth_largest_key(scores, keep)
    quota = keep - _count_at_least(scores, threshold + 1)  # ties at the threshold still to keep
    masks: dict[str, Tensor] = {}
    for name, score in scores.items():
        key = _order_key(score.detach().float())
        mask = key > threshold
        ties = (key == threshold).reshape(-1)
        n_ties = int(torch.count_nonzero(ties))
        if n_ties <= quota:
            mask |= ties.reshape(key.shape)
            quota -= n_ties
        elif quota > 0:
            first_ties = ties & (torch.cumsum(ties, dim=0) <= quota)
            mask |= first_ties.reshape(key.shape)
            quota = 0
        masks[name] = mask
    return masks


# --------------------------------------------------------------------------- dispatch

_LOCAL_ALLOCATIONS: dict[str, Callable[..., Tensor]] = {
    "per_row": per_row_mask,
    "per_matrix": per_matrix_mask,
}
ALLOCATIONS: tuple[str, ...] = ("per_row", "per_matrix", "global")


def masks_for(
    scores: Mapping[str, Tensor], sparsity: float, allocation: str = "per_matrix", cap: float = 1.0
) -> dict[str, Tensor]:
    """Masks for every layer under the named sparsity allocation (how the budget is shared). ``cap``: the most a
    matrix may lose where the budget is shared across matrices (``global``); capped matrices are logged."""
    if allocation == "global":
        capped: list[str] = []
        masks = global_masks(scores, sparsity, cap, capped)
        if capped:
            log.warning("sparsity %.2f (global): %d matrices capped at %.2f of their weights "
                        "(pattern.max_matrix_sparsity): %s", sparsity, len(capped), cap, ", ".join(capped))
        return masks
    if allocation not in _LOCAL_ALLOCATIONS:
        raise ValueError(
            f"Unknown allocation '{allocation}'. Known: {', '.join(ALLOCATIONS)}"
        )
    local = _LOCAL_ALLOCATIONS[allocation]
    return {name: local(score, sparsity, name=name) for name, score in scores.items()}


# --------------------------------------------------------------------------- storage

def count_zeros(t: Tensor) -> int:
    """Exact zeros in ``t`` (any dtype, any device), as ``numel - count_nonzero``: ``(t == 0).sum()`` would go
    through an int64 copy of the bool tensor, 8 bytes per element (2 GiB for a 1B model's embedding)."""
    return t.numel() - int(torch.count_nonzero(t))


def mask_sparsity(mask: Tensor) -> float:
    """Fraction of pruned (False) entries; 0.0 for an empty mask, which prunes nothing."""
    if mask.numel() == 0:
        return 0.0
    return (mask.numel() - int(mask.count_nonzero())) / mask.numel()
