"""``reconstruct_percdamp=auto``: the damping of a solve on a given mask chosen per layer on calibration samples the
solve did not see.

A solve on a fixed mask (:mod:`.mask_solvers`) minimises ``tr((W - Ŵ)(H + λI)(W - Ŵ)ᵀ)`` with
``λ = percdamp · mean(diag H)``: a ridge that pulls the kept weights toward the original ones. SparseGPT's 1 % keeps its
Cholesky sweep stable (Frantar & Alistarh 2023, Section 3.4); for the exact solve it is a bias-variance choice, and the
λ that generalises depends on the layer, the model and how many calibration tokens there are. So each layer's
calibration forwards are split, every :data:`HOLDOUT_EVERY`-th one held out (``xtx_holdout`` of
:class:`..data.stats.ActivationStats`): each candidate of :data:`DAMPING_CANDIDATES` is solved on the rest and scored
by its output error on the held-out part, ``tr((W - Ŵ) H_val (W - Ŵ)ᵀ)``, against the layer's own output (as the
solve's objective); the best is then solved on all the samples. Extra cost per layer: one solve per candidate, each
started from the previous one's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.errors import UserError
from .swaps import output_error

__all__ = ["AUTO", "DAMPING_CANDIDATES", "HOLDOUT_EVERY", "DampingChoice", "choose_damping", "validate_percdamp"]

#: The config value that asks for the choice.
AUTO = "auto"
#: The dampings tried, largest first (SparseGPT's 1 % first: a tie keeps it).
DAMPING_CANDIDATES = (1e-2, 1e-3, 1e-4)
#: Every k-th calibration forward of a layer is held out for the choice (16 of 128 samples).
HOLDOUT_EVERY = 8

#: ``solve(hessian, percdamp, start)``: the layer's weight solved on its mask with ``hessian`` ``[in, in]``
#: (= (2/T) Σ x xᵀ over the samples it is given) damped by ``percdamp``, from ``start`` (``[out, in]`` or None: the
#: masked weight) where the solver takes a start.
Solve = Callable[[torch.Tensor, float, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class DampingChoice:
    """``percdamp``: the damping picked; ``errors``: candidate -> the held-out output error of its solve over that of
    the masked weight ``Ŵ ⊙ keep`` (below 1: the solve helped on samples it did not see), None where the layer had no
    held-out tokens and ``percdamp`` is the fallback; ``start``: the picked candidate's solve (fp32 ``[out, in]``),
    a start for the final solve on all the samples (None with the fallback)."""

    percdamp: float
    errors: dict[float, float] | None
    start: torch.Tensor | None = None


def choose_damping(weight: torch.Tensor, xtx: torch.Tensor, count: int, xtx_holdout: torch.Tensor | None,
                   holdout_count: int, keep: torch.Tensor, solve: Solve,
                   candidates: tuple[float, ...] | None = None, fallback: float = 0.01) -> DampingChoice:
    """The damping of ``candidates`` whose solve on the samples not held out gives ``weight`` (``Ŵ`` ``[out, in]``)
    the lowest output error on the held-out ones (module docstring; ``candidates``: :data:`DAMPING_CANDIDATES` where
    None). ``xtx``: Σ x xᵀ over all ``count`` calibration
    tokens, fp32 ``[in, in]``; ``xtx_holdout``: its part over the ``holdout_count`` held-out tokens (None or no tokens,
    or no token left to fit on: ``fallback`` is returned, with ``errors=None``); ``keep``: bool ``[out, in]``.
    Ties keep the earlier candidate. Raises ``ValueError`` for no candidate or one not above 0, and whatever
    ``solve`` raises."""
    candidates = DAMPING_CANDIDATES if candidates is None else candidates
    if not candidates or any(not 0 < c < float("inf") for c in candidates):
        raise ValueError(f"choose_damping: candidates {candidates}: need at least one damping > 0")
    if xtx_holdout is None or holdout_count <= 0 or count - holdout_count <= 0:
        return DampingChoice(fallback, None)
    w = weight.detach().float()
    val = xtx_holdout.float().to(w.device)
    fit = (2.0 / (count - holdout_count)) * (xtx.float().to(w.device) - val)
    base = output_error(w * keep - w, val)
    errors: dict[float, float] = {}
    best, start = None, None
    for damp in candidates:
        start = solve(fit, damp, start).float()
        errors[damp] = output_error(start - w, val) / base if base > 0 else output_error(start - w, val)
        if best is None or errors[damp] < errors[best[0]]:
            best = (damp, start)
    return DampingChoice(best[0], errors, best[1])


def validate_percdamp(value, layer_target: str = "pruned") -> None:
    """Return if ``value`` (the config's ``reconstruct_percdamp``) is a fraction > 0 of H's mean diagonal, or ``"auto"``
    with ``layer_target=pruned``; else raise :class:`..core.errors.UserError` saying what is expected."""
    if value == AUTO:
        if layer_target == "dense":
            raise UserError("reconstruct_percdamp=auto validates each layer against its own output on held-out "
                            "calibration samples; layer_target=dense fits another target: give the damping a number "
                            "(e.g. reconstruct_percdamp=0.01)")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"reconstruct_percdamp={value!r}: expected a fraction > 0 of H's mean diagonal (SparseGPT's "
                        f"0.01), or {AUTO!r} (chosen per layer on held-out calibration samples)")
