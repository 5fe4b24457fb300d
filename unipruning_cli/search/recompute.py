"""The drift search's activations: the per-step statistics hooks, and activation checkpointing.

Checkpointing recomputes each block's activations in the backward pass: the same gradients for a fraction
of the activation memory (docs/results.md, "Costs"). The statistics hooks skip that recomputation
(``torch._C._current_graph_task_id() != -1`` inside a backward pass), so each block is counted once.
"""

from __future__ import annotations

import logging

from typing import Mapping

import torch
from torch import nn

from ..data.calibration import pool_rare_experts
from ..data.stats import ActivationStats

log = logging.getLogger(__name__)


class StepStats:
    """Pre-hooks summing x² per input channel over the current step's forward passes. ``expert_groups`` (one
    projection over a layer's experts, :func:`..models.layouts.expert_groups`): an expert routed fewer than
    ``min_expert_tokens`` of the step's tokens is scored with its group's pooled statistics, as in calibration."""

    def __init__(self, layers: Mapping[str, nn.Linear], expert_groups: list[list[str]] = (),
                 min_expert_tokens: int = 1) -> None:
        self.groups, self.min_tokens = list(expert_groups), min_expert_tokens
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}
        self.counts = {n: 0 for n in layers}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if torch._C._current_graph_task_id() != -1:  # a block recomputed in the backward pass: counted once
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sums[name] += (x * x).sum(0).double().cpu()
            self.counts[name] += x.shape[0]

        return hook

    def take(self) -> dict[str, ActivationStats]:
        out = {n: ActivationStats(sq_sum=self.sums[n].clone(), count=self.counts[n]) for n in self.sums}
        for n in self.sums:
            self.sums[n].zero_()
            self.counts[n] = 0
        pool_rare_experts(out, self.groups, self.min_tokens, level=logging.DEBUG)  # every step: not a warning each
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def activation_checkpointing(model: nn.Module, on: bool, blocks: list | None = None) -> list:
    """Recompute each decoder block's activations in the backward pass instead of keeping them (the same
    gradients for a fraction of the memory), through transformers' own activation checkpointing.

    On: only where the model supports it and its config sets no dropout, since the blocks must be in
    training mode for it (everything else stays in eval); returns the blocks switched (empty: off).
    Off: ``blocks`` back to eval, checkpointing and the input-gradient hook it added removed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not on:
        if blocks:
            for b in blocks:
                b.training = False
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
            if hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()
        return []
    config = getattr(model, "config", None)
    dropout = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
               if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v}
    if not getattr(model, "supports_gradient_checkpointing", False) or dropout or model.training:
        log.info("search: activations kept (no activation checkpointing: %s)",
                 f"dropout {dropout}" if dropout else "not supported by this model or model in training mode")
        return []
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for b in blocks:
        b.training = True  # not .train(): its submodules (attention dropout) stay in eval
    return blocks
