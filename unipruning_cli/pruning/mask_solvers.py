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

__all__ = ["MASK_SOLVERS", "solve_on_mask"]

MASK_SOLVERS = ("obs", "admm")


def solve_on_mask(how: str, weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
                  name: str | None = None, percdamp: float = 0.01, start: torch.Tensor | None = None) -> torch.Tensor:
    """The kept weights of ``weight`` ``[out, in]`` updated on ``keep`` (bool ``[out, in]``) by the solver ``how``
    (one of :data:`MASK_SOLVERS`), with ``hessian`` ``[in, in]`` = (2/T) Σ x xᵀ fp32, both damped by ``percdamp`` of its mean
    diagonal (SparseGPT's 1 % by default); ``start``: where ``admm``'s iterations begin (a nearby solve's result;
    ``obs`` has no start and ignores it). Returns ``weight``'s dtype, zero off the mask. Raises ``ValueError`` for an unknown ``how``, or from the
    solver (shapes, non-finite inputs, naming ``name``)."""
    if how == "obs":
        return obs_reconstruct(weight, hessian, keep, percdamp=percdamp, name=name)
    if how == "admm":
        return admm_reconstruct(weight, hessian, keep, percdamp=percdamp, name=name,
                                start=start).weight.to(weight.dtype)
    raise ValueError(f"solve_on_mask: unknown solver {how!r}; one of {MASK_SOLVERS}")
