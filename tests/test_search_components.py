"""Pieces of the drift search checked on their own against independent references.

- ``alignment_grad`` (the ρ term) against autograd of ½‖Γ − S(W)‖² in float64, for the metrics where S is
  exactly linear in |W| (magnitude, Wanda) and for RIA with its row/column normalisers held fixed (what the
  docstring promises: S treated as locally linear in |W|).
- ``StepStats`` (the per-step statistics hooks) against Σx² and token counts computed by hand from the inputs
  of every Linear, captured by a plain forward, on a tiny random Llama; with activation checkpointing on,
  so the blocks recomputed in the backward pass must not be counted twice.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import linears
from unipruning_cli.metrics import build_metric
from unipruning_cli.search.mirror_descent import alignment_grad
from unipruning_cli.search.recompute import StepStats, activation_checkpointing
from unipruning_cli.data.stats import ActivationStats

# --------------------------------------------------------------------------------------------- alignment gradient


def _weight_and_stats(seed: int = 0) -> tuple[torch.Tensor, ActivationStats, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    w[3, 5] = 0.0  # |w| has no derivative at 0: both sides take the subgradient 0
    w[7, :4] = 0.0
    sq_sum = torch.rand(20, generator=g, dtype=torch.float64) * 4 + 0.2
    gamma = torch.randn(12, 20, generator=g, dtype=torch.float64)
    return w, ActivationStats(sq_sum=sq_sum, count=5), gamma


def _s_magnitude(w: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    return w.abs()


def _s_wanda(w: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    return w.abs() * stats.sq_sum.sqrt()[None, :]


def _s_ria_fixed_normalisers(w: torch.Tensor, stats: ActivationStats) -> torch.Tensor:
    a = w.detach().abs()
    factor = 1.0 / a.sum(0, keepdim=True) + 1.0 / a.sum(1, keepdim=True)  # held fixed: no gradient through it
    return w.abs() * factor * stats.sq_sum.sqrt()[None, :] ** 0.5


S_OF = {"magnitude": _s_magnitude, "wanda": _s_wanda, "ria": _s_ria_fixed_normalisers}


def _autograd_alignment(w: torch.Tensor, stats: ActivationStats, gamma: torch.Tensor, s_of) -> torch.Tensor:
    w = w.clone().requires_grad_(True)
    (0.5 * (gamma - s_of(w, stats)).pow(2).sum()).backward()
    return w.grad


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "ria"])
def test_alignment_grad_is_the_gradient_of_half_the_squared_distance(metric: str) -> None:
    w, stats, gamma = _weight_and_stats()
    expected = _autograd_alignment(w, stats, gamma, S_OF[metric])
    assert expected.abs().max() > 0.1  # a non-trivial gradient, both signs
    assert (expected > 0).any() and (expected < 0).any()
    # S as the search computes it (the package's metric, fp32), and S in float64 straight from the formula
    for score in (build_metric(metric).score(w, stats), S_OF[metric](w, stats).detach()):
        got = alignment_grad(w, gamma, score)
        assert got.dtype == w.dtype
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert torch.all(got[w == 0] == 0)


def test_alignment_grad_vanishes_where_gamma_equals_the_metric() -> None:
    w, stats, _ = _weight_and_stats(1)
    score = build_metric("wanda").score(w, stats)
    assert torch.equal(alignment_grad(w.float(), score, score), torch.zeros(w.shape))


# --------------------------------------------------------------------------------------------- step statistics


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    return model, windows


@torch.no_grad()
def _captured_inputs(model, layers: dict, windows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every Linear's input of a plain forward of each window, as [tokens, in] float64."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [lin.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(
        args[0].reshape(-1, args[0].shape[-1]).double().clone())) for n, lin in layers.items()]
    try:
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _by_hand(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    x = torch.cat(inputs)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for row in x:  # Σ over tokens of x_j², one token at a time
        sq += row * row
    return sq, x.shape[0]


def test_step_stats_match_a_captured_forward(tiny_llama) -> None:
    """Two search steps as the drift loop runs them (forward + backward under activation checkpointing, two
    windows accumulated in step 1, one in step 2): each ``take()`` returns exactly that step's Σx² and tokens."""
    model, windows = tiny_llama
    layers = linears(model)
    reference = _captured_inputs(model, layers, windows)
    steps = [(0, 2), (2, 3)]

    calls = {"n": 0}  # an independent hook on one Linear: proves the blocks really are recomputed in backward
    probe = next(iter(layers.values())).register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    model.requires_grad_(False)
    for lin in layers.values():
        lin.weight.requires_grad_(True)
    hooks = StepStats(layers)
    blocks = activation_checkpointing(model, True)
    taken = []
    try:
        assert blocks, "activation checkpointing did not switch on: the recomputation path is not exercised"
        for lo, hi in steps:
            for w in windows[lo:hi]:
                x = w[None]
                model(input_ids=x, labels=x, use_cache=False).loss.backward()
            taken.append(hooks.take())
    finally:
        hooks.remove()
        activation_checkpointing(model, False, blocks)
        probe.remove()
        model.requires_grad_(False)
    assert calls["n"] == 2 * len(windows)  # once in the forward, once recomputed in the backward

    for (lo, hi), stats in zip(steps, taken):
        assert list(stats) == list(layers)
        for n, s in stats.items():
            sq, tokens = _by_hand(reference[n][lo:hi])
            assert s.count == tokens == (hi - lo) * windows.shape[1], n
            assert s.sq_sum.dtype == torch.float64 and s.sq_sum.shape == sq.shape
            assert sq.min() > 0
            torch.testing.assert_close(s.sq_sum, sq, rtol=1e-5, atol=0.0)
            torch.testing.assert_close(s.mean_sq, (sq / tokens).float(), rtol=1e-5, atol=0.0)

    # removed hooks see nothing more
    with torch.no_grad():
        model(input_ids=windows[:1], use_cache=False)
    after = hooks.take()
    assert all(s.count == 0 and not s.sq_sum.any() for s in after.values())
