"""The reconstructions that update the kept weights of a GIVEN mask, by name (``reconstruct=obs|admm``): both lower
the layer's output error ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` on the calibration inputs with the mask fixed, whichever method
cut it. ``obs``: SparseGPT's column sweep (:func:`.obs.obs_reconstruct`, approximate: a pruned weight's error moves
only to the kept weights on its right); ``admm``: ALPS's splitting and conjugate gradients
(:func:`.admm.admm_reconstruct`, the exact minimiser on the mask, to a tolerance).
"""

from __future__ import annotations

import torch

from .admm import admm_reconstruct
from .obs import obs_reconstruct

__all__ = ["DEFAULT_PERCDAMP", "MASK_SOLVERS", "percdamp_of", "solve_on_mask"]

#: Each solver's damping of H, a fraction of its mean diagonal, where a run gives none (``reconstruct_percdamp: null``).
#: ``obs``: SparseGPT's 1 %, which keeps its Cholesky factors stable. ``admm``: 0.1 %, chosen on SmolLM2's held-out
#: calibration windows (the calibration corpus, seed + 1; never the evaluation corpus): of 10 %, 1 %, 0.1 % on Γ's
#: 2:4 cut and 1 %, 0.1 %, 0.01 % on its refined 2:4 cut, 0.1 % gave the lowest held-out loss both times
#: (docs/methods.md, "The exact solve on a given mask").
DEFAULT_PERCDAMP = {"obs": 0.01, "admm": 0.001}
MASK_SOLVERS = tuple(DEFAULT_PERCDAMP)  # one list of the solvers: a new one comes with its damping


def percdamp_of(how: str, percdamp: float | None) -> float:
    """``percdamp`` where given, else the solver ``how``'s :data:`DEFAULT_PERCDAMP`; ``ValueError`` for an unknown
    ``how``."""
    if how not in DEFAULT_PERCDAMP:
        raise ValueError(f"unknown solver {how!r} for the update on a mask: one of {MASK_SOLVERS}")
    return DEFAULT_PERCDAMP[how] if percdamp is None else float(percdamp)


def solve_on_mask(how: str, weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
                  name: str | None = None, percdamp: float | None = None) -> torch.Tensor:
    """The kept weights of ``weight`` ``[out, in]`` updated on ``keep`` (bool ``[out, in]``) by the solver ``how``
    (one of :data:`MASK_SOLVERS`), with ``hessian`` ``[in, in]`` = (2/T) Σ x xᵀ fp32, damped by ``percdamp`` of its mean
    diagonal (None: the solver's :data:`DEFAULT_PERCDAMP`); returns ``weight``'s dtype, zero off the mask. Raises ``ValueError`` for an unknown ``how``, or from the
    solver (shapes, non-finite inputs, naming ``name``)."""
    percdamp = percdamp_of(how, percdamp)
    if how == "obs":
        return obs_reconstruct(weight, hessian, keep, percdamp=percdamp, name=name)
    return admm_reconstruct(weight, hessian, keep, percdamp=percdamp, name=name).weight.to(weight.dtype)
