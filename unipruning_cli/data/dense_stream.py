"""The dense model's activations beside the pruned model's in a sequential pass: dense targets.

In a sequential pass block i sees the outputs of the already pruned blocks < i, and a method that lowers a layer's
error on those inputs (``‖(W - Ŵ) X_m‖²``) cannot see how far they have drifted from the dense model's. With dense
targets the pass also runs every block on the dense model's own hidden states (the dense stream) and keeps, per
layer, ``X_mᵀ X_d`` over the calibration tokens, so the error against the dense layer's output on the dense inputs,
``‖W X_d - Ŵ X_m‖²``, is a quadratic in Ŵ a method can lower (:func:`..pruning.swaps.swap_refine`'s ``target``).
Which of the two objectives a refinement should lower is measured, not assumed: docs/methods.md ("Which error the
refinement lowers").
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn


class _Record:
    """Forward pre-hook of the dense forward: keeps the layer's input (one sample's) for the pruned forward."""

    def __init__(self, store: dict, name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.store[self.name] = args[0]


class _Cross:
    """Forward pre-hook of the pruned forward: adds ``X_mᵀ X_d`` (fp32 ``[in, in]``) of this sample to ``sums[name]``,
    the product computed once for layers that share both inputs (q, k, v; gate, up)."""

    def __init__(self, store: dict, sums: dict, cache: dict, name: str) -> None:
        self.store, self.sums, self.cache, self.name = store, sums, cache, name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        xm, xd = args[0], self.store[self.name]
        if xm.shape != xd.shape:  # an expert routed other tokens in the two streams: no pairing, no target
            self.cache.setdefault("unpaired", set()).add(self.name)
            return
        key = (id(xm), xm._version, id(xd))
        if self.cache.get("key") != key:
            a = xm.detach().reshape(-1, xm.shape[-1]).float()
            b = xd.detach().reshape(-1, xd.shape[-1]).float().to(a.device)
            self.cache.update(key=key, value=a.t() @ b)
        got = self.cache["value"]
        self.sums[self.name] = got.clone() if self.name not in self.sums else self.sums[self.name] + got


def paired_forward(block: nn.Module, layers: Mapping[str, nn.Linear], masked_hooks: Mapping[str, Callable],
                   hidden: list, hidden_d: list, kwargs: list, run: Callable) -> tuple[list, list, dict]:
    """Run ``block`` on each sample of the dense stream (``hidden_d``) and then of the pruned stream (``hidden``), the
    same sample one after the other; ``masked_hooks`` (name -> forward pre-hook, the pass's statistics collectors)
    see only the pruned stream. ``run(block, hidden, kwargs)`` is one forward. Returns (the pruned stream's outputs,
    the dense stream's outputs, name -> ``X_mᵀ X_d`` fp32 ``[in, in]`` summed over the tokens; missing for a layer
    whose inputs differ in length between the streams in some sample: an expert the two streams route differently)."""
    store: dict = {}
    sums: dict[str, torch.Tensor] = {}
    cache: dict = {}
    unpaired: set[str] = set()
    outputs, outputs_d = [], []
    for h, hd, kw in zip(hidden, hidden_d, kwargs):
        handles = [m.register_forward_pre_hook(_Record(store, n)) for n, m in layers.items()]
        try:
            outputs_d.append(run(block, hd, kw))
        finally:
            for handle in handles:
                handle.remove()
        handles = [m.register_forward_pre_hook(masked_hooks[n]) for n, m in layers.items()]
        handles += [m.register_forward_pre_hook(_Cross(store, sums, cache, n)) for n, m in layers.items()]
        try:
            outputs.append(run(block, h, kw))
        finally:
            for handle in handles:
                handle.remove()
            store.clear()
            unpaired |= cache.pop("unpaired", set())
            cache.clear()
    return outputs, outputs_d, {n: c for n, c in sums.items() if n not in unpaired}


def relative_drift(outputs: list, outputs_d: list) -> float:
    """``Σ ‖h_m - h_d‖² / Σ ‖h_d‖²`` over the samples: how far a block's pruned outputs are from the dense model's."""
    num = sum(float((o.float() - d.float()).pow(2).sum()) for o, d in zip(outputs, outputs_d))
    den = sum(float(d.float().pow(2).sum()) for d in outputs_d)
    return num / den if den > 0 else 0.0
