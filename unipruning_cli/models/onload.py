"""Sequential onloading: the decoder blocks live in host memory and come to the GPU one at a time.

A model placed with :func:`place_onloaded` keeps everything outside the decoder blocks (embeddings,
rotary tables, the final norm, ``lm_head``) on the execution device and every block on the host. Two
ways a block reaches the GPU (the pattern of llm-compressor's sequential pipeline):

- :func:`onloaded`: a stage that works on one block at a time (calibration, SparseGPT, local metrics)
  brings the block in for all its work and, with ``write_back``, copies changed weights back;
- forward hooks (:func:`attach_onload_hooks`): a whole-model forward (perplexity, lm-eval, capturing
  the first block's inputs) brings each block in for its own forward and drops the GPU copy afterwards
  (the host tensors are kept, so nothing is copied back).

Peak GPU memory is then the non-block weights, one block and that stage's own buffers
(:mod:`..stages.plan.estimate`, ``placement=onload``). The parameters stay the same ``nn.Parameter`` objects:
only their ``.data`` moves, so in-place pruning and masks work as they do on a device-resident model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from ..core.lazymap import LazyMap

_HOOKED = "_unipruning_onload_handles"


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def on_host(module: nn.Module) -> bool:
    """Whether ``module``'s weights are in host memory (the first parameter's device decides)."""
    first = next(module.parameters(), None)
    return first is not None and first.device.type == "cpu"


def _point(t: torch.Tensor, data: torch.Tensor) -> None:
    """Make ``t`` hold ``data`` (another device) and keep its identity, as ``nn.Module._apply`` does: ``.data``
    where the two tensor types allow it (CPU and CUDA), else a swap of implementations (e.g. ``meta``)."""
    if torch._has_compatible_shallow_copy_type(t, data):
        t.data = data
    else:
        torch.utils.swap_tensors(t, nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data)


def _bring(module: nn.Module, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    moved = []
    for t in _tensors(module):
        host = t.data
        _point(t, host.to(device, non_blocking=True))
        moved.append((t, host))
    return moved


def _release(moved: list[tuple[torch.Tensor, torch.Tensor]], write_back: bool) -> None:
    with torch.no_grad():
        for t, host in moved:
            if write_back:
                host.copy_(t.data)
            _point(t, host)


@contextmanager
def onloaded(module: nn.Module, device: torch.device, write_back: bool = True) -> Iterator[nn.Module]:
    """``module`` on ``device`` inside the block, back in its host tensors after it.

    A no-op unless ``module`` is on the host and ``device`` is not (a device-resident model, or a run on
    the CPU, is untouched). ``write_back``: copy the tensors back into the host ones on exit (needed when
    the block was pruned or updated on the device); False drops the device copy. Raises nothing itself.
    """
    device = torch.device(device)
    if device.type == "cpu" or not on_host(module):
        yield module
        return
    moved = _bring(module, device)
    try:
        yield module
    finally:
        _release(moved, write_back)


def attach_onload_hooks(blocks: nn.ModuleList, device: torch.device) -> None:
    """Forward hooks that onload each host-resident block for its own forward, then drop its device copy.

    A block already on the device when its forward starts (inside :func:`onloaded`) is left alone.
    The hooks stay for the model's lifetime; :func:`detach_onload_hooks` removes them.
    """
    device = torch.device(device)
    for block in blocks:
        held: list = []

        def pre(module, args, held=held):
            if on_host(module):
                held.append(_bring(module, device))

        def post(module, args, output, held=held):
            if held:
                _release(held.pop(), write_back=False)

        # always_call: a forward that raises (e.g. a capture hook stopping the model at block 0) still drops the copy.
        setattr(block, _HOOKED, (block.register_forward_pre_hook(pre),
                                 block.register_forward_hook(post, always_call=True)))


def detach_onload_hooks(blocks: nn.ModuleList) -> None:
    for block in blocks:
        for handle in getattr(block, _HOOKED, ()):
            handle.remove()
        if hasattr(block, _HOOKED):
            delattr(block, _HOOKED)


def is_onloaded_model(blocks: nn.ModuleList) -> bool:
    """Whether the blocks carry onload hooks (the model was placed with :func:`place_onloaded`)."""
    return any(hasattr(b, _HOOKED) for b in blocks)


def place_onloaded(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Everything but ``blocks`` to ``device``; the blocks stay in host memory, with onload hooks.

    ``model`` must be on the host on entry (``from_pretrained`` without a ``device_map``).
    """
    in_blocks = {id(t) for b in blocks for t in _tensors(b)}
    with torch.no_grad():
        for module in model.modules():
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if id(t) not in in_blocks:
                    _point(t, t.data.to(device))
    attach_onload_hooks(blocks, device)


def weights_on(layers: Mapping[str, nn.Linear], device: torch.device) -> LazyMap:
    """name -> the layer's weight on ``device`` (detached), fetched when asked for: a search that works one
    matrix at a time (the frozen search) holds one onloaded matrix, not the model. For a model already on
    ``device`` the weights themselves are returned, with no copy."""
    device = torch.device(device)
    return LazyMap(layers, lambda name: layers[name].weight.detach().to(device))
