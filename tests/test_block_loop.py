"""The one block loop (unipruning_cli/pruning/block_loop.py) against hand-run references: masks applied before the next
block sees the outputs, weights put back bit for bit (on an exception too), apply=False leaves W alone."""

from __future__ import annotations

import copy

import pytest
import torch

from _helpers import build_tiny_model
from unipruning_cli.pruning.block_loop import PassSettings, block_pass
from unipruning_cli.data.calibration import calibrate_blockwise
from unipruning_cli.models.loading import prunable_layers

VOCAB = 320


def _windows() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))


def _half(layers) -> dict[str, torch.Tensor]:
    """Keep the larger half of |W| of each row: a mask that depends on the weights only."""
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach().abs()
        out[name] = w >= w.median(dim=1, keepdim=True).values
    return out


def _same_weights(model, state) -> bool:
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_sequential_pass_applies_each_blocks_masks_before_the_next_block_and_restores(one_torch_thread):
    model = build_tiny_model("llama", VOCAB)
    before = copy.deepcopy(model.state_dict())
    windows = _windows()
    seen = []
    result = block_pass(model, windows, lambda i, layers, stats: seen.append(i) or _half(layers),
                        PassSettings("cpu", 1), restore=True)
    assert seen == list(range(len(model.model.layers)))
    assert _same_weights(model, before)

    # the reference: prune the copy block by block for good, one-shot statistics of the model as pruned so far
    pruned = build_tiny_model("llama", VOCAB)
    layers = prunable_layers(pruned)
    expected = {}
    for i in range(len(pruned.model.layers)):
        stats = calibrate_blockwise(pruned, windows)
        block = {n: m for n, m in layers.items() if n.startswith(f"model.layers.{i}.")}
        masks = _half(block)
        with torch.no_grad():
            for n, m in masks.items():
                block[n].weight.mul_(m)
        expected.update(masks)
        for n in block:  # block i's statistics are those of its inputs after the blocks < i were pruned
            assert torch.allclose(result.stats[n].sq_sum, stats[n].sq_sum, rtol=1e-5, atol=1e-6), n
    assert set(result.masks) == set(expected)
    assert all(torch.equal(result.masks[n], expected[n]) for n in expected)


def test_the_model_is_restored_when_a_step_fails(one_torch_thread):
    model = build_tiny_model("llama", VOCAB)
    before = copy.deepcopy(model.state_dict())

    def step(i, layers, stats):
        if i == 1:
            raise RuntimeError("stop in block 1")
        return _half(layers)

    with pytest.raises(RuntimeError, match="block 1"):
        block_pass(model, _windows(), step, restore=True)
    assert _same_weights(model, before)


def test_without_apply_the_masks_are_not_applied_and_a_step_may_write_weights_itself(one_torch_thread):
    model = build_tiny_model("llama", VOCAB)
    before = copy.deepcopy(model.state_dict())
    block_pass(model, _windows(), lambda i, layers, stats: _half(layers), apply=False)
    assert _same_weights(model, before)

    def zero_first_column(i, layers, stats):
        for layer in layers.values():
            layer.weight.data[:, 0] = 0
        return None

    block_pass(model, _windows(), zero_first_column)
    assert all(bool((m.weight[:, 0] == 0).all()) for m in prunable_layers(model).values())
