"""The O(n) selection rule and the sampled-band k-th value against independent references, ties and all.

The reference ranks with NumPy's ``lexsort`` on (-score, index) in float64: higher score first, then lower index,
which is the promised tie-break stated directly (-0.0 and 0.0 compare equal there, as in a float comparison).
It shares no code with ``unipruning_cli.pruning.masks`` (whose own sort rule is only another path of the code under test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unipruning_cli.pruning.masks import _BAND_SAMPLE, _keep_top_by_selection, _keep_top_by_sort, kth_smallest


def ref_keep_top(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` best of every slice along the last dimension; ties to the lower index."""
    if keep <= 0 or keep >= values.shape[-1]:
        return torch.full(values.shape, keep > 0)
    v = values.double().numpy().reshape(-1, values.shape[-1])
    out = np.zeros(v.shape, dtype=bool)
    index = np.arange(v.shape[1])
    for r, row in enumerate(v):
        out[r, np.lexsort((index, -row))[:keep]] = True
    return torch.from_numpy(out).reshape(values.shape)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    yield torch.rand(1000, generator=gen)
    yield torch.randint(0, 13, (4096,), generator=gen).float()  # 4-bit-like: heavy ties
    yield torch.zeros(777)
    yield torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), 1.0, 0.0] * 20)
    yield torch.randint(0, 3, (6, 300), generator=gen).float()  # rows


@pytest.mark.parametrize("frac", [0.0, 0.01, 0.5, 0.999, 1.0])
def test_selection_matches_reference(frac):
    for values in _inputs():
        keep = int(values.shape[-1] * frac)
        expected = ref_keep_top(values, keep)
        assert torch.equal(_keep_top_by_selection(values, keep), expected)
        assert torch.equal(_keep_top_by_sort(values, keep), expected)  # the short-slice path too


def _long_inputs():
    """Longer than the sampled-band threshold of ``kth_smallest``, including inputs built to defeat the sample."""
    gen = torch.Generator().manual_seed(1)
    n = 100_003
    assert n > 8 * _BAND_SAMPLE
    yield torch.randn(n, generator=gen).abs()
    yield torch.randint(0, 13, (n,), generator=gen).float()  # heavy ties across the band
    yield torch.arange(n, dtype=torch.float32).flip(0)
    periodic = torch.rand(n, generator=gen)
    periodic[:: n // 4096] = 0.5  # every sampled entry equal: the band is one value, the fallback decides
    yield periodic
    yield torch.cat([torch.full((n // 2,), -float("inf")), torch.rand(n - n // 2, generator=gen)])
    yield torch.randint(0, 5, (64, 1_563), generator=gen).float()  # rows of a matrix, heavy ties (per-row cut)


@pytest.mark.parametrize("frac", [0.0, 1e-5, 0.5, 0.99999, 1.0])
def test_selection_matches_reference_on_long_slices(frac):
    for values in _long_inputs():
        size = values.shape[-1]  # a row of the 2-D input, the whole of a 1-D one
        keep = int(size * frac) if frac in (0.0, 1.0) else min(size - 1, max(1, int(size * frac)))
        expected = ref_keep_top(values, keep)
        assert torch.equal(_keep_top_by_selection(values, keep), expected)


def test_kth_smallest_is_the_kth_of_the_sorted_values():
    for values in (v for v in _long_inputs() if v.dim() == 1):
        ordered = np.sort(values.double().numpy())
        for k in (1, 2, 4097, values.numel() // 2, values.numel() - 1, values.numel()):
            got = kth_smallest(values, k)
            assert got.dtype == values.dtype and float(got) == ordered[k - 1], k
