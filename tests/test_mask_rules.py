"""The O(n) selection rule gives exactly the stable-sort rule's masks, ties and all."""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.masks import _keep_top_by_selection, _keep_top_by_sort


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
