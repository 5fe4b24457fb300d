"""Ω and its proximal operator: the sparsity regulariser of the saliency Γ.

With Ω = ℓ1 the prox is the element-wise soft-threshold Γ = sign(V)·max(|V| − τ, 0). The reference
code does not use λ as τ: it re-chooses τ every step as the λ-quantile of |V| in each matrix
(``threshold_mode=quantile``), so λ ∈ {0, 1e-3, 1e-2} zeroes a fixed fraction of each matrix.
``threshold_mode=absolute`` uses τ = λ, the textbook prox of λ‖·‖₁.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.registry import Registry

#: Regularisers by name (``regularizer.name``). Each is a frozen dataclass built as ``cls(lam=..., threshold_mode=...)``
#: whose call ``prox(v, generator)`` returns prox_{λΩ}(V) as a new tensor of ``v``'s shape and dtype.
REGULARIZERS: Registry[type] = Registry("regularizer")

#: Above this many entries the quantile is estimated on a random sample (the reference uses 10⁵
#: of 10⁶+ entries; an index draw with replacement avoids its randperm over the whole matrix).
EXACT_QUANTILE_MAX = 1_000_000
QUANTILE_SAMPLE = 100_000


def soft_threshold(v: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    return v.sign() * (v.abs() - tau).clamp_min(0)


def _order_stats(flat: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lo-th and hi-th smallest values (0-based). λ is small in practice (1e-3, 1e-2), and a
    partial ``topk`` of the few smallest entries is ~10x cheaper than ``kthvalue`` there
    (scripts/bench_search.py)."""
    if hi < flat.numel() // 8:
        smallest = flat.topk(hi + 1, largest=False, sorted=True).values
        return smallest[lo], smallest[hi]
    a = flat.kthvalue(lo + 1).values
    return a, (a if hi == lo else flat.kthvalue(hi + 1).values)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a flat tensor with linear interpolation (torch.quantile's rule).

    ``torch.quantile`` refuses inputs above 2²⁴ elements and sorts; order statistics do neither.
    """
    flat = values.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    a, b = _order_stats(flat, lo, hi)
    return a + (b - a) * (pos - lo)


@REGULARIZERS.register("l1")
@dataclass(frozen=True)
class L1Prox:
    """prox_{λ‖·‖₁} with λ as a quantile level (reference) or as an absolute threshold."""

    lam: float = 1e-3
    threshold_mode: str = "quantile"

    def threshold(self, v: torch.Tensor, generator: torch.Generator | None = None, magnitudes=None) -> torch.Tensor:
        """τ for ``v``: λ itself (``absolute``), or the λ-quantile of |V| over the whole matrix (``quantile``),
        estimated on ``QUANTILE_SAMPLE`` positions drawn from ``generator`` above ``EXACT_QUANTILE_MAX`` entries.
        ``magnitudes`` (``.numel`` and ``.at(positions | None)`` giving |V| there, flat) reads a matrix whose rows
        are spread over ranks (:mod:`.shards`); by default ``v`` is the whole matrix."""
        if self.threshold_mode == "absolute":
            return torch.tensor(self.lam, dtype=v.dtype, device=v.device)
        if magnitudes is None:
            magnitudes = _Local(v.detach().abs().reshape(-1))
        idx = None
        if magnitudes.numel > EXACT_QUANTILE_MAX:
            idx = torch.randint(0, magnitudes.numel, (QUANTILE_SAMPLE,), generator=generator,
                                device=generator.device if generator is not None else v.device)
        return quantile(magnitudes.at(idx), self.lam)

    def __call__(self, v: torch.Tensor, generator: torch.Generator | None = None, magnitudes=None) -> torch.Tensor:
        if self.lam == 0:
            return v.clone()
        return soft_threshold(v, self.threshold(v, generator, magnitudes).to(v.device))


class _Local:
    """|V| of a matrix held whole, read at flat positions (all: None)."""

    def __init__(self, flat_abs: torch.Tensor) -> None:
        self.flat, self.numel = flat_abs, flat_abs.numel()

    def at(self, positions: torch.Tensor | None) -> torch.Tensor:
        return self.flat if positions is None else self.flat[positions.to(self.flat.device)]


def build_regularizer(name: str, lam: float, threshold_mode: str) -> L1Prox:
    """The registered regulariser ``name`` at ``lam``. Raises ``UnknownNameError`` (a ``ValueError``) for an
    unknown name, with the close and the known names."""
    return REGULARIZERS.get(name)(lam=lam, threshold_mode=threshold_mode)
