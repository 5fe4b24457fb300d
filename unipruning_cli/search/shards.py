"""How the drift search sees its matrices: whole in one process (:class:`Whole`), or as FSDP2 row shards over the
ranks of a ``torchrun`` launch (:class:`RowShards`).

The search itself (:func:`.mirror_descent.search_drift`) is one loop for both. Per matrix it needs:

- the whole W for the step metric S (:meth:`full`): RIA's and stochRIA's column sums, the mean normalisation and
  stochRIA's random subsets span every row. Under FSDP2 each rank gathers one matrix at a time (``all_gather``,
  ``b`` bytes per weight, as the forward pass already does) and computes S whole, with the same generator as every
  other rank, so S and every random draw are those of a single process; then keeps its own rows (:meth:`rows`).
  Cost: one matrix's S per rank at a time, and the metric's compute repeated on every rank.
- V and Γ only as this rank's rows (plain fp32 tensors: the search's largest state is sharded like W).
- the λ-quantile of |V| for the prox over the whole matrix (:meth:`magnitudes`): above
  ``regularizers.EXACT_QUANTILE_MAX`` entries the quantile is estimated on ``QUANTILE_SAMPLE`` random positions,
  drawn alike on every rank; each rank fills the positions in its rows and one ``all_reduce`` of 10⁵ values
  completes them (0.4 MB per matrix per step, not the matrix). Smaller matrices gather |V| whole (≤ 4 MB).
- whole tensors for checkpoints and the final Γ (:meth:`gather`, :meth:`full`), one matrix at a time, written by
  rank 0 alone in the single-process format.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..core.distributed import Ranks, SINGLE, all_sum, gather_rows, row_range
from ..pruning.masks import count_zeros
from .log import gamma_summary, summarise


class Whole:
    """One process: every matrix whole on its device; the identity everywhere."""

    ranks: Ranks = SINGLE

    @property
    def writer(self) -> bool:
        return self.ranks.main

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a parameter, gradient or optimiser state, as a plain tensor sharing its storage."""
        return t

    def device_for(self, p: torch.Tensor) -> torch.device:
        """Where the search computes on ``p`` (its metric, dual step and prox): where ``p`` is."""
        return p.device

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The whole of a parameter, gradient or optimiser state (detached)."""
        return t.detach()

    def rows(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole tensor."""
        return whole

    def gather(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The whole of a row-sharded plain tensor (V, Γ) of ``rows`` rows."""
        return local

    def like(self, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """A new tensor shaped and placed like ``p`` holding ``whole`` (e.g. Adam's moments read from a checkpoint)."""
        return torch.empty_like(p).copy_(whole)

    def grad_plus(self, grad: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """A new gradient: ``grad`` plus ``local`` (this rank's rows of a term of the same shape)."""
        return grad + local

    def magnitudes(self, v: torch.Tensor, shape: torch.Size):
        """What the prox reads |V| through (None: ``v`` is the whole matrix)."""
        return None

    def summarise(self, gammas: Mapping[str, torch.Tensor], index: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, torch.Size]) -> dict:
        return summarise(gammas, index)


class _ShardedMagnitudes:
    """|V| of a whole matrix whose rows are spread over the ranks, read at chosen flat positions."""

    def __init__(self, v: torch.Tensor, shape: torch.Size, ranks: Ranks) -> None:
        self.v, self.shape, self.ranks = v, shape, ranks
        self.numel = shape.numel()

    def at(self, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            return gather_rows(self.v.detach().abs(), self.shape[0], self.ranks).reshape(-1)
        return _values_at(self.v.detach().abs(), positions, self.shape, self.ranks)


def _values_at(local: torch.Tensor, positions: torch.Tensor, shape: torch.Size, ranks: Ranks) -> torch.Tensor:
    """The whole matrix's values at flat ``positions``: each rank fills those in its rows, one ``all_reduce``
    completes them (each position lies in exactly one rank's rows, the others add exact zeros)."""
    start, stop = row_range(shape[0], ranks)
    cols = shape.numel() // shape[0] if shape[0] else 0
    pos = positions.to(local.device)
    mine = (pos >= start * cols) & (pos < stop * cols)
    out = torch.zeros(pos.shape, dtype=local.dtype, device=local.device)
    out[mine] = local.reshape(-1)[pos[mine] - start * cols]
    return all_sum(out, ranks)


class RowShards(Whole):
    """FSDP2's ``Shard(0)``: parameters, gradients and Adam's moments are DTensors; V and Γ this rank's rows."""

    def __init__(self, ranks: Ranks, device: torch.device | None = None) -> None:
        """``device``: this rank's compute device, when FSDP's CPU offload keeps the shards in host memory."""
        self.ranks, self.device = ranks, device

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local()

    def device_for(self, p: torch.Tensor) -> torch.device:
        return self.device or p.device

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().full_tensor()

    def rows(self, whole: torch.Tensor) -> torch.Tensor:
        start, stop = row_range(whole.shape[0], self.ranks)
        return whole[start:stop]

    def gather(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        return gather_rows(local, rows, self.ranks)

    def like(self, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(p)
        out.to_local().copy_(self.rows(whole))
        return out

    def grad_plus(self, grad: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        term = DTensor.from_local(local.to(grad.to_local().device), grad.device_mesh, grad.placements, shape=grad.shape, stride=grad.stride())
        return grad + term

    def magnitudes(self, v: torch.Tensor, shape: torch.Size):
        return _ShardedMagnitudes(v, shape, self.ranks)

    def summarise(self, gammas: Mapping[str, torch.Tensor], index: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, torch.Size]) -> dict:
        """:func:`.log.summarise` of the whole matrices (the sums reduced over the ranks, the samples completed)."""
        sums = torch.tensor([float(sum(count_zeros(g) for g in gammas.values())),
                             sum(float(g.abs().sum()) for g in gammas.values())], dtype=torch.float64)
        sums = all_sum(sums.to(_device(gammas)), self.ranks).cpu()
        samples = torch.cat([_values_at(g, index[n], shapes[n], self.ranks).cpu() for n, g in gammas.items()])
        numel = sum(s.numel() for s in shapes.values())
        return gamma_summary(samples, int(sums[0]), numel, float(sums[1]))


def _device(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(tensors.values())).device
