"""Tests for the SparseGPT baseline.

The central check compares against a deliberately naive Optimal Brain Surgeon sweep that
re-inverts the Hessian of the remaining columns in float64 at every step: the Cholesky/lazy-batch
formulation must be mathematically identical to it for the same mask.
"""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.baselines.sparsegpt import accumulate_hessian, sparsegpt_prune


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _correlated_inputs(tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Calibration-like inputs whose features are correlated (so the Hessian is not diagonal)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, in_features, generator=g)
    mix = torch.eye(in_features) + 0.6 * torch.randn(in_features, in_features, generator=g)
    return z @ mix


def _problem(out: int, in_features: int, tokens: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, hessian, inputs) for a small random layer."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = _correlated_inputs(tokens, in_features, seed)
    weight = torch.randn(out, in_features, generator=g)
    hessian, _ = accumulate_hessian(None, x, 0)
    return weight, hessian, x


def _naive_obs(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Row-by-row, column-by-column OBS with an explicit float64 inverse at every step.

    At column j the free columns are F = j..; pruning w_j applies
    δ_F = −(w_j / [H_F⁻¹]_jj) · [H_F⁻¹]_{:,j}; kept columns are simply frozen.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    cols = w.shape[1]
    for r in range(w.shape[0]):
        for j in range(cols):
            if keep[r, j]:
                continue
            h_inv = torch.linalg.inv(h[j:, j:])
            w[r, j:] -= (w[r, j] / h_inv[0, 0]) * h_inv[:, 0]
            w[r, j] = 0.0
    return w


def _layer_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return torch.linalg.norm(x @ weight.t() - x @ pruned.float().t()).item()


# --------------------------------------------------------------------------------------------
# 1. equivalence with naive OBS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out,in_features,blocksize,sparsity,n,m",
    [
        (4, 8, 8, 0.5, 0, 0),
        (6, 16, 16, 0.3, 0, 0),
        (8, 16, 4, 0.5, 0, 0),
        (5, 12, 5, 0.6, 0, 0),  # ragged last block
        (5, 16, 16, 0.0, 2, 4),
        (8, 16, 6, 0.0, 2, 4),  # blocksize rounded down to 4
        (6, 12, 5, 0.0, 1, 3),
    ],
)
def test_matches_naive_obs(out: int, in_features: int, blocksize: int, sparsity: float, n: int, m: int) -> None:
    weight, hessian, _ = _problem(out, in_features, seed=out * 31 + in_features)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=sparsity, n=n, m=m, blocksize=blocksize)
    ref = _naive_obs(weight, hessian, keep, percdamp=0.01)
    scale = ref.abs().max().item()
    torch.testing.assert_close(new_w.double(), ref, rtol=1e-4, atol=1e-4 * scale)


def test_matches_naive_obs_with_dead_channel() -> None:
    weight, _, x = _problem(6, 12, seed=7)
    x[:, 4] = 0.0
    hessian, _ = accumulate_hessian(None, x, 0)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=0.5, blocksize=5)
    ref = _naive_obs(weight, hessian, keep, percdamp=0.01)
    torch.testing.assert_close(new_w.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_zero_sparsity_is_identity() -> None:
    weight, hessian, _ = _problem(4, 8)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=0.0)
    assert keep.all()
    torch.testing.assert_close(new_w, weight)


# --------------------------------------------------------------------------------------------
# 2. mask counts
# --------------------------------------------------------------------------------------------


def test_unstructured_count_is_exact_per_block() -> None:
    out, in_features, blocksize, sparsity = 7, 40, 16, 0.37
    weight, hessian, _ = _problem(out, in_features)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=sparsity, blocksize=blocksize)
    widths = [min(blocksize, in_features - s) for s in range(0, in_features, blocksize)]
    expected = sum(int(out * w * sparsity) for w in widths)
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    assert int((~keep).sum()) == expected
    for start, width in zip(range(0, in_features, blocksize), widths):
        assert int((~keep[:, start : start + width]).sum()) == int(out * width * sparsity)
    assert torch.all(new_w[~keep] == 0)
    assert torch.all(new_w[keep] != 0)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (2, 4, 6), (1, 4, 8), (3, 8, 16)])
def test_nm_keeps_exactly_n_per_group(n: int, m: int, blocksize: int) -> None:
    out, in_features = 6, 32
    weight, hessian, _ = _problem(out, in_features)
    new_w, keep = sparsegpt_prune(weight, hessian, n=n, m=m, blocksize=blocksize)
    per_group = keep.view(out, in_features // m, m).sum(dim=-1)
    assert torch.all(per_group == n)
    assert torch.all(new_w[~keep] == 0)


# --------------------------------------------------------------------------------------------
# 3. reconstruction quality
# --------------------------------------------------------------------------------------------


def test_beats_mask_only_and_magnitude() -> None:
    in_features, out = 32, 16
    x = _correlated_inputs(256, in_features, seed=3)
    weight = torch.randn(out, in_features, generator=torch.Generator().manual_seed(4))
    hessian, _ = accumulate_hessian(None, x, 0)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=0.5)

    mask_only = weight * keep
    k = weight.numel() // 2
    magnitude_keep = torch.ones(weight.numel(), dtype=torch.bool)
    magnitude_keep[weight.abs().flatten().argsort()[:k]] = False
    magnitude = weight * magnitude_keep.view_as(weight)

    err_sgpt = _layer_error(x, weight, new_w)
    assert err_sgpt < _layer_error(x, weight, mask_only)
    assert err_sgpt < _layer_error(x, weight, magnitude)


# --------------------------------------------------------------------------------------------
# 4. robustness, dtype, argument checking
# --------------------------------------------------------------------------------------------


def test_dead_channel_is_finite_and_zeroed() -> None:
    weight, _, x = _problem(8, 16, seed=5)
    x[:, 3] = 0.0
    hessian, _ = accumulate_hessian(None, x, 0)
    assert hessian[3, 3] == 0
    new_w, _ = sparsegpt_prune(weight, hessian, n=2, m=4)
    assert torch.isfinite(new_w).all()
    assert torch.all(new_w[:, 3] == 0)


def test_inputs_not_modified() -> None:
    weight, hessian, _ = _problem(6, 16)
    hessian[2, :] = 0.0  # a dead channel exercises the in-place diagonal fix-up
    hessian[:, 2] = 0.0
    w0, h0 = weight.clone(), hessian.clone()
    sparsegpt_prune(weight, hessian, sparsity=0.5, blocksize=4)
    assert torch.equal(weight, w0)
    assert torch.equal(hessian, h0)


def test_bf16_in_bf16_out() -> None:
    weight, hessian, _ = _problem(6, 16)
    new_w, keep = sparsegpt_prune(weight.bfloat16(), hessian, sparsity=0.5)
    assert new_w.dtype == torch.bfloat16
    assert keep.dtype == torch.bool
    assert torch.all(new_w[~keep] == 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"n": 2, "m": 0}, r"n=2, m=0.*in_features=12"),
        ({"n": 4, "m": 4}, r"n=4, m=4"),
        ({"n": 0, "m": 4}, r"n=0, m=4"),
        ({"n": 2, "m": 8}, r"n=2, m=8, in_features=12"),
        ({"blocksize": 0}, "blocksize"),
        ({"percdamp": -1.0}, "percdamp"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    weight, hessian, _ = _problem(4, 12)
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(weight, hessian, **kwargs)


def test_bad_tensors_raise() -> None:
    weight, hessian, _ = _problem(4, 12)
    with pytest.raises(ValueError, match="hessian shape"):
        sparsegpt_prune(weight, hessian[:8, :8], sparsity=0.5)
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(weight[0], hessian, sparsity=0.5)
    bad_w = weight.clone()
    bad_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains non-finite"):
        sparsegpt_prune(bad_w, hessian, sparsity=0.5)
    bad_h = hessian.clone()
    bad_h[1, 2] = float("inf")
    with pytest.raises(ValueError, match="hessian contains non-finite"):
        sparsegpt_prune(weight, bad_h, sparsity=0.5)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(weight, -torch.eye(12), sparsity=0.5, percdamp=0.0)


# --------------------------------------------------------------------------------------------
# 5. Hessian accumulation
# --------------------------------------------------------------------------------------------


def test_accumulate_hessian_matches_one_shot() -> None:
    g = torch.Generator().manual_seed(9)
    x1 = torch.randn(2, 5, 8, generator=g)  # [batch, seq, in]
    x2 = torch.randn(3, 8, generator=g)
    h, count = accumulate_hessian(None, x1, 0)
    h_before = h.clone()
    h, count = accumulate_hessian(h, x2, count)
    assert count == 13
    assert torch.equal(h_before, accumulate_hessian(None, x1, 0)[0])
    x_all = torch.cat([x1.reshape(-1, 8), x2])
    expected = (2.0 / 13) * x_all.t() @ x_all
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)


def test_accumulate_hessian_rejects_mismatch() -> None:
    h, count = accumulate_hessian(None, torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="in_features=6"):
        accumulate_hessian(h, torch.randn(4, 6), count)
    with pytest.raises(ValueError, match="count"):
        accumulate_hessian(None, torch.randn(4, 8), 3)
