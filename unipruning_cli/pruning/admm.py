"""The kept weights of a linear layer solved for a GIVEN mask: ALPS's operator splitting with the support fixed.

Meng et al. (2024), "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language Models",
Algorithm 1 (ADMM) and Section 3.3 (preconditioned conjugate gradients on the final support). For a layer with weight
``Ŵ`` ``[out, in]`` and calibration Hessian ``H = (2/T) Σ x xᵀ`` ``[in, in]``, the layer-wise objective is

    f(W) = tr((W - Ŵ) H (W - Ŵ)ᵀ),   subject to W = 0 off the mask M,

whose exact minimiser, row by row, is ``w_S = (H_SS)⁻¹ (H ŵ)_S`` on the row's kept columns S. SparseGPT's sweep
(:func:`.obs.obs_reconstruct`) reaches it only approximately: a pruned weight's error is pushed onto the kept weights
to its right, never to its left. ALPS splits ``W = D``:

    W ← (Ŵ H - V + ρ D)(H + ρ I)⁻¹        (one eigendecomposition of H serves every ρ)
    D ← M ⊙ (W + V / ρ)                    (the projection on the support: here the fixed mask)
    V ← V + ρ (W - D)

then polishes D by conjugate gradients on the support, preconditioned by diag H (all
rows at once, each row with its own step sizes). The ADMM phase converges from any start in few iterations where H is
badly conditioned; the conjugate-gradient phase then makes the result exact to ``tol``. On a fixed mask the second
phase alone gets there from the masked weights, in less time on the layers measured, so ADMM is off by default
(``admm_steps=0``) and there for badly conditioned layers. Two things differ from ALPS,
which also chooses the support: the projection is onto the given mask (UniPruning's Γ, or any method, chose it), and ρ
may stay fixed (``rho_growth=1``, the default): ALPS raises ρ so that its support settles, but on a fixed support a
growing ρ only freezes W = D before the optimum (tests/test_admm.py), while a fixed ρ converges to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .obs import damped_hessian

__all__ = ["AdmmResult", "admm_reconstruct", "masked_least_squares"]


@dataclass(frozen=True)
class AdmmResult:
    """``weight``: fp32 ``[out, in]``, zero off the mask; ``admm_steps`` and ``cg_steps`` run; ``residual``: the
    largest row's relative gradient norm on the support at the end (0 = exact)."""

    weight: torch.Tensor
    admm_steps: int
    cg_steps: int
    residual: float


def masked_least_squares(target: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, start: torch.Tensor,
                         max_steps: int = 200, tol: float = 1e-6) -> tuple[torch.Tensor, int, float]:
    """Conjugate gradients for ``min_W tr((W - target) H (W - target)ᵀ)`` with ``W`` zero off ``keep``, every row at
    once, preconditioned by diag H (ALPS Section 3.3). ``target``, ``start`` fp32 ``[out, in]``; ``h`` fp32 ``[in, in]``
    positive definite; ``keep`` bool ``[out, in]``. Stops when every row's gradient on its support is below ``tol``
    times its gradient at ``target ⊙ keep``, or after ``max_steps``. Returns (W, steps, largest relative residual)."""
    mask = keep.to(target.dtype)
    x = start * mask
    b = (target @ h) * mask
    r = b - (x @ h) * mask
    scale = ((target * mask) @ h * mask - b).norm(dim=1).clamp_min(1e-30)
    inv_diag = 1.0 / h.diagonal()
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=1)
    steps = 0
    rel = (r.norm(dim=1) / scale).max().item()
    while steps < max_steps and rel > tol:
        ap = (p @ h) * mask
        pap = (p * ap).sum(dim=1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x.add_(alpha[:, None] * p)
        r.sub_(alpha[:, None] * ap)
        z = r * inv_diag
        rz_new = (r * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
        steps += 1
        rel = (r.norm(dim=1) / scale).max().item()
    return x, steps, rel


def admm_reconstruct(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, *, percdamp: float = 0.001,
                     admm_steps: int = 0, rho: float = 0.1, rho_growth: float = 1.0, cg_steps: int = 200,
                     tol: float = 1e-3, name: str | None = None) -> AdmmResult:
    """ALPS on a fixed mask (module docstring): ``admm_steps`` ADMM iterations with ρ starting at ``rho`` times the
    mean of diag H, multiplied by ``rho_growth`` after each, then conjugate gradients on the mask to ``tol``
    (at most ``cg_steps``). The defaults (no ADMM step, ``tol=1e-3``) were chosen on SmolLM2's calibration data:
    from the masked weights the conjugate gradients alone reach the same layer error (to 4 digits, every layer of
    a block) sooner than after 10 or 30 ADMM steps, and a tighter ``tol`` changes no digit of it (docs/methods.md).

    ``weight`` ``[out, in]`` (any float dtype), ``hessian`` ``[in, in]`` (H = (2/T) Σ x xᵀ, fp32), ``keep`` bool
    ``[out, in]``. H is damped by ``percdamp`` of its mean diagonal, as :func:`.obs.obs_reconstruct` damps it (the two
    minimise the same objective at the same ``percdamp``); the default, 0.1 %, is this solver's
    :data:`.mask_solvers.DEFAULT_PERCDAMP` (which says how it was chosen). The kept weights of input channels that never fired stay as they were. All
    arithmetic in fp32 on ``weight``'s device; the inputs are not modified.

    Raises ``ValueError`` (naming ``name``, the layer) for shapes that do not match, a non-finite weight or Hessian,
    or ``admm_steps``/``cg_steps`` below 0."""
    where = f" of {name}" if name else ""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1],) * 2 or keep.shape != weight.shape \
            or keep.dtype != torch.bool:
        raise ValueError(f"admm_reconstruct{where}: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}, "
                         f"keep {keep.dtype} {tuple(keep.shape)}: need [out, in], [in, in] and bool [out, in]")
    if admm_steps < 0 or cg_steps < 0 or rho <= 0 or rho_growth < 1:
        raise ValueError(f"admm_reconstruct{where}: admm_steps={admm_steps}, cg_steps={cg_steps} must be >= 0, "
                         f"rho={rho} > 0, rho_growth={rho_growth} >= 1")
    if not (torch.isfinite(weight).all() and torch.isfinite(hessian).all()):
        raise ValueError(f"admm_reconstruct{where}: the weight or the Hessian holds NaN/inf; no solve repairs them")
    target = weight.detach().float()
    h, dead, _ = damped_hessian(hessian.to(target.device), percdamp)
    mask = keep.to(target.device)
    d = target * mask
    if admm_steps:
        evals, evecs = torch.linalg.eigh(h)
        evals = evals.clamp_min(0)
        wh = target @ h
        v = torch.zeros_like(target)
        r = rho * h.diagonal().mean().item()
        for _ in range(admm_steps):
            w = (((wh - v + r * d) @ evecs) / (evals + r)) @ evecs.t()
            d = (w + v / r) * mask
            v.add_(r * (w - d))
            r *= rho_growth
    x, steps, rel = masked_least_squares(target, h, mask, d, max_steps=cg_steps, tol=tol)
    x[:, dead] = target[:, dead]
    x.mul_(mask)
    return AdmmResult(x, admm_steps, steps, rel)
