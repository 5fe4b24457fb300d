"""``search.jsonl``: the per-step log of a search, and the summaries of Γ it records (mean, zero fraction, quantiles of |Γ|)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..pruning.masks import count_zeros

QUANTILES = (0.1, 0.5, 0.9)
_SAMPLE_PER_LAYER = 1024


class SearchLog:
    """``search.jsonl``: one JSON line per step, flushed as it goes; truncated on resume. ``path=None``: nothing is
    written (the ranks of a sharded search other than rank 0)."""

    def __init__(self, path: Path | None, resume_step: int) -> None:
        self.path = path
        if path is None:
            return
        rows = []
        if resume_step > 0 and path.exists():
            rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]  # rows are 1-based
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def gamma_summary(samples: torch.Tensor, zeros: int, numel: int, abs_sum: float) -> dict:
    """Mean |Γ| and zero fraction (from the exact sums), and quantiles of |Γ| estimated on ``samples``."""
    q = torch.quantile(samples.abs().float(), torch.tensor(QUANTILES)).tolist()
    return {"gamma_abs_mean": abs_sum / numel, "gamma_zero_frac": zeros / numel,
            **{f"gamma_abs_q{int(p * 100)}": v for p, v in zip(QUANTILES, q)}}


def sample_index(numel: int, seed: int) -> torch.Tensor:
    """The fixed flat positions (int64, at most 1024, with replacement) of a matrix whose |Γ| the log samples."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel, (min(_SAMPLE_PER_LAYER, numel),), generator=gen)


def summarise(gammas: Mapping[str, torch.Tensor], index: Mapping[str, torch.Tensor]) -> dict:
    """:func:`gamma_summary` over every matrix of a search, sampled at each matrix's ``index``."""
    samples = torch.cat([g.reshape(-1)[index[n].to(g.device)].cpu() for n, g in gammas.items()])
    zeros = sum(count_zeros(g) for g in gammas.values())
    numel = sum(g.numel() for g in gammas.values())
    abs_sum = sum(float(g.abs().sum()) for g in gammas.values())
    return gamma_summary(samples, zeros, numel, abs_sum)
