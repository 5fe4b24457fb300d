"""Activation checkpointing for the drift search: each block's activations recomputed in the backward pass.

The same gradients for a fraction of the activation memory (README, "Costs"); the search's statistics
hooks skip the recomputation (``torch._C._current_graph_task_id() != -1`` inside a backward pass).
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


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
