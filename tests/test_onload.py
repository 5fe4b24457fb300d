"""Sequential onloading (``model.placement=onload``) and the chunked perplexity loss.

This machine has no GPU, so the "execution device" of the hook tests is ``meta``: moving a block there
and back shows where every block is at every moment of a forward, which is what onloading is about.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import build_tiny_model
from unipruning_cli.data.calibration import capture_block_inputs
from unipruning_cli.evaluation.perplexity import chunk_positions, window_nlls
from unipruning_cli.models.loading import find_blocks
from unipruning_cli.models.onload import weights_on, detach_onload_hooks, is_onloaded_model, onloaded, place_onloaded


def _devices(blocks) -> list[str]:
    return [next(b.parameters()).device.type for b in blocks]


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, h):
        return self.fc(h)


class _Toy(torch.nn.Module):
    """Embedding, three blocks, a head: a model whose forward runs on ``meta`` (a transformers decoder stops
    at its causal mask's ``.item()``), and whose tensors nothing else references (``meta`` moves swap them)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(_Block() for _ in range(3))
        self.head = torch.nn.Linear(8, 16)
        self.requires_grad_(False)  # as load_model leaves a model

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids, use_cache=False):
        h = self.embed(ids)
        for b in self.layers:
            h = b(h)
        return self.head(h)


def _snapshot(blocks):
    return [(id(p), p.detach().clone()) for b in blocks for p in b.parameters()]


def test_a_forward_brings_each_block_alone_and_leaves_the_weights_untouched():
    model = _Toy()
    _, blocks = find_blocks(model)
    before = _snapshot(blocks)
    place_onloaded(model, blocks, torch.device("meta"))
    assert model.embed.weight.device.type == "meta" and model.head.weight.device.type == "meta"
    assert _devices(blocks) == ["cpu"] * 3 and is_onloaded_model(blocks)
    seen = []
    for b in blocks:  # registered after the onload hooks: runs once the block has been brought in
        b.register_forward_pre_hook(lambda m, a: seen.append(_devices(blocks)))
    assert model(torch.zeros(1, 4, dtype=torch.long, device="meta")).device.type == "meta"
    assert seen == [["meta", "cpu", "cpu"], ["cpu", "meta", "cpu"], ["cpu", "cpu", "meta"]]
    assert _devices(blocks) == ["cpu"] * 3
    after = _snapshot(blocks)
    assert [i for i, _ in after] == [i for i, _ in before]  # the same Parameter objects
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after, before))
    detach_onload_hooks(blocks)
    assert not is_onloaded_model(blocks)


def test_capturing_block_inputs_never_leaves_block_0_on_the_device():
    """The capture hook stops the forward before the onload hook runs (else block 0 would stay on the GPU,
    and a later forward would put back its stale host copy over what pruning wrote)."""
    model = _Toy()
    _, blocks = find_blocks(model)
    place_onloaded(model, blocks, torch.device("meta"))
    seen = []
    blocks[0].register_forward_pre_hook(lambda m, a: seen.append(1))
    inputs, _ = capture_block_inputs(model, torch.zeros(2, 4, dtype=torch.long), offload="meta")
    assert len(inputs) == 2 and _devices(blocks) == ["cpu"] * 3 and not seen


def test_onloaded_moves_a_host_block_and_only_that():
    model = _Toy()
    _, blocks = find_blocks(model)
    before = _snapshot(blocks)
    with onloaded(blocks[1], torch.device("meta"), write_back=False):
        assert _devices(blocks) == ["cpu", "meta", "cpu"]
    assert _devices(blocks) == ["cpu"] * 3
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_snapshot(blocks), before))
    with onloaded(blocks[1], torch.device("cpu")):  # a run on the CPU: nothing moves
        assert _devices(blocks) == ["cpu"] * 3


def test_onloaded_writes_back_what_the_block_changed():
    """``write_back`` copies the device tensors into the host ones: pruning done on the GPU is kept. (Here the
    device is the host itself, the copy path is exercised through a module whose data is swapped by hand.)"""
    layer = torch.nn.Linear(4, 4)
    host = layer.weight.data
    moved = layer.weight.data.clone()
    from unipruning_cli.models.onload import _release

    moved.zero_()
    layer.weight.data = moved
    _release([(layer.weight, host)], write_back=True)
    assert layer.weight.data_ptr() == host.data_ptr() and torch.count_nonzero(layer.weight) == 0


def test_weights_on_fetches_one_matrix_at_a_time():
    model = build_tiny_model("llama", 64)
    from unipruning_cli.models.loading import prunable_layers

    layers = prunable_layers(model)
    weights = weights_on(layers, torch.device("cpu"))
    assert list(weights) == list(layers) and len(weights) == len(layers)
    name = next(iter(layers))
    assert weights[name].data_ptr() == layers[name].weight.data_ptr()  # same device: no copy
    assert weights_on(layers, torch.device("meta"))[name].device.type == "meta"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_loss_equals_the_full_logits_loss(arch):
    torch.manual_seed(0)
    model = build_tiny_model(arch, 97)
    windows = torch.randint(0, 97, (5, 33))
    full = window_nlls(model, windows, batch_size=2)
    for chunk in (4 * 2 * 97 * 1, 4 * 2 * 97 * 7, 4 * 2 * 97 * 32):  # 1, 7 and 32 positions per chunk
        assert torch.allclose(window_nlls(model, windows, batch_size=2, chunk_bytes=chunk), full, rtol=1e-6, atol=1e-6)


def test_a_batch_that_fits_is_one_pass_bit_for_bit():
    model = build_tiny_model("llama", 97)
    windows = torch.randint(0, 97, (4, 16))
    logits = model(windows, use_cache=False).logits.float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), windows[:, 1:].reshape(-1),
                                            reduction="none").view(4, -1).mean(1)
    assert torch.equal(window_nlls(model, windows, batch_size=4), ref)


def test_chunk_positions():
    assert chunk_positions(4, 4096, 152_064) == 2**30 // (16 * 152_064) == 441
    assert chunk_positions(1, 16, 100) == 16  # everything fits: one pass
    assert chunk_positions(64, 4096, 2**24) == 1  # never zero


def test_placement_checks(frozen_search_cfg):
    from unipruning_cli.core.config import validate_values
    from unipruning_cli.core.errors import UserError

    cfg = frozen_search_cfg("model.placement=onload")
    validate_values(cfg)  # frozen search: block-wise, fine
    with pytest.raises(UserError, match="drift search backpropagates"):
        validate_values(frozen_search_cfg("model.placement=onload", "schedule.weight_mode=drift"))
    with pytest.raises(UserError, match="choose one"):
        validate_values(frozen_search_cfg("model.placement=onload", "model.device_map=auto"))
    with pytest.raises(UserError, match="model.max_memory"):
        validate_values(frozen_search_cfg("+model.max_memory.cpu=10GiB"))
    with pytest.raises(UserError, match="model.placement"):
        validate_values(frozen_search_cfg("model.placement=gpu"))
