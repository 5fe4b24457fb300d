"""Mask cutting from scores: the O(n) selection rule against the stable-sort reference.

All give identical masks (asserted here and tested in tests/test_masks.py, tests/test_mask_rules.py);
the ratio of their times in one run is what justifies each optimisation. Shapes are those of
SmolLM2-135M's prunable matrices (30 blocks: q, k, v, o, gate, up, down). Rules:
- ``sort``: the reference, a stable descending sort;
- ``kthvalue``: the threshold by one ``kthvalue`` over the slice (the selection rule before the band);
- ``selection``: the threshold by ``masks.kth_smallest`` (a sampled band, then ``kthvalue`` inside it).

    python scripts/bench_masks.py [--blocks 30] [--sparsity 0.6]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_common import SMOLLM2_BLOCK_SHAPES

from unipruning_cli.pruning.masks import _keep_top_by_selection, _keep_top_by_sort, num_pruned


def _keep_top_by_kthvalue(values: torch.Tensor, keep: int) -> torch.Tensor:
    """The selection rule as it was before ``kth_smallest``: one kthvalue per slice, then ties by cumsum."""
    size = values.shape[-1]
    thr = values.kthvalue(size - keep + 1, dim=-1, keepdim=True).values
    above = values > thr
    ties = values == thr
    return above | (ties & (ties.cumsum(dim=-1) <= keep - above.sum(dim=-1, keepdim=True)))

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--sparsity", type=float, default=0.6)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(s, generator=gen) for _ in range(args.blocks) for s in SMOLLM2_BLOCK_SHAPES]
    out = {"matrices": len(scores), "params": sum(s.numel() for s in scores), "sparsity": args.sparsity}
    for rule_name, rule in (("sort", _keep_top_by_sort), ("kthvalue", _keep_top_by_kthvalue),
                            ("selection", _keep_top_by_selection)):
        for group in ("per_matrix", "per_row"):
            t0 = time.perf_counter()
            for s in scores:
                v = s.reshape(-1) if group == "per_matrix" else s
                rule(v, v.shape[-1] - num_pruned(v.shape[-1], args.sparsity))
            out[f"{group}_{rule_name}_s"] = round(time.perf_counter() - t0, 3)
    for s in scores[:7]:  # same masks
        for v in (s.reshape(-1), s):
            keep = v.shape[-1] - num_pruned(v.shape[-1], args.sparsity)
            assert torch.equal(_keep_top_by_sort(v, keep), _keep_top_by_selection(v, keep))
            assert torch.equal(_keep_top_by_sort(v, keep), _keep_top_by_kthvalue(v, keep))
    out["per_matrix_ratio_selection_over_kthvalue"] = round(out["per_matrix_selection_s"] / out["per_matrix_kthvalue_s"], 3)
    out["per_matrix_ratio_selection_over_sort"] = round(out["per_matrix_selection_s"] / out["per_matrix_sort_s"], 3)
    out["per_row_ratio_selection_over_sort"] = round(out["per_row_selection_s"] / out["per_row_sort_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
