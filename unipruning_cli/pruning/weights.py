"""Weight mutation in place: a mask applied to W, and W restored from a saved copy."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def restore_weights(layers: Mapping[str, nn.Linear], weights: Mapping[str, torch.Tensor]) -> None:
    """W ← the saved ``weights`` (name -> a copy, on any device), in place."""
    with torch.no_grad():
        for name, w in weights.items():
            layers[name].weight.copy_(w)


def apply_masks(layers: Mapping[str, nn.Linear], masks: Mapping[str, torch.Tensor]) -> None:
    """W ← W ⊙ mask, in place; weights outside ``masks`` are left alone."""
    with torch.no_grad():
        for name, mask in masks.items():
            w = layers[name].weight
            w.mul_(mask.to(device=w.device, dtype=w.dtype))


def restore_removed(layers: Mapping, masks: Mapping[str, torch.Tensor], removed: Mapping[str, torch.Tensor]) -> None:
    """Put back the weights a mask zeroed: ``W[~mask] = removed`` (in ``masked_select`` order, exact)."""
    with torch.no_grad():
        for name, values in removed.items():
            w = layers[name].weight
            w.masked_scatter_(~masks[name].to(w.device), values.to(device=w.device, dtype=w.dtype))
