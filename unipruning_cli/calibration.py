"""Layer-by-layer calibration: activation statistics captured on the real forward pass.

The inputs of the first decoder block are captured with a hook on the real model forward (so
rotary embeddings, masks and any other keyword the model passes are the model's own, not guessed),
then the blocks run one at a time on those stored inputs. Peak memory is one block's activations
plus the stored hidden states, not the whole model's activations.

Two modes, as in the peer tools:
- ``one_shot``: every block sees the outputs of the dense blocks before it;
- ``sequential``: after a block's statistics are taken, ``on_block`` prunes it, and its outputs are
  recomputed with the pruned weights before they feed the next block.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from .models import block_layers, find_blocks, input_device
from .onload import onloaded
from .progress import track
from .stats import ActivationStats

log = logging.getLogger(__name__)

BlockCallback = Callable[[int, dict[str, nn.Linear], dict[str, ActivationStats]], None]


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block is needed."""


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class SharedInputs:
    """Statistics of a layer input computed once for every layer fed that very tensor.

    q/k/v projections read one tensor, and so do gate/up: their inputs' x², and above all their
    XᵀX (the dominant cost of SparseGPT's calibration), are identical. The memo keys on the
    tensor object and its version counter, so a tensor modified in place is never mistaken for
    the one seen before; ``clear`` after each block releases the last input.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.computed = 0  # products actually computed (scripts/bench_calibration_speed.py reads it)
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, torch.Tensor | None, int] | None = None

    def get(self, x: torch.Tensor, want_hessian: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(Σ x² per channel, XᵀX or None, tokens) of one forward's input."""
        key = (x, x._version, want_hessian)
        if self.enabled and self._key is not None and self._key[0] is x and self._key[1:] == key[1:]:
            return self._value
        x2d = x.detach().reshape(-1, x.shape[-1]).float()
        value = ((x2d * x2d).sum(0), x2d.t() @ x2d if want_hessian else None, x2d.shape[0])
        self.computed += 1
        if self.enabled:
            self._key, self._value = key, value
        return value

    def clear(self) -> None:
        self._key = self._value = None


class InputCollector:
    """Forward pre-hook that accumulates the statistics of one linear layer's inputs."""

    def __init__(self, in_features: int, want_hessian: bool, want_per_sample: bool,
                 shared: SharedInputs | None = None) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0
        self.xtx: Optional[torch.Tensor] = None
        self.per_sample: list[torch.Tensor] | None = [] if want_per_sample else None
        self.want_hessian = want_hessian
        self.shared = shared or SharedInputs(enabled=False)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        sq, xtx, tokens = self.shared.get(args[0], self.want_hessian)
        self.sq_sum += sq.double().cpu()
        self.count += tokens
        if self.per_sample is not None:
            self.per_sample.append((sq / tokens).cpu())
        if xtx is not None:  # the shared product is read only: accumulate into our own tensor
            self.xtx = xtx.clone() if self.xtx is None else self.xtx + xtx

    def stats(self) -> ActivationStats:
        return ActivationStats(
            sq_sum=self.sq_sum,
            count=self.count,
            xtx=self.xtx,
            sample_mean_sq=torch.stack(self.per_sample) if self.per_sample else None,
        )


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, offload: str) -> tuple[list, list]:
    """Run the real model forward until the first decoder block; keep its args per sample."""
    _, blocks = find_blocks(model)
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.to(offload))
        kwargs_list.append(_to({k: v for k, v in kwargs.items() if k != "past_key_values"}, offload))
        raise _StopForward

    # prepend: stop before an onload hook (:mod:`.onload`) brings block 0 to the GPU for nothing.
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    device = input_device(model)
    try:
        for row in track(windows, "capture block inputs"):
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _block_device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, offload: str) -> torch.Tensor:
    dev = _block_device(block)
    out = block(hidden.to(dev), **_to(kwargs, dev))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(offload)


@torch.no_grad()
def calibrate_blockwise(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    sequential: bool = False,
    want_hessian: bool = False,
    want_per_sample: bool = False,
    on_block: BlockCallback | None = None,
    offload: str = "cpu",
    share_inputs: bool = True,
) -> dict[str, ActivationStats]:
    """Statistics of every prunable layer's inputs over ``windows`` [nsamples, seqlen].

    ``on_block(i, layers, stats)`` runs after block i's statistics are complete; in sequential mode
    the block's outputs are recomputed afterwards, so a callback that prunes feeds the pruned
    outputs forward. Hessians (``xtx``) are dropped after the callback to keep one block's worth.
    """
    prefix, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, windows, offload)
    all_stats: dict[str, ActivationStats] = {}
    device = input_device(model)
    for i, block in enumerate(track(blocks, "calibrate blocks")):
        # Sequential onloading: a host-resident block comes to the GPU for its passes and its callback,
        # and goes back with what the callback changed (a no-op for a model already on its device).
        with onloaded(block, device, write_back=on_block is not None):
            stats, outputs = _calibrate_block(block, f"{prefix}.{i}", i, hidden, kwargs, sequential, want_hessian,
                                              want_per_sample, on_block, offload, share_inputs)
        all_stats.update(stats)
        hidden = outputs
    return all_stats


def _calibrate_block(block: nn.Module, name: str, i: int, hidden: list, kwargs: list, sequential: bool,
                     want_hessian: bool, want_per_sample: bool, on_block: BlockCallback | None, offload: str,
                     share_inputs: bool) -> tuple[dict[str, ActivationStats], list]:
    """One block of :func:`calibrate_blockwise`: its statistics, the callback, and its outputs for the next block."""
    layers = block_layers(block, name)
    shared = SharedInputs(enabled=share_inputs)
    collectors = {n: InputCollector(m.in_features, want_hessian, want_per_sample, shared)
                  for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(collectors[n]) for n, m in layers.items()]
    try:
        outputs = [_run_block(block, h, kw, offload) for h, kw in zip(hidden, kwargs)]
    finally:
        shared.clear()
        for h in handles:
            h.remove()
    stats = {n: c.stats() for n, c in collectors.items()}
    if on_block is not None:
        on_block(i, layers, stats)
    if sequential and on_block is not None:
        outputs = [_run_block(block, h, kw, offload) for h, kw in zip(hidden, kwargs)]
    for s in stats.values():
        s.xtx = None
    return stats, outputs


def stats_to_tensors(stats: dict[str, ActivationStats], per_sample: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten statistics for a safetensors file (counts go in the metadata); per-sample ones optional."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, s in stats.items():
        tensors[f"{name}.sq_sum"] = s.sq_sum
        if per_sample and s.sample_mean_sq is not None:
            tensors[f"{name}.sample_mean_sq"] = s.sample_mean_sq
        meta[f"{name}.count"] = str(s.count)
    return tensors, meta


def stats_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, ActivationStats]:
    names = [k[: -len(".sq_sum")] for k in tensors if k.endswith(".sq_sum")]
    return {
        n: ActivationStats(sq_sum=tensors[f"{n}.sq_sum"], count=int(meta[f"{n}.count"]),
                           sample_mean_sq=tensors.get(f"{n}.sample_mean_sq"))
        for n in names
    }
