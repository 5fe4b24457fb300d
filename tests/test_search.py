"""The UniPruning search against the unit tests of spec §9 and plain references."""

from __future__ import annotations

import copy

import pytest
import torch

from unipruning_cli.pruning import masks as M
from unipruning_cli.data.calibration import calibrate_blockwise
from unipruning_cli.metrics import build_metric
from unipruning_cli.pruning.targets import Target
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.search import L1Prox, SearchSettings, quantile, search_drift, search_frozen, soft_threshold
from unipruning_cli.search import frozen as FZ
from unipruning_cli.search import mirror_descent as MD
from unipruning_cli.data.stats import ActivationStats

from _helpers import build_tiny_model


# --------------------------------------------------------------------------------------------- prox


@pytest.mark.parametrize("n", [1, 2, 9, 1000, 4097])
@pytest.mark.parametrize("q", [0.0, 1e-3, 1e-2, 0.25, 0.5, 0.9, 1.0])
def test_quantile_matches_torch(n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(quantile(x, q), torch.quantile(x, q))


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 0.1, 0.37])
def test_quantile_soft_threshold_zeroes_the_lambda_fraction(lam):
    """Distinct values: τ lies between order statistics lo and lo+1, so exactly lo+1 entries are zeroed."""
    v = torch.randn(100, 73, generator=torch.Generator().manual_seed(3))
    gamma = L1Prox(lam, "quantile")(v)
    n = v.numel()
    pos = lam * (n - 1)
    expected = int(pos) + 1 if pos != int(pos) else int(pos) + 1
    assert int((gamma == 0).sum()) == expected
    # survivors keep their sign and shrink by the same τ: ranking of |Γ| equals ranking of |V|
    kept = gamma != 0
    tau = (v.abs() - gamma.abs())[kept]
    torch.testing.assert_close(tau, torch.full_like(tau, float(tau[0])))
    assert torch.equal(gamma.sign()[kept], v.sign()[kept])


def test_absolute_threshold_and_lambda_zero():
    v = torch.tensor([[-0.5, 0.05, 0.2, -0.01]])
    torch.testing.assert_close(L1Prox(0.1, "absolute")(v), torch.tensor([[-0.4, 0.0, 0.1, 0.0]]))
    assert torch.equal(L1Prox(0.0)(v), v)
    torch.testing.assert_close(soft_threshold(v, 0.0), v)


# --------------------------------------------------------------------------------------------- frozen


def _stats(in_features: int, nsamples: int, seed: int) -> ActivationStats:
    gen = torch.Generator().manual_seed(seed)
    per_sample = torch.rand(nsamples, in_features, generator=gen) * 4
    tokens = 16
    return ActivationStats(sq_sum=(per_sample.double() * tokens).sum(0), count=tokens * nsamples,
                           sample_mean_sq=per_sample)


def test_frozen_lambda_zero_is_the_closed_form_ema(tmp_path):
    """λ = 0: Γ_N = Σ_n α(1−α)^{N−1−n} S_n (spec §1.5), S_n the metric on sample n mod nsamples."""
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(5, 8, generator=gen), "b": torch.randn(3, 6, generator=gen)}
    stats = {"a": _stats(8, 4, 1), "b": _stats(6, 4, 2)}
    metric = build_metric("wanda")
    settings = SearchSettings(steps=7, dual_step=0.1, weight_mode="frozen")
    gamma, _ = search_frozen(weights, stats, metric, L1Prox(0.0), settings, tmp_path / "ck.safetensors", "fp",
                             tmp_path / "search.jsonl")
    for name, w in weights.items():
        s = stats[name]
        ref = torch.zeros_like(w, dtype=torch.float64)
        for n in range(settings.steps):
            mean_sq = s.sample_mean_sq[n % 4].double()
            s_n = w.double().abs() * (mean_sq * 16).sqrt()  # Wanda with that sample's statistics
            ref += settings.dual_step * (1 - settings.dual_step) ** (settings.steps - 1 - n) * s_n
        torch.testing.assert_close(gamma[name].double(), ref, rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "search.jsonl").read_text().splitlines()
    assert len(rows) == settings.steps


def test_frozen_resume_is_bit_exact(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(6, 8, generator=gen) for i in range(5)}
    stats = {n: _stats(8, 3, i) for i, n in enumerate(weights)}
    metric = build_metric("stochria")
    settings = SearchSettings(steps=5, weight_mode="frozen", checkpoint_every=2)
    prox = L1Prox(1e-2)
    full, _ = search_frozen(weights, stats, metric, prox, settings, tmp_path / "a.safetensors", "fp", tmp_path / "a.jsonl")

    real = FZ._search_one_frozen

    def crash_at_3(i, *args, **kwargs):
        if i == 3:
            raise KeyboardInterrupt
        return real(i, *args, **kwargs)

    monkeypatch.setattr(FZ, "_search_one_frozen", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        search_frozen(weights, stats, metric, prox, settings, tmp_path / "b.safetensors", "fp", tmp_path / "b.jsonl")
    monkeypatch.setattr(FZ, "_search_one_frozen", real)
    calls = []
    monkeypatch.setattr(FZ, "_search_one_frozen", lambda i, *a, **k: calls.append(i) or real(i, *a, **k))
    resumed, _ = search_frozen(weights, stats, metric, prox, settings, tmp_path / "b.safetensors", "fp",
                               tmp_path / "b.jsonl")
    assert calls == [2, 3, 4]  # layers 0-1 came from the checkpoint
    for n in weights:
        assert torch.equal(full[n], resumed[n])


def test_frozen_search_scores_with_the_cyclic_sampler_when_auto(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(6, 8, generator=gen) for i in range(3)}
    stats = {n: _stats(8, 3, i) for i, n in enumerate(weights)}
    settings = SearchSettings(steps=4, weight_mode="frozen")

    def run(sampler: str) -> dict:
        return search_frozen(weights, stats, build_metric("stochria", sampler=sampler), L1Prox(1e-2), settings,
                             tmp_path / f"{sampler}.safetensors", "fp", tmp_path / f"{sampler}.jsonl")[0]

    auto, cyclic, exact = run("auto"), run("cyclic"), run("exact")
    assert all(torch.equal(auto[n], cyclic[n]) for n in weights)
    assert not all(torch.equal(auto[n], exact[n]) for n in weights)


# --------------------------------------------------------------------------------------------- drift


@pytest.fixture()
def tiny_llama_and_windows(tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer))
    windows = torch.randint(3, len(tiny_tokenizer), (5, 24), generator=torch.Generator().manual_seed(0))
    return model, windows


def _drift(model, windows, tmp_path, tag, **kw):
    settings = SearchSettings(**{"steps": 6, "lr": 1e-2, "checkpoint_every": 2, **kw})
    return search_drift(model, prunable_layers(model), windows, build_metric("stochria"), L1Prox(1e-3), settings,
                        tmp_path / f"{tag}.safetensors", "fp", tmp_path / f"{tag}.jsonl")


def test_drift_restores_weights_bit_exactly_and_weights_did_move(tiny_llama_and_windows, tmp_path):
    model, windows = tiny_llama_and_windows
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # flags of non-prunable parameters are restored as found
    before = copy.deepcopy(model.state_dict())
    moved = []
    real = MD._weight_step

    def spy(accumulated, opt):
        w = opt.param_groups[0]["params"][0]
        w0 = w.detach().clone()
        real(accumulated, opt)
        moved.append(not torch.equal(w0, w.detach()))

    MD._weight_step, saved = spy, MD._weight_step
    try:
        gamma, bpp = _drift(model, windows, tmp_path, "a")
    finally:
        MD._weight_step = saved
    assert any(moved), "AdamW never changed W during the drift search"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    assert set(gamma) == set(prunable_layers(model))
    assert bpp > 8


def test_drift_at_lr_zero_is_the_frozen_search_and_drift_is_not(tiny_llama_and_windows, tmp_path):
    """The drift is the only channel of global feedback. With lr = 0, W never moves, so the drift search's step
    metrics (its own hooks, one window per step) are the frozen search's (per-sample calibration statistics of
    the same windows): same Γ. With lr > 0 Γ differs from the frozen search's."""
    model, windows = tiny_llama_and_windows
    layers = prunable_layers(model)
    stats = calibrate_blockwise(model, windows, want_per_sample=True)
    settings = SearchSettings(steps=6, dual_step=0.1, weight_mode="frozen")
    frozen, _ = search_frozen({n: m.weight.detach() for n, m in layers.items()}, stats, build_metric("wanda"),
                              L1Prox(0.0), settings, tmp_path / "f.safetensors", "fp", tmp_path / "f.jsonl")

    def drift(lr, tag):
        return search_drift(model, layers, windows, build_metric("wanda"), L1Prox(0.0),
                            SearchSettings(steps=6, dual_step=0.1, lr=lr, checkpoint_every=100),
                            tmp_path / f"{tag}.safetensors", "fp", tmp_path / f"{tag}.jsonl")[0]

    still, moving = drift(0.0, "still"), drift(1e-2, "moving")
    for n in frozen:
        torch.testing.assert_close(still[n], frozen[n], rtol=1e-5, atol=1e-7)
    assert all(frozen[n].abs().sum() > 0 for n in frozen)
    assert any(not torch.allclose(moving[n], frozen[n], rtol=1e-3) for n in frozen)


def test_drift_resume_is_bit_exact(tiny_llama_and_windows, tmp_path, monkeypatch):
    model, windows = tiny_llama_and_windows
    full, _ = _drift(model, windows, tmp_path, "full")

    real = MD._lm_backward

    def crash_at_5(model_, windows_, step, settings):
        if step == 4:
            raise KeyboardInterrupt
        return real(model_, windows_, step, settings)

    monkeypatch.setattr(MD, "_lm_backward", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        _drift(model, windows, tmp_path, "cut")
    monkeypatch.setattr(MD, "_lm_backward", real)
    resumed, _ = _drift(model, windows, tmp_path, "cut")
    for n in full:
        assert torch.equal(full[n], resumed[n]), n
    rows = (tmp_path / "cut.jsonl").read_text().splitlines()
    assert [int(r.split('"step": ')[1].split(",")[0]) for r in rows] == list(range(1, 7))


def test_rho_and_gradient_accumulation_each_change_gamma(tiny_llama_and_windows, tmp_path):
    """Each knob is live (their exact effect is checked against the hand-written loop in test_drift_reference.py)."""
    model, windows = tiny_llama_and_windows
    base, _ = _drift(model, windows, tmp_path, "base")
    for i, knobs in enumerate(({"rho": 1.0}, {"accumulate_grads_across_steps": False}, {"grad_accumulation": 2},
                               {"decay": "cosine"}, {"grad_clip": None}, {"grad_clip_scope": "prunable"})):
        other, _ = _drift(model, windows, tmp_path, f"other{i}", **knobs)
        assert all(torch.isfinite(g).all() for g in other.values())
        assert any(not torch.equal(base[n], other[n]) for n in base), knobs


# --------------------------------------------------------------------------------------------- masks from Γ


def test_masks_from_one_gamma_nest_and_hit_counts(tiny_llama_and_windows):
    model, windows = tiny_llama_and_windows
    layers = prunable_layers(model)
    stats = calibrate_blockwise(model, windows, want_per_sample=True)
    gamma = {n: build_metric("wanda").score(m.weight, stats[n]) for n, m in layers.items()}
    scores = {n: g.abs() for n, g in gamma.items()}
    for allocation in ("per_row", "per_matrix", "global"):
        prev = None
        for s in (0.3, 0.5, 0.7):
            masks = Target(s, allocation).cut(scores)
            total = sum(m.numel() for m in masks.values())
            pruned = sum(int((~m).sum()) for m in masks.values())
            if allocation == "global":
                assert pruned == M.num_pruned(total, s)
            if prev is not None:
                assert all(bool((masks[n] & ~prev[n]).sum() == 0) for n in masks), "higher sparsity is not nested"
            prev = masks
    nm = Target(0.5, n=2, m=4).cut(scores)
    assert all(bool((m.view(m.shape[0], -1, 4).sum(-1) == 2).all()) for m in nm.values())


def test_drift_dtype_float32_drifts_an_fp32_master_copy_of_bf16_weights(tiny_llama_and_windows, tmp_path):
    """bf16 weights: the master copy (fp32 W, gradient, Adam m and v) changes Γ, because small weights that a bf16
    step cannot move do move in fp32; the model is handed back in bf16, bit for bit as it was."""
    model, windows = tiny_llama_and_windows
    model = copy.deepcopy(model).to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    dtypes = []
    real = MD._weight_step

    def spy(accumulated, opt):
        w = opt.param_groups[0]["params"][0]
        dtypes.append((w.dtype, w.grad.dtype, opt.state[w].get("exp_avg", w).dtype))
        real(accumulated, opt)

    MD._weight_step, saved = spy, MD._weight_step
    try:
        master, bpp_master = _drift(model, windows, tmp_path, "master", drift_dtype="float32", lr=1e-4)
    finally:
        MD._weight_step = saved
    assert set(dtypes) == {(torch.float32, torch.float32, torch.float32)}
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    own, bpp_own = _drift(model, windows, tmp_path, "own", lr=1e-4)
    assert all(torch.isfinite(g).all() for g in master.values())
    assert any(not torch.equal(master[n], own[n]) for n in own)
    assert bpp_master - bpp_own == 3 * (4 - 2)  # gradient, m and v in fp32 instead of bf16


def test_drift_dtype_float32_on_fp32_weights_changes_nothing(tiny_llama_and_windows, tmp_path):
    model, windows = tiny_llama_and_windows
    a, _ = _drift(model, windows, tmp_path, "a", drift_dtype="float32")
    b, _ = _drift(model, windows, tmp_path, "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
