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

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..models.layouts import expert_counts, expert_groups
from ..models.loading import block_layers, find_blocks, input_device
from ..models.onload import onloaded
from ..core.progress import track
from .dense_stream import paired_forward, relative_drift
from .stats import ActivationStats, check_finite

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
        self._value: tuple | None = None

    def get(self, x: torch.Tensor, want_hessian: bool) -> tuple[torch.Tensor, torch.Tensor | None, int, torch.Tensor]:
        """(Σ x² per channel, XᵀX or None, tokens, Σ x per channel) of one forward's input."""
        key = (x, x._version, want_hessian)
        if self.enabled and self._key is not None and self._key[0] is x and self._key[1:] == key[1:]:
            return self._value
        x2d = x.detach().reshape(-1, x.shape[-1]).float()
        value = ((x2d * x2d).sum(0), x2d.t() @ x2d if want_hessian else None, x2d.shape[0], x2d.sum(0))
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
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0
        self.xtx: Optional[torch.Tensor] = None
        self.per_sample: list[torch.Tensor] | None = [] if want_per_sample else None
        self.want_hessian = want_hessian
        self.shared = shared or SharedInputs(enabled=False)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        sq, xtx, tokens, total = self.shared.get(args[0], self.want_hessian)
        self.sq_sum += sq.double().cpu()
        self.sum += total.double().cpu()
        self.count += tokens
        if self.per_sample is not None:
            self.per_sample.append((sq / tokens).cpu())
        if xtx is not None:  # the shared product is read only: accumulate into our own tensor
            self.xtx = xtx.clone() if self.xtx is None else self.xtx + xtx

    def stats(self) -> ActivationStats:
        return ActivationStats(
            sq_sum=self.sq_sum,
            count=self.count,
            sum=self.sum,
            xtx=self.xtx,
            sample_mean_sq=torch.stack(self.per_sample) if self.per_sample else None,
        )


#: Block keywords not kept: the KV cache (``use_cache=False``: None, or an object no stored call needs).
_DROP = frozenset({"past_key_values", "past_key_value", "cache"})


class _Pool:
    """Stores each distinct tensor once (on ``device``): a tensor object seen before (the model hands every block
    the same rotary tables and masks) or one equal to a stored one (another sample's identical mask) is shared,
    so the kwargs of 80 blocks x 128 samples hold a few tensors per distinct sample shape, not 80 x 128 copies."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self._by_id: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (source held alive, stored)
        self._by_shape: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            hit = self._by_id.get(id(obj))
            if hit is not None and hit[0] is obj:
                return hit[1]
            moved = obj.detach().to(self.device)
            same = self._by_shape.setdefault((tuple(moved.shape), moved.dtype, moved.device), [])
            stored = next((t for t in same if torch.equal(t, moved)), None)
            if stored is None:
                same.append(moved)
                stored = moved
            self._by_id[id(obj)] = (obj, stored)
            return stored
        if isinstance(obj, (tuple, list)):
            return type(obj)(self(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        return obj

    def end_sample(self) -> None:
        """Forget object identities (ids are reused once the forward's tensors are freed); keep the stored ones."""
        self._by_id.clear()


class _Recorder(nn.Module):
    """Stands in for decoder block ``index`` during the capture forward: keeps the keywords the model passes it,
    returns its input unchanged (the blocks' outputs are not needed here), and stops the forward after the last
    block. Attribute reads it lacks go to the real block (a model may read ``layer.attention_type``)."""

    def __init__(self, block: nn.Module, index: int, record: Callable[[int, tuple, dict], None], last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: nothing of the block is registered twice
        self.index, self.record, self.last = index, record, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.record(self.index, args, kwargs)
        if self.last:
            raise _StopForward
        return args[0] if args else kwargs.get("hidden_states")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows, offload: str) -> tuple[list, list[list[dict]]]:
    """The inputs of block 0 per sample, and the keyword arguments the real model forward passes to EVERY block.

    ``windows``: int64 ``[n, seqlen]`` or a :class:`.sampling.TokenSamples` (samples of any length). Returns
    (hidden ``[1, T, h]`` per sample on ``offload``, ``kwargs[block][sample]``). Each block's keywords are the
    model's own (per-layer attention masks of sliding-window layers, Gemma 2/3, Mistral, Qwen2; rotary tables;
    position ids), so block i is never run with block 0's mask (wanda issue #87 for why they are captured, not
    rebuilt). The blocks are swapped for recorders during the capture, so no block computes (nor, with
    sequential onloading, comes to the GPU) and the forward stops after the last one; identical tensors are
    stored once (:class:`_Pool`)."""
    _, blocks = find_blocks(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in blocks]
    pool = _Pool(offload)

    def record(i: int, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        hidden = args[0] if args else kw.pop("hidden_states")
        kw.pop("hidden_states", None)
        if i == 0:
            inputs.append(hidden.to(offload))
        kwargs[i].append(pool({k: v for k, v in kw.items() if k not in _DROP}))

    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, record, last=i == len(originals) - 1)
    device = input_device(model)
    try:
        for row in track(windows, "capture block inputs"):
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
            finally:
                pool.end_sample()
            if any(len(k) != len(inputs) for k in kwargs):
                raise RuntimeError(f"{type(model).__name__}: the forward did not call every decoder block once per "
                                   f"sample, so their inputs cannot be captured")
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return inputs, kwargs


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
    windows,
    *,
    sequential: bool = False,
    want_hessian: bool = False,
    want_per_sample: bool = False,
    on_block: BlockCallback | None = None,
    offload: str = "cpu",
    share_inputs: bool = True,
    min_expert_tokens: int = 1,
    dense_targets: bool = False,
    drift: list | None = None,
) -> dict[str, ActivationStats]:
    """Statistics of every prunable layer's inputs over ``windows``: int64 ``[nsamples, seqlen]`` or a
    :class:`.sampling.TokenSamples` (samples of different lengths: truncated documents). Each block runs on
    the keyword arguments the real forward gives that block (:func:`capture_block_inputs`).

    ``on_block(i, layers, stats)`` runs after block i's statistics are complete; in sequential mode
    the block's outputs are recomputed afterwards, so a callback that prunes feeds the pruned
    outputs forward. Hessians (``xtx``) are dropped after the callback to keep one block's worth.

    Experts see only the tokens routed to them; one that saw fewer than ``min_expert_tokens`` gets its layer's
    pooled statistics (:func:`pool_rare_experts`) before the callback, whether the experts are fused tensors taken
    as Linears or a list of Linear experts (:func:`..models.layouts.expert_groups`). Routers and gates are not hooked.
    ``dense_targets`` (sequential, with ``want_hessian``): the blocks also run on the dense model's hidden states and
    each layer's statistics carry ``cross`` = ``X_mᵀ X_d`` (:mod:`.dense_stream`); ``drift``, if a list, gets each
    block's :func:`.dense_stream.relative_drift` after its callback.
    Raises :class:`..core.errors.UserError` at the first block whose statistics are not finite (an overflow of the model's
    dtype, :func:`.stats.check_finite`), before its callback.
    """
    prefix, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, windows, offload)
    all_stats: dict[str, ActivationStats] = {}
    device = input_device(model)
    experts = expert_counts(model)
    streams = [hidden, list(hidden) if dense_targets else None]
    for i, block in enumerate(track(blocks, "calibrate blocks")):
        # Sequential onloading: a host-resident block comes to the GPU for its passes and its callback,
        # and goes back with what the callback changed (a no-op for a model already on its device).
        with onloaded(block, device, write_back=on_block is not None):
            stats, streams = _calibrate_block(block, f"{prefix}.{i}", i, streams, kwargs[i], sequential, want_hessian,
                                              want_per_sample, on_block, offload, share_inputs, min_expert_tokens,
                                              experts)
        all_stats.update(stats)
        if drift is not None and streams[1] is not None:
            drift.append(relative_drift(*streams))
    return all_stats


def _calibrate_block(block: nn.Module, name: str, i: int, streams: list, kwargs: list, sequential: bool,
                     want_hessian: bool, want_per_sample: bool, on_block: BlockCallback | None, offload: str,
                     share_inputs: bool, min_expert_tokens: int,
                     experts: frozenset[int]) -> tuple[dict[str, ActivationStats], list]:
    """One block of :func:`calibrate_blockwise`: its statistics, the callback, and its outputs for the next block
    (``streams``: [the hidden states, the dense model's or None]; ``experts``: the model's expert counts,
    :func:`..models.layouts.expert_counts`)."""
    hidden, hidden_d = streams
    layers = block_layers(block, name, experts)
    shared = SharedInputs(enabled=share_inputs)
    collectors = {n: InputCollector(m.in_features, want_hessian, want_per_sample, shared)
                  for n, m in layers.items()}
    run = (lambda b, h, kw: _run_block(b, h, kw, offload))
    cross: dict[str, torch.Tensor] = {}
    handles = [] if hidden_d is not None else [m.register_forward_pre_hook(collectors[n]) for n, m in layers.items()]
    try:
        if hidden_d is None:
            outputs = [run(block, h, kw) for h, kw in zip(hidden, kwargs)]
        else:
            outputs, hidden_d, cross = paired_forward(block, layers, collectors, hidden, hidden_d, kwargs, run)
    finally:
        shared.clear()
        for h in handles:
            h.remove()
    stats = {n: c.stats() for n, c in collectors.items()}
    for n, c in cross.items():
        stats[n].cross = c
    if layers:  # an overflow stops the run here, before any callback scores, cuts or caches what it made
        check_finite(stats, next(iter(layers.values())).weight.dtype)
    pool_rare_experts(stats, expert_groups(block, name, experts), min_expert_tokens)
    if on_block is not None:
        on_block(i, layers, stats)
    if sequential and on_block is not None:
        outputs = [run(block, h, kw) for h, kw in zip(hidden, kwargs)]
    for s in stats.values():
        s.xtx = s.cross = None
    return stats, [outputs, hidden_d]


def pool_rare_experts(stats: dict[str, ActivationStats], groups: list[list[str]], min_tokens: int,
                      level: int = logging.WARNING) -> list[str]:
    """Give each expert that saw fewer than ``min_tokens`` routed tokens the pooled statistics of its group (one
    projection over all the experts of a layer: what the layer's tokens look like), in place, and say so in the
    log (at ``level``). An expert the router never chose has no statistics of its own at all: its scores would be
    zero, its SparseGPT Hessian empty. Returns the names pooled; their own counts stay in ``own_count``."""
    pooled = []
    for group in groups:
        rare = [n for n in group if stats[n].count < min_tokens]
        if not rare:
            continue
        total = ActivationStats.pooled([stats[n] for n in group], own_count=0)
        for n in rare:
            stats[n] = dataclasses.replace(total, own_count=stats[n].count,
                                           xtx=None if total.xtx is None else total.xtx.clone())
        pooled += rare
        log.log(level, "%d of %d experts saw fewer than calibration.min_expert_tokens=%d routed tokens and are "
                "scored with the layer's pooled statistics: %s", len(rare), len(group), min_tokens,
                    ", ".join(f"{n} ({stats[n].own_count})" for n in rare[:4]) + (" ..." if len(rare) > 4 else ""))
    return pooled


def stats_to_tensors(stats: dict[str, ActivationStats], per_sample: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten statistics for a safetensors file (counts go in the metadata); per-sample ones optional."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, s in stats.items():
        tensors[f"{name}.sq_sum"] = s.sq_sum
        if s.sum is not None:
            tensors[f"{name}.sum"] = s.sum
        if per_sample and s.sample_mean_sq is not None:
            tensors[f"{name}.sample_mean_sq"] = s.sample_mean_sq
        meta[f"{name}.count"] = str(s.count)
        if s.own_count is not None:
            meta[f"{name}.own_count"] = str(s.own_count)
    return tensors, meta


def stats_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, ActivationStats]:
    names = [k[: -len(".sq_sum")] for k in tensors if k.endswith(".sq_sum")]
    return {
        n: ActivationStats(sq_sum=tensors[f"{n}.sq_sum"], count=int(meta[f"{n}.count"]), sum=tensors.get(f"{n}.sum"),
                           sample_mean_sq=tensors.get(f"{n}.sample_mean_sq"),
                           own_count=int(meta[f"{n}.own_count"]) if f"{n}.own_count" in meta else None)
        for n in names
    }
