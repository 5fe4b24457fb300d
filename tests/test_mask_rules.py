"""The O(n) selection rule gives exactly the stable-sort rule's masks, ties and all."""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.masks import _keep_top_by_selection, _keep_top_by_sort, kth_smallest


def _inputs():
    gen = torch.Generator().manual_seed(0)
    yield torch.rand(1000, generator=gen)
    yield torch.randint(0, 13, (4096,), generator=gen).float()  # 4-bit-like: heavy ties
    yield torch.zeros(777)
    yield torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), 1.0, 0.0] * 20)
    yield torch.randint(0, 3, (6, 300), generator=gen).float()  # rows


@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_selection_equals_sort(frac):
    for values in _inputs():
        keep = int(values.shape[-1] * frac)
        assert torch.equal(_keep_top_by_selection(values, keep), _keep_top_by_sort(values, keep))


def _long_inputs():
    """Longer than the sampled-band threshold of ``kth_smallest``, including inputs built to defeat the sample."""
    gen = torch.Generator().manual_seed(1)
    n = 100_003
    yield torch.randn(n, generator=gen).abs()
    yield torch.randint(0, 13, (n,), generator=gen).float()  # heavy ties across the band
    yield torch.arange(n, dtype=torch.float32).flip(0)
    periodic = torch.rand(n, generator=gen)
    periodic[:: n // 4096] = 0.5  # every sampled entry equal: the band is one value, the fallback decides
    yield periodic
    yield torch.cat([torch.full((n // 2,), -float("inf")), torch.rand(n - n // 2, generator=gen)])
    yield torch.randint(0, 5, (64, 1_563), generator=gen).float()  # rows of a matrix, heavy ties (per-row cut)


@pytest.mark.parametrize("frac", [0.0, 1e-5, 0.3, 0.5, 0.77, 0.99999, 1.0])
def test_selection_equals_sort_on_long_slices(frac):
    for values in _long_inputs():
        keep = int(values.numel() * frac)
        assert torch.equal(_keep_top_by_selection(values, keep), _keep_top_by_sort(values, keep))


def test_kth_smallest_is_kthvalue():
    for values in (v for v in _long_inputs() if v.dim() == 1):
        for k in (1, 2, 4097, values.numel() // 2, values.numel() - 1, values.numel()):
            assert torch.equal(kth_smallest(values, k), values.kthvalue(k).values)
