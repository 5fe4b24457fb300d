"""Block-wise calibration against hooks on ordinary full-model forwards.

The reference never runs blocks by hand: it registers forward pre-hooks on every Linear of the
decoder blocks and calls the model as a user would, window by window. Block-wise capture must see
exactly the same inputs (same rotary embeddings, masks, positions).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from unipruning_cli.data.calibration import calibrate_blockwise


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NSAMPLES, SEQLEN = 4, 24


@pytest.fixture(scope="module")
def model_and_windows(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(123)
    windows = torch.randint(0, model.config.vocab_size, (NSAMPLES, SEQLEN), generator=g)
    return model, windows


def _linears(model) -> dict[str, nn.Linear]:
    """Every Linear inside model.model.layers, named as the model names it (independent of models.py)."""
    return {f"model.layers.{i}.{n}": m for i, block in enumerate(model.model.layers)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def _reference(model, windows, only: str | None = None, hessian: bool = False):
    """sq_sum (fp64), count and Σ xᵀx (fp64) of every Linear's input over full forwards."""
    sq, count, xtx, handles = {}, {}, {}, []
    for name, lin in _linears(model).items():
        if only is not None and not name.startswith(only):
            continue

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
            count[name] = count.get(name, 0) + x.shape[0]
            if hessian:
                xtx[name] = xtx.get(name, 0) + x.t() @ x

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        for w in windows:
            model(w.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return sq, count, xtx


def _assert_stats_equal(stats, ref_sq, ref_count, names):
    for name in names:
        s = stats[name]
        assert s.count == ref_count[name] == NSAMPLES * SEQLEN, name
        assert s.sq_sum.shape == ref_sq[name].shape, name
        torch.testing.assert_close(s.sq_sum.double(), ref_sq[name], rtol=1e-4, atol=1e-8, msg=name)


def _zero_half(layers: dict[str, nn.Linear]) -> None:
    """The 'pruning' of the sequential test: zero every other input column of each layer."""
    for lin in layers.values():
        lin.weight.data[:, ::2] = 0.0


def test_one_shot_stats_equal_full_forward_hooks(model_and_windows):
    model, windows = model_and_windows
    before = {n: p.clone() for n, p in model.state_dict().items()}
    stats = calibrate_blockwise(model, windows)
    ref_sq, ref_count, _ = _reference(model, windows)
    assert set(stats) == set(_linears(model))
    assert len(stats) == 7 * len(model.model.layers)
    _assert_stats_equal(stats, ref_sq, ref_count, stats)
    # calibration alone does not touch the model
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_sequential_sees_pruned_earlier_blocks(model_and_windows):
    base, windows = model_and_windows
    model = copy.deepcopy(base)
    seen = []

    def on_block(i, layers, stats):
        seen.append((i, sorted(layers)))
        assert set(stats) == set(layers)
        _zero_half(layers)

    stats = calibrate_blockwise(model, windows, sequential=True, on_block=on_block)
    n_blocks = len(base.model.layers)
    assert [i for i, _ in seen] == list(range(n_blocks))
    for i, names in seen:
        assert names == sorted(n for n in _linears(base) if n.startswith(f"model.layers.{i}."))

    for i in range(n_blocks):
        # reference: a fresh copy whose blocks < i were zeroed the same way, full forward
        ref_model = copy.deepcopy(base)
        for j in range(i):
            _zero_half({n: m for n, m in ref_model.model.layers[j].named_modules() if isinstance(m, nn.Linear)})
        prefix = f"model.layers.{i}."
        ref_sq, ref_count, _ = _reference(ref_model, windows, only=prefix)
        _assert_stats_equal(stats, ref_sq, ref_count, [n for n in stats if n.startswith(prefix)])

    # and it differs from the dense statistics for block 1 (so the check above has teeth)
    dense_sq, _, _ = _reference(base, windows, only="model.layers.1.")
    name = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(stats[name].sq_sum.double(), dense_sq[name], rtol=1e-3)


def test_one_shot_with_a_pruning_callback_still_sees_dense_inputs(model_and_windows):
    base, windows = model_and_windows
    model = copy.deepcopy(base)
    stats = calibrate_blockwise(model, windows, sequential=False, on_block=lambda i, layers, s: _zero_half(layers))
    ref_sq, ref_count, _ = _reference(base, windows)
    _assert_stats_equal(stats, ref_sq, ref_count, stats)
    # the callback did prune every block
    for lin in _linears(model).values():
        assert bool((lin.weight[:, ::2] == 0).all())


def test_hessian_in_callback_equals_sum_of_xtx(model_and_windows):
    model, windows = model_and_windows
    captured = {}

    def on_block(i, layers, stats):
        for n, s in stats.items():
            assert s.xtx is not None, n
            captured[n] = s.xtx.detach().clone()

    stats = calibrate_blockwise(model, windows, want_hessian=True, on_block=on_block)
    _, _, ref_xtx = _reference(model, windows, hessian=True)
    assert set(captured) == set(ref_xtx) == set(stats)
    for n, got in captured.items():
        ref = ref_xtx[n]
        assert got.shape == ref.shape == (model.get_submodule(n).in_features,) * 2
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=n)
        # its diagonal is the per-channel sum of squares
        torch.testing.assert_close(stats[n].sq_sum.double(), ref.diagonal(), rtol=1e-4, atol=1e-8)
    # dropped after the callback
    assert all(s.xtx is None for s in stats.values())


def test_per_sample_statistics(model_and_windows):
    model, windows = model_and_windows
    stats = calibrate_blockwise(model, windows, want_per_sample=True)
    name = "model.layers.2.mlp.down_proj"
    per_window = []
    for w in windows:
        sq, count, _ = _reference(model, w.unsqueeze(0), only=name)
        per_window.append(sq[name] / count[name])
    torch.testing.assert_close(stats[name].sample_mean_sq.double(), torch.stack(per_window), rtol=1e-4, atol=1e-8)


def test_shared_inputs_give_the_same_statistics_as_per_layer_ones(model_and_windows):
    """q/k/v and gate/up read one tensor: sharing its XᵀX must change nothing, bit for bit."""
    model, windows = model_and_windows
    got, ref = {}, {}

    def keep(into):
        def on_block(i, layers, stats):
            into.update({n: (s.sq_sum.clone(), s.xtx.clone(), s.count) for n, s in stats.items()})
        return on_block

    calibrate_blockwise(model, windows, want_hessian=True, want_per_sample=True, on_block=keep(got))
    calibrate_blockwise(model, windows, want_hessian=True, want_per_sample=True, on_block=keep(ref),
                        share_inputs=False)
    assert set(got) == set(ref)
    for n in got:
        assert torch.equal(got[n][0], ref[n][0]) and torch.equal(got[n][1], ref[n][1]), n
        assert got[n][2] == ref[n][2]


def test_shared_inputs_memo_hits_same_tensor_and_misses_after_in_place_change():
    from unipruning_cli.data.calibration import SharedInputs

    shared = SharedInputs()
    x = torch.randn(3, 5, 4)
    first = shared.get(x, want_hessian=True)
    assert shared.get(x, want_hessian=True) is first            # q/k/v: computed once
    assert shared.get(x.clone(), want_hessian=True) is not first  # another tensor, equal values
    y = torch.randn(2, 4)
    a = shared.get(y, want_hessian=True)
    y.mul_(2.0)                                                  # modified in place: stale
    b = shared.get(y, want_hessian=True)
    assert b is not a
    torch.testing.assert_close(b[1], 4.0 * a[1])
    torch.testing.assert_close(b[0], (y * y).sum(0))
    assert b[2] == 2
    off = SharedInputs(enabled=False)
    assert off.get(x, True) is not off.get(x, True)
