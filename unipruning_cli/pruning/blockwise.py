"""Block-wise pruners: what a method does to one calibrated block (its linear layers and their activation
statistics), turning it into keep masks, and possibly updating the block's weights (SparseGPT). The pipeline
(:func:`..stages.prune.calibrate_and_prune`), not the pruner, owns the loop over blocks. Pruners that only rank weights
also expose ``scores``, so a cut can share one budget over every matrix."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

import torch
from torch import nn

from ..metrics import LocalMetric
from ..data.stats import ActivationStats
from .channels import flap_scores
from .targets import Target


class PruningMethod(ABC):
    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False

    @abstractmethod
    def prune_block(
        self, layers: Mapping[str, nn.Linear], stats: Mapping[str, ActivationStats], target: Target
    ) -> dict[str, torch.Tensor]:
        """Masks for one block's layers (per-row, per-matrix, N:M or channels targets: cuts within one block)."""


class LocalMetricPruning(PruningMethod):
    """Rank weights by a local metric (magnitude, Wanda, RIA, stochRIA) and keep the top ones."""

    name = "local"

    def __init__(self, metric: LocalMetric, seed: int = 0) -> None:
        self.metric = metric
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, layer: nn.Linear, stats: ActivationStats | None) -> torch.Tensor:
        return self.metric.score(layer.weight.detach().cpu(), stats, generator=self.generator)

    def scores(self, layers: Mapping[str, nn.Linear], stats: Mapping[str, ActivationStats]) -> dict[str, torch.Tensor]:
        return {n: self.score(layer, stats.get(n)) for n, layer in layers.items()}

    def prune_block(self, layers, stats, target):
        if target.is_sliced and target.score == "flap":  # FLAP reads the statistics, not the metric's scores
            return target.cut({}, flap=flap_scores(layers, stats))
        return target.cut(self.scores(layers, stats))


class SparseGPTPruning(PruningMethod):
    """SparseGPT (OBS with blocked lazy updates): prunes and reconstructs the kept weights."""

    name = "sparsegpt"
    needs_hessian = True
    updates_weights = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune_block(self, layers, stats, target):
        from .obs import sparsegpt_prune

        out = {}
        for name, layer in layers.items():
            s = stats[name]
            hessian = (2.0 / max(s.count, 1)) * s.xtx
            w, keep = sparsegpt_prune(layer.weight.data, hessian.to(layer.weight.device),
                                      sparsity=target.sparsity, n=target.n, m=target.m,
                                      blocksize=self.blocksize, percdamp=self.percdamp, name=name)
            layer.weight.data.copy_(w)
            out[name] = keep.cpu()
        return out
