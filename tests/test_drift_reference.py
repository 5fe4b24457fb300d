"""The drift search against a plain, hand-written reference of its steps, bit for bit in fp32 on the CPU.

The reference is the loop as the UniPruning reference code orders it (spec §1.2-1.3, §5.3): per step the LM
loss's gradient (``grad_accumulation`` windows) accumulated across steps, clipped to a global norm over every
parameter of the model (HF Trainer's ``clip_grad_norm_(model.parameters())``; over the prunable weights only with
``grad_clip_scope=prunable``); every step metric S on the pre-update W from that step's activation statistics;
AdamW with the warm-up then linear/cosine/constant schedule, written out by hand below (plus ρ times the
alignment gradient for this step only); then V ← V + α(S − Γ) and Γ ← prox(V) per matrix. The search does the
same work one matrix at a time (only one S alive): the results must not differ by one bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import build_tiny_model
from unipruning_cli.metrics import build_metric
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.search import L1Prox, SearchSettings, search_drift
from unipruning_cli.search.mirror_descent import alignment_grad
from unipruning_cli.data.stats import ActivationStats


def lr_factor(s: SearchSettings, step: int) -> float:
    """HF's schedules by hand: a linear ramp over ceil(warmup_ratio * steps), then linear to 0, half a cosine to 0,
    or constant (transformers.optimization, get_{linear,cosine,constant}_schedule_with_warmup)."""
    warm = math.ceil(s.warmup_ratio * s.steps)
    if step < warm:
        return step / max(1, warm)
    if s.decay == "constant":
        return 1.0
    progress = (step - warm) / max(1, s.steps - warm)
    if s.decay == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (s.steps - step) / max(1, s.steps - warm))


def reference_drift(model, windows, metric, prox: L1Prox, s: SearchSettings,
                    metric_after_step: bool = False) -> dict[str, torch.Tensor]:
    layers = prunable_layers(model)
    names = list(layers)
    params = [layers[n].weight for n in names]
    w0 = [p.detach().clone() for p in params]
    model.requires_grad_(s.grad_clip_scope == "model")  # the reference computes every parameter's gradient
    clipped = [p for p in model.parameters() if p.requires_grad] if s.grad_clip_scope == "model" else params
    for p in params:
        p.requires_grad_(True)
    for p in {id(p): p for p in [*params, *clipped]}.values():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(s, step))
    gen = torch.Generator().manual_seed(s.seed)
    prox_gen = torch.Generator().manual_seed((1 << 40) + s.seed)
    v = {n: torch.zeros(layers[n].weight.shape) for n in names}
    gamma = {n: torch.zeros(layers[n].weight.shape) for n in names}
    sums = {n: torch.zeros(layers[n].in_features, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(0).double()
            counts[name] += x.shape[0]
        return fn

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    for step in range(s.steps):
        for n in names:
            sums[n].zero_()
            counts[n] = 0
        k = s.grad_accumulation
        for j in range(k):
            x = windows[(step * k + j) % windows.shape[0]].unsqueeze(0)
            (model(input_ids=x, labels=x, use_cache=False).loss / k).backward()
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(clipped, s.grad_clip)
        if metric_after_step:  # a deliberate bug, for the test below
            opt.step()
        metric_s = {n: metric.score(layers[n].weight, ActivationStats(sq_sum=sums[n].clone(), count=counts[n]),
                                    generator=gen if metric.stochastic else None) for n in names}
        acc = [p.grad for p in params]
        if s.rho:  # this step's gradient: the accumulated one plus the ρ term; the accumulator stays as it was
            for p, n in zip(params, names):
                p.grad = p.grad + s.rho * alignment_grad(p, gamma[n], metric_s[n])
        if not metric_after_step:
            opt.step()
        for p, a in zip(params, acc):
            p.grad = a
        sched.step()
        if not s.accumulate_grads_across_steps:
            for p in clipped:
                p.grad.zero_()
        for n in names:
            v[n].add_(metric_s[n] - gamma[n], alpha=s.dual_step)
            gamma[n] = prox(v[n], prox_gen)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    for p in model.parameters():
        p.grad = None
    return gamma


@pytest.mark.parametrize("metric_name, rho, recompute, search_state, knobs", [
    ("stochria", 0.0, True, "device", {}),
    # warm-up 1 of 4 steps: the schedules differ at step 2, whose update the last step's metric sees
    ("wanda", 1e-2, True, "device", {"decay": "cosine", "warmup_ratio": 0.25}),
    ("ria", 0.0, True, "device", {"decay": "constant", "grad_clip_scope": "prunable", "warmup_ratio": 0.25}),
    ("wanda", 0.0, False, "device", {"grad_clip": None, "grad_accumulation": 2}),
    ("stochria", 1e-2, True, "host", {"accumulate_grads_across_steps": False, "grad_clip": 0.05}),
])
def test_drift_search_equals_the_reference_bit_for_bit(metric_name, rho, recompute, search_state, knobs,
                                                       tiny_tokenizer, tmp_path):
    """With activation checkpointing (recompute) the statistics hooks must count each block once."""
    torch.set_num_threads(1)
    windows = torch.randint(3, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(1))
    settings = SearchSettings(**{"steps": 4, "lr": 5e-2, "warmup_ratio": 0.5, "dual_step": 0.1, "rho": rho,
                                 "checkpoint_every": 100, "activation_checkpointing": recompute,
                                 "search_state": search_state, **knobs})
    prox = L1Prox(0.1)
    model = build_tiny_model("llama", len(tiny_tokenizer))
    expected = reference_drift(model, windows, build_metric(metric_name), prox, settings)
    model = build_tiny_model("llama", len(tiny_tokenizer))
    got, _ = search_drift(model, prunable_layers(model), windows, build_metric(metric_name), prox, settings,
                          tmp_path / "c.safetensors", "fp", tmp_path / "s.jsonl")
    assert got.keys() == expected.keys()
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    assert any(bool((g != 0).any()) for g in got.values())


def test_the_comparison_tells_a_wrong_order_from_the_right_one(tiny_tokenizer):
    """Scoring W after the weight step (a plausible bug) gives another Γ on this setup, so the bit-for-bit
    comparison above would catch a search that did it."""
    torch.set_num_threads(1)
    windows = torch.randint(3, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(1))
    settings = SearchSettings(steps=3, lr=5e-2, warmup_ratio=0.5, dual_step=0.1, checkpoint_every=100)
    runs = [reference_drift(build_tiny_model("llama", len(tiny_tokenizer)), windows, build_metric("wanda"),
                            L1Prox(0.1), settings, metric_after_step=after) for after in (False, True)]
    assert any(not torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_activation_checkpointing_is_on_for_the_search_and_off_after_it(tiny_tokenizer):
    from unipruning_cli.search import recompute as MD

    model = build_tiny_model("llama", len(tiny_tokenizer))
    blocks = MD.activation_checkpointing(model, True)
    assert len(blocks) == 3 and all(b.training and b.gradient_checkpointing for b in blocks)
    assert not model.training and not blocks[0].self_attn.training  # no dropout anywhere
    MD.activation_checkpointing(model, False, blocks)
    assert not any(m.training for m in model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not hasattr(model, "_require_grads_hook")


def test_no_activation_checkpointing_where_a_dropout_would_fire(tiny_tokenizer):
    from unipruning_cli.search import recompute as MD

    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.config.attention_dropout = 0.1
    assert MD.activation_checkpointing(model, True) == []
    assert not any(m.training for m in model.modules())


def test_a_search_with_v_and_gamma_on_the_host_resumes_bit_exactly(tiny_tokenizer, tmp_path, monkeypatch):
    from unipruning_cli.search import mirror_descent as MD

    torch.set_num_threads(1)
    windows = torch.randint(3, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(1))
    settings = SearchSettings(steps=4, lr=5e-2, dual_step=0.1, checkpoint_every=2, search_state="host")

    def run(tag):
        model = build_tiny_model("llama", len(tiny_tokenizer))
        return search_drift(model, prunable_layers(model), windows, build_metric("stochria"), L1Prox(0.1), settings,
                            tmp_path / f"{tag}.safetensors", "fp", tmp_path / f"{tag}.jsonl")[0]

    full = run("full")
    real = MD._lm_backward

    def interrupted_in_step_3(*args):  # args: model, windows, step (0-based), settings
        if args[2] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(MD, "_lm_backward", interrupted_in_step_3)
    with pytest.raises(KeyboardInterrupt):  # after the checkpoint of step 2
        run("cut")
    monkeypatch.setattr(MD, "_lm_backward", real)
    resumed = run("cut")
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_the_rho_term_leaves_no_rounding_error_in_the_accumulated_gradient(tiny_tokenizer, tmp_path):
    """bf16 with lr = 0, so W stays put and both runs see the same LM gradients: the accumulated gradient in the
    step-2 checkpoint of a ρ > 0 run equals the ρ = 0 run's bit for bit. Adding ρ·∂/∂W ½‖Γ − S‖² to the
    accumulator for the step and subtracting it after would leave its bf16 rounding error there."""
    from unipruning_cli.search.state import Checkpoint

    torch.set_num_threads(1)
    windows = torch.randint(3, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(1))
    grads = {}
    for rho in (0.0, 1.0):
        model = build_tiny_model("llama", len(tiny_tokenizer)).to(torch.bfloat16)
        settings = SearchSettings(steps=3, lr=0.0, dual_step=0.5, rho=rho, checkpoint_every=2)
        ckpt = tmp_path / f"rho{rho}.safetensors"
        search_drift(model, prunable_layers(model), windows, build_metric("wanda"), L1Prox(0.1), settings, ckpt,
                     "fp", tmp_path / f"rho{rho}.jsonl")
        saved = Checkpoint.open(ckpt, "fp")
        grads[rho] = {n: saved.read(n)["grad"] for n in saved.names}
    assert all(g.dtype == torch.bfloat16 and g.abs().sum() > 0 for g in grads[0.0].values())
    assert all(torch.equal(grads[0.0][n], grads[1.0][n]) for n in grads[0.0])
