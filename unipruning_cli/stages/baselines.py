"""``eval.baselines``: local metrics cut beside a UniPruning run's Γ, each under its own published protocol.

An entry is ``<metric>`` or ``<metric>@<protocol>``. Without a protocol a metric runs as its paper's code does it
(:func:`parse_baseline`): Wanda and RIA calibrate block i on the outputs of the already-pruned blocks < i
(``sequential``); magnitude needs no data. ``@one_shot`` scores every block from the dense model's statistics (the
cached ones the search used). Each baseline is cut with its own comparison group (Wanda per output row, RIA and
magnitude per matrix: ``methods.DEFAULT_ALLOCATION``), never the UniPruning run's allocation; N:M targets stay N:M.
Results are tagged ``<metric>@<protocol>:<target tag>`` (``magnitude:<tag>``), so every number names its protocol.

A sequential baseline prunes the model block by block as it calibrates, so each target costs one calibration
pass; the weights it zeroed are kept on the host (only those: (1 − keep) of the prunable weights) and put back
after the pass, bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..pruning.block_loop import PassSettings, block_pass
from ..data.calibration_set import dense_statistics
from ..core.context import RunContext
from ..core.errors import UserError
from ..pruning.targets import DEFAULT_ALLOCATION, Target, baselines_of
from ..pruning.blockwise import LocalMetricPruning
from ..metrics import METRICS
from ..pruning.mask_files import packed_masks
from .routing import routing_of

log = logging.getLogger(__name__)

PROTOCOLS = ("sequential", "one_shot")


@dataclass(frozen=True)
class Baseline:
    """One ``eval.baselines`` entry: a registered local metric and its block protocol (None: data-free)."""

    metric: str
    protocol: str | None

    @property
    def label(self) -> str:
        return self.metric if self.protocol is None else f"{self.metric}@{self.protocol}"

    def target(self, t: Target) -> Target:
        """The run's target cut with this metric's own comparison group (N:M unchanged)."""
        return t if t.is_nm or t.is_structural else Target(t.sparsity,
                                                           DEFAULT_ALLOCATION.get(self.metric, "per_matrix"))


def parse_baseline(entry: str) -> Baseline:
    """``wanda`` -> Baseline("wanda", "sequential"); ``wanda@one_shot`` -> Baseline("wanda", "one_shot").

    Raises :class:`UserError` for an unknown metric (with suggestions), an unknown protocol, or a protocol given
    to a data-free metric (magnitude reads no calibration data, so a protocol would be ignored)."""
    name, _, protocol = str(entry).partition("@")
    if name not in METRICS:
        raise UserError(f"eval.baselines: {METRICS.unknown_message(name)}")
    uses_data = METRICS.get(name).uses_activations
    if not protocol:
        return Baseline(name, "sequential" if uses_data else None)
    if protocol not in PROTOCOLS:
        raise UserError(f"eval.baselines: {entry!r}: unknown protocol {protocol!r}; choose one of "
                        f"{', '.join(PROTOCOLS)} (e.g. {name}@one_shot)")
    if not uses_data:
        raise UserError(f"eval.baselines: {entry!r}: {name} reads no calibration data, so it has no protocol; "
                        f"write {name}")
    return Baseline(name, protocol)


def baseline_masks(ctx: RunContext) -> dict[str, dict[str, torch.Tensor]]:
    """``eval.baselines`` cut at every target of the run (``ctx.targets``). Returns ``"<label>:<tag>"`` -> name ->
    bool mask ``[out, in]`` (held packed, 1 bit per weight); ``ctx.model``'s weights are as they were on return."""
    cfg, model, layers, targets = ctx.cfg, ctx.model, ctx.layers, ctx.targets
    baselines = [parse_baseline(b) for b in baselines_of(cfg)]
    if not baselines:
        return {}
    windows = ctx.calibration()[0] if any(b.protocol for b in baselines) else None
    dense = None  # the dense model's statistics, computed once if a one-shot baseline asks for them
    out = {}
    for b in baselines:
        method = LocalMetricPruning(METRICS.get(b.metric)(), seed=cfg.seed)
        for t in targets:
            if t.is_experts and t.score not in ("", "saliency") or t.is_sliced and t.score == "flap":
                continue  # REAP, frequency and FLAP read no per-weight score: one cut each, the run's
            own = b.target(t)
            experts = routing_of(ctx) if own.is_experts else None
            key = f"{b.label}:{own.tag}"
            if b.protocol == "sequential":
                log.info("baseline %s: one sequential calibration pass", key)
                out[key] = packed_masks(sequential_masks(model, windows, method, own, ctx.passes))
            elif b.protocol == "one_shot":
                if dense is None:
                    dense = dense_statistics(cfg, model, windows)[0]
                out[key] = packed_masks(own.cut(method.scores(layers, dense), experts))
            else:  # data-free
                out[key] = packed_masks(own.cut(method.scores(layers, {}), experts))
    return out


def sequential_masks(model, windows, method: LocalMetricPruning, target: Target,
                     settings: PassSettings = PassSettings()) -> dict:
    """Masks of ``method`` at ``target`` under the sequential protocol: block i is scored on the outputs of the
    blocks < i as already pruned. Each block is pruned as it goes and restored after the pass
    (:func:`..pruning.block_loop.block_pass` with ``restore``), so the model is bit for bit as before."""
    return block_pass(model, windows, lambda i, layers, stats: method.prune_block(layers, stats, target), settings,
                      restore=True).masks
