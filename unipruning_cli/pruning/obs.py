"""SparseGPT: one-shot pruning of a linear layer with second-order weight compensation.

Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". For a layer y = W x and calibration inputs X, the layer-wise objective
‖W X − Ŵ X‖² has the Hessian H = 2 X Xᵀ, shared by every output row. Pruning a weight and
letting the not-yet-processed weights of its row absorb the error is the Optimal Brain Surgeon
(OBS) update. Processing the input columns strictly left to right makes the set of still-free
columns the same for every row, so one upper Cholesky factor U of H⁻¹ gives every sequential
inverse at once: row j of U, scaled by 1/U_jj, is exactly the OBS update direction with H
restricted to columns j.. (and U_jj² = [(H_{j:,j:})⁻¹]_jj). This replaces the d_row re-inversions
of naive OBS by one factorisation, which is what makes the method feasible for LLM layers.

Updates are applied lazily: inside a block of ``blocksize`` columns, row updates touch only the
block; the block's accumulated errors are pushed into the later columns with one matrix product.
This is mathematically identical to the column-by-column update but memory-bound work becomes a
GEMM.

The Hessian convention used by callers is H = (2 / ntokens) Σ x xᵀ (see ``accumulate_hessian``);
the overall scale does not change the result because dampening is relative to mean(diag H).
"""

from __future__ import annotations

import math

import torch

from ..core.errors import UserError

__all__ = ["accumulate_hessian", "damped_hessian", "obs_reconstruct", "sparsegpt_prune"]


# --------------------------------------------------------------------------------------------
# Hessian accumulation
# --------------------------------------------------------------------------------------------


def accumulate_hessian(h: torch.Tensor | None, x: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian H = (2/T) Σ x xᵀ.

    A running average (rather than a raw sum) keeps the entries O(‖x‖²) however many calibration
    tokens are seen, so fp32 does not lose precision or overflow on long calibration runs:
    H ← H·count/(count+t) + (2/(count+t))·XᵀX, where X is ``x`` flattened to [t, in].

    Args:
        h: the Hessian so far ([in, in], fp32), or None before the first batch.
        x: inputs of shape [..., in]; any leading dims (batch, sequence) are flattened to tokens.
        count: number of tokens already folded into ``h`` (0 when ``h`` is None).

    Returns:
        (new H in fp32 on x's device, new token count). ``h`` is not modified in place.
    """
    if x.dim() < 1:
        raise ValueError("accumulate_hessian: x must have at least one dimension [..., in_features]")
    if count < 0:
        raise ValueError(f"accumulate_hessian: count must be >= 0, got {count}")
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features).float()
    t = x2d.shape[0]
    if h is None:
        if count != 0:
            raise ValueError(f"accumulate_hessian: h is None but count={count}; start with count=0")
        h = torch.zeros(in_features, in_features, dtype=torch.float32, device=x2d.device)
    elif h.shape != (in_features, in_features):
        raise ValueError(
            f"accumulate_hessian: h has shape {tuple(h.shape)} but x has in_features={in_features}"
        )
    if t == 0:
        return h.float(), count
    total = count + t
    # Scaling x by sqrt(2/total) before the product avoids a second [in, in] temporary.
    x_scaled = x2d * math.sqrt(2.0 / total)
    new_h = h.to(device=x2d.device, dtype=torch.float32) * (count / total)
    new_h.addmm_(x_scaled.t(), x_scaled)
    return new_h, total


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    blocksize: int,
    percdamp: float,
    name: str | None = None,
) -> None:
    """Reject bad arguments up front, with messages that name the offending values (and ``name``, the layer)."""
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"sparsegpt: weight must be floating point, got {weight.dtype}")
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"sparsegpt: hessian shape {tuple(hessian.shape)} does not match "
            f"in_features={in_features} (expected ({in_features}, {in_features}))"
        )
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsegpt: sparsity must satisfy 0 <= sparsity < 1, got {sparsity}")
    if n != 0 or m != 0:
        if not (0 < n < m):
            raise ValueError(
                f"sparsegpt: N:M sparsity needs 0 < n < m, got n={n}, m={m} "
                f"(in_features={in_features}); use n=m=0 for unstructured sparsity"
            )
        if in_features % m != 0:
            raise ValueError(
                f"sparsegpt: N:M sparsity needs in_features divisible by m, got n={n}, m={m}, "
                f"in_features={in_features}"
            )
    if blocksize < 1:
        raise ValueError(f"sparsegpt: blocksize must be >= 1, got {blocksize}")
    if not (percdamp >= 0.0 and math.isfinite(percdamp)):
        raise ValueError(f"sparsegpt: percdamp must be a finite number >= 0, got {percdamp}")
    layer = f" of {name}" if name else ""
    dtype = str(weight.dtype).removeprefix("torch.")
    if not torch.isfinite(weight).all():
        raise UserError(f"sparsegpt: weight{layer} contains non-finite values (nan/inf) in {dtype}; check the "
                        "model's files: no solve can repair them")
    if not torch.isfinite(hessian).all():
        # H is summed in float32 from the layer's inputs: a NaN/inf means those inputs overflowed the model's dtype
        # (float16 stops at 65504), or the float32 sum over the tokens did; dampening cannot repair either
        fix = {torch.float16: "model.dtype=bfloat16 or float32, ", torch.float32: ""}.get(weight.dtype,
                                                                                        "model.dtype=float32, ")
        raise UserError(f"sparsegpt: hessian{layer} contains non-finite values (nan/inf): the layer's inputs "
                        f"overflowed {dtype} (the model's dtype; H itself is summed in float32) at this layer or "
                        f"before it. Try {fix}fewer calibration tokens (calibration.nsamples, calibration.seqlen), "
                        "or check the model for NaN/inf in its weights; percdamp only dampens a finite H")


# --------------------------------------------------------------------------------------------
# Algorithm pieces
# --------------------------------------------------------------------------------------------


def _prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make H safely invertible; return fp32 copies (W, damped H).

    An input channel that never fired (H_jj == 0) makes H singular. Its weights cannot affect
    the calibration outputs, so they are zeroed and the channel gets H_jj = 1, which decouples it.
    Dampening by a fraction of the mean diagonal then regularises the remaining near-singular
    directions (the paper's λ, relative so it is independent of H's scale).
    """
    w = weight.detach().to(dtype=torch.float32).clone()
    h, dead, _ = damped_hessian(hessian.to(w.device), percdamp)
    w[:, dead] = 0.0
    return w, h


def damped_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """An fp32 copy of ``hessian`` ``[in, in]`` as every solve here uses it: a channel that never fired
    (``H_jj == 0``) decoupled with ``H_jj = 1``, then ``λ = percdamp · mean(diag H)`` added to the diagonal (SparseGPT's
    dampening, relative so it does not depend on H's scale). Returns (damped H, bool ``[in]`` dead channels, λ)."""
    h = hessian.detach().float().clone()
    diag = h.diagonal()  # a view: writes go into h
    dead = diag == 0
    diag[dead] = 1.0
    damp = percdamp * diag.mean()
    diag += damp
    return h, dead, float(damp)


def _inverse_hessian_factor(h: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U).

    Row j of U / U_jj is the OBS compensation direction for column j once columns < j are
    fixed, and U_jj² is the matching diagonal of that restricted inverse (see module docstring).
    Raises ``ValueError`` (naming ``name``, the layer) when H is not positive definite.
    """
    try:
        lower = torch.linalg.cholesky(h)
        h_inv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(h_inv, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"sparsegpt: hessian{f' of {name}' if name else ''} is not positive definite even after dampening; "
            "increase percdamp or use more calibration data"
        ) from exc


def _unstructured_block_prune_mask(w_block: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned-mask (True = prune) for one block: the ``int(numel * sparsity)`` lowest OBS scores.

    The score w² / U_jj² equals the OBS saliency w² / [H_F⁻¹]_jj (U_jj² = [H_F⁻¹]_jj for the
    free columns F = j..), i.e. the increase in layer error from pruning w alone with optimal
    compensation. A stable sort over the flattened block (ties go to the lower flat index,
    i.e. row-major order) makes the count exact rather than "everything <= threshold".
    """
    scores = w_block.pow(2) / hinv_diag.pow(2).unsqueeze(0)
    k = int(scores.numel() * sparsity)
    prune = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.flatten(), stable=True).indices
        prune[order[:k]] = True
    return prune.view_as(scores)


def _nm_group_prune_mask(w_group: torch.Tensor, hinv_diag: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Pruned-mask for one group of m consecutive columns: the ``n_prune`` lowest scores per row.

    Chosen only when the group is reached, i.e. on weights already updated by the errors of all
    earlier columns — the paper's adaptive N:M selection.
    """
    scores = w_group.pow(2) / hinv_diag.pow(2).unsqueeze(0)
    order = torch.sort(scores, dim=1, stable=True).indices
    prune = torch.zeros_like(scores, dtype=torch.bool)
    prune.scatter_(1, order[:, :n_prune], True)
    return prune


def _effective_blocksize(blocksize: int, m: int, in_features: int) -> int:
    """Block width used by the sweep.

    For N:M the blocks must not split a group of m columns (the group's mask is chosen inside a
    block), so the width is rounded down to a multiple of m (at least m). Any width gives the
    same result in exact arithmetic; it only trades memory for GEMM size.
    """
    bs = min(blocksize, in_features)
    if m > 0:
        bs = max(m, bs - bs % m)
    return bs


def _prune_block(
    w_block: torch.Tensor,
    hinv_block: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the column-by-column OBS sweep inside one block; ``w_block`` is updated in place. ``fixed``: the
    block's pruned mask, given (reconstruction on a fixed mask), not chosen.

    Returns (pruned/compensated block, pruned mask, scaled errors). The errors
    err_j = (w_j − q_j) / U_jj are what the caller propagates to the columns after the block.
    """
    rows, width = w_block.shape
    hinv_diag = hinv_block.diagonal()
    if fixed is not None:
        prune, m = fixed, 0
    elif m > 0:
        prune = torch.zeros_like(w_block, dtype=torch.bool)
    else:
        prune = _unstructured_block_prune_mask(w_block, hinv_diag, sparsity)
    q_block = torch.empty_like(w_block)
    err_block = torch.empty_like(w_block)
    for j in range(width):
        if m > 0 and j % m == 0:
            prune[:, j : j + m] = _nm_group_prune_mask(w_block[:, j : j + m], hinv_diag[j : j + m], m - n)
        w = w_block[:, j]
        q = w.masked_fill(prune[:, j], 0.0)
        err = (w - q) / hinv_diag[j]
        # OBS compensation of the still-free columns of this block (column j itself becomes q).
        w_block[:, j:].sub_(torch.outer(err, hinv_block[j, j:]))
        q_block[:, j] = q
        err_block[:, j] = err
    return q_block, prune, err_block


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a linear layer's weight with SparseGPT; returns (new_weight, keep_mask).

    Args:
        weight: [out, in] as stored by ``nn.Linear``; any float dtype.
        hessian: [in, in], H = (2/ntokens) Σ x xᵀ over calibration tokens (``accumulate_hessian``).
        sparsity: unstructured sparsity in [0, 1); ignored in N:M mode.
        n, m: N:M mode when both are non-zero: keep n of every m consecutive input columns
            (groups aligned at column 0) in every row, i.e. prune m − n. Requires 0 < n < m and
            in % m == 0. n = m = 0 selects unstructured mode.
        blocksize: columns per lazy-update block. In N:M mode it is rounded down to a multiple
            of m (at least m) so no group straddles two blocks.
        percdamp: dampening λ = percdamp · mean(diag H), added to diag H.
        name: the layer's name, for the error messages.

    Mask rule (unstructured): the mask is chosen per block of columns, as in the paper. For a
    block of ``rows × width`` weights, exactly ``int(rows * width * sparsity)`` weights with the
    lowest OBS score w² / U_jj² (scores of the weights as updated by all earlier blocks) are
    pruned; ties are broken by a stable sort in row-major order. Hence the matrix total is
    Σ_blocks int(block_numel · sparsity) — exact up to that per-block rounding — while per-row
    counts vary (rows with more salient weights keep more).

    Dead input channels (H_jj == 0) have their weights set to 0 regardless of the mask, since
    they cannot affect the calibration outputs; the mask still reports the score-based choice.

    All arithmetic is fp32 on weight's device. The inputs are not modified. The returned weight
    has weight's dtype and is exactly zero wherever ``keep_mask`` is False; ``keep_mask`` is bool.

    Raises:
        ValueError: bad shapes, sparsity outside [0, 1), invalid n/m, or a Hessian that stays non positive
            definite after dampening. Non-finite inputs raise its subclass :class:`UserError`, naming ``name``,
            the weight's dtype and what to do.
    """
    n, m = int(n), int(m)
    _validate(weight, hessian, sparsity, n, m, blocksize, percdamp, name)
    w, h = _prepare_hessian(weight, hessian, percdamp)
    hinv = _inverse_hessian_factor(h, name)
    del h

    in_features = w.shape[1]
    bs = _effective_blocksize(blocksize, m, in_features)
    prune = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, in_features, bs):
        end = min(start + bs, in_features)
        q_block, prune_block, err_block = _prune_block(
            w[:, start:end].clone(), hinv[start:end, start:end], sparsity, n, m
        )
        w[:, start:end] = q_block
        prune[:, start:end] = prune_block
        # Lazy batch update: the block's OBS errors reach all later columns in one GEMM.
        if end < in_features:
            w[:, end:].sub_(err_block @ hinv[start:end, end:])

    keep = ~prune
    w.masked_fill_(prune, 0.0)  # already zero; guards against any rounding on the way back
    return w.to(weight.dtype), keep


def obs_reconstruct(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, blocksize: int = 128,
                    percdamp: float = 0.01, *, name: str | None = None) -> torch.Tensor:
    """The kept weights of a linear layer updated for a GIVEN mask: SparseGPT's column-by-column OBS sweep (module
    docstring) with the mask fixed instead of chosen, so the error of each pruned weight is absorbed by the kept
    weights of its row to the right (the "preserve the sparsity mask" update of llm-compressor's SparseGPT).

    ``weight`` ``[out, in]`` (any float dtype), ``hessian`` ``[in, in]`` (H = (2/T) Σ x xᵀ), ``keep`` bool
    ``[out, in]``. Returns the new weight in ``weight``'s dtype, zero exactly where ``keep`` is False; with an
    all-ones mask, the weight unchanged (every error is zero); the kept weights of input channels that never fired
    unchanged. Raises ``ValueError`` as :func:`sparsegpt_prune` does (naming ``name``, the layer), or for a mask
    of another shape."""
    if keep.shape != weight.shape or keep.dtype != torch.bool:
        raise ValueError(f"obs_reconstruct: keep must be bool {tuple(weight.shape)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    _validate(weight, hessian, 0.0, 0, 0, blocksize, percdamp, name)
    dead = hessian.diagonal() == 0
    w, h = _prepare_hessian(weight, hessian, percdamp)
    hinv = _inverse_hessian_factor(h, name)
    del h
    prune = ~keep.to(w.device)
    in_features = w.shape[1]
    for start in range(0, in_features, blocksize):
        end = min(start + blocksize, in_features)
        q_block, _, err_block = _prune_block(w[:, start:end].clone(), hinv[start:end, start:end], 0.0, 0, 0,
                                             fixed=prune[:, start:end])
        w[:, start:end] = q_block
        if end < in_features:
            w[:, end:].sub_(err_block @ hinv[start:end, end:])
    # a channel that never fired cannot change the calibration outputs: its kept weights stay as they were
    # (_prepare_hessian zeroed them, which a fixed mask must not do)
    w[:, dead.to(w.device)] = weight.detach().float()[:, dead.to(weight.device)].to(w.device)
    w.masked_fill_(prune, 0.0)
    return w.to(weight.dtype)


def dense_target_weight(weight: torch.Tensor, xtx: torch.Tensor, cross: torch.Tensor,
                        percdamp: float = 0.01) -> torch.Tensor:
    """The dense weight moved to where the pruned model's inputs best reproduce the dense layer's output:
    ``W* = argmin_V ‖W X_d - V X_m‖² + λ‖V - W‖² = W ((H + λI)⁻¹ (C + λI))ᵀ`` with ``H = X_mᵀ X_m`` (``xtx``),
    ``C = X_mᵀ X_d`` (``cross``), both ``[in, in]`` fp32 over the calibration tokens (:mod:`..data.dense_stream`), and
    λ ``percdamp`` of H's mean diagonal, as :func:`obs_reconstruct` damps H: the same pull toward W (with equal inputs
    W* = W exactly; damping H alone would shrink W toward 0 along every direction of little calibration variance).
    Since that objective is ``(V - W*)(H + λI)(V - W*)ᵀ + const``, the update of ``W*`` on a mask (OBS's or the exact
    one, with H damped the same) lowers the error against the dense output (``layer_target=dense``). Input channels that never fired in the pruned model keep W's weights. ``weight``
    ``[out, in]``; returns fp32 ``[out, in]``. Raises ``ValueError`` for shapes that do not match."""
    if xtx.shape != cross.shape or xtx.shape != (weight.shape[1],) * 2:
        raise ValueError(f"dense_target_weight: weight {tuple(weight.shape)}, xtx {tuple(xtx.shape)}, cross "
                         f"{tuple(cross.shape)}: both must be [in, in]")
    w = weight.detach().float()
    h, dead, damp = damped_hessian(xtx.to(w.device), percdamp)
    c = cross.to(w.device).float().clone()
    c.diagonal().add_(damp)  # the damping pulls V toward W (λ‖V - W‖²): W* = W where X_m = X_d, as OBS's damping does
    moved = w @ torch.linalg.solve(h, c).t()
    moved[:, dead] = w[:, dead]
    return moved
