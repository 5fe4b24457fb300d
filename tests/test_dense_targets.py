"""Dense targets (``layer_target=dense``, issue 29 step 2): a sequential pass that also runs the dense model carries
``X_mᵀ X_d`` per layer, equal to the product of the inputs captured from the two models by hooks; the swaps then
lower ``‖W X_d - (W ⊙ mask) X_m‖²`` row by row, checked against that error recomputed from the tokens."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from unipruning_cli.pruning.swaps import swap_refine


def _pair(seed=0, out=10, inp=16, tokens=400):
    gen = torch.Generator().manual_seed(seed)
    xd = torch.randn(tokens, inp, generator=gen) * torch.linspace(0.3, 2.0, inp)
    xm = xd + 0.3 * torch.randn(tokens, inp, generator=gen)  # the pruned model's inputs: drifted
    w = torch.randn(out, inp, generator=gen)
    return w, xm, xd


def _dense_error(w, keep, xm, xd):
    return (xd @ w.t() - xm @ (w * keep).t()).pow(2).sum(0)


def _keep(w, xm, kind):
    score = w.abs() * xm.norm(dim=0)
    if kind == "unstructured":
        return torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.topk(w.shape[1] // 2, 1).indices, True)
    s = score.view(w.shape[0], -1, 4)
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(2, -1).indices, True).view(w.shape)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_swaps_lower_the_error_against_the_dense_output_row_by_row(kind, batch):
    w, xm, xd = _pair(1)
    keep = _keep(w, xm, kind)
    group = None if kind == "unstructured" else 4
    got = swap_refine(w, keep, xm.t() @ xm, group=group, batch=batch, cross=xm.t() @ xd)
    assert got.swaps > 0 and got.converged
    before, after = _dense_error(w, keep, xm, xd), _dense_error(w, got.keep, xm, xd)
    assert (after <= before * (1 + 1e-5)).all() and after.sum() < 0.995 * before.sum()
    assert torch.equal(got.keep.sum(1), keep.sum(1))
    if group:  # converged: no swap inside a group lowers the dense-target error
        for r in range(w.shape[0]):
            err = float(_dense_error(w[r:r + 1], got.keep[r:r + 1], xm, xd))
            for g in range(w.shape[1] // 4):
                for j, i in itertools.product(range(4 * g, 4 * g + 4), repeat=2):
                    if got.keep[r, j] or not got.keep[r, i]:
                        continue
                    k = got.keep[r].clone()
                    k[j], k[i] = True, False
                    assert float(_dense_error(w[r:r + 1], k[None], xm, xd)) >= err * (1 - 1e-4), (r, j, i)


def test_equal_inputs_make_the_dense_target_the_masked_one():
    w, xm, _ = _pair(2)
    keep = _keep(w, xm, "unstructured")
    h = xm.t() @ xm
    assert torch.equal(swap_refine(w, keep, h, cross=h).keep, swap_refine(w, keep, h).keep)


def test_a_pass_with_dense_targets_carries_the_product_of_the_two_models_inputs(tiny_llama_dir):
    """Block 0 pruned in the pass: block 1's ``cross`` is ``X_mᵀ X_d`` of the inputs hooks capture from the pruned
    and the dense model, and its ``xtx`` is the pruned model's ``X_mᵀ X_m``; the drift of block 0 is positive."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.models.loading import prunable_layers
    from unipruning_cli.pruning.block_loop import block_pass

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    dense = copy.deepcopy(model)
    windows = torch.randint(0, model.config.vocab_size, (3, 12))
    names = list(prunable_layers(model))
    first = [n for n in names if ".0." in n]
    target = next(n for n in names if ".1." in n and n.endswith("down_proj"))
    masks = {n: torch.rand(prunable_layers(model)[n].weight.shape) > 0.5 for n in first}
    seen, drift = {}, []

    def step(i, layers, stats):
        if target in layers:
            seen["cross"], seen["xtx"] = stats[target].cross.clone(), stats[target].xtx.clone()
        return {n: masks[n] for n in layers if n in masks}

    block_pass(model, windows, step, want_hessian=True, restore=True, dense_targets=True, drift=drift)

    def inputs(m):
        got = []
        handle = prunable_layers(m)[target].register_forward_pre_hook(lambda mod, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            m(windows)
        handle.remove()
        return torch.cat(got)

    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for n in first:
            prunable_layers(pruned)[n].weight.mul_(masks[n])
    xm, xd = inputs(pruned), inputs(dense)
    torch.testing.assert_close(seen["cross"], xm.t() @ xd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["xtx"], xm.t() @ xm, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seen["cross"], seen["xtx"])
    assert len(drift) == model.config.num_hidden_layers and drift[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))


def test_the_objective_study_measures_every_variant_of_a_runs_cut(tmp_path, tiny_llama_dir, corpus_files, monkeypatch):
    """scripts/study_refine_objective.py on a tiny run: one row per variant, the unrefined one with no refinement
    record, the refined ones converged with their error ratio below 1 and the dense one with its drift per block."""
    import subprocess
    import sys
    from pathlib import Path

    from _helpers import tiny_overrides
    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    run_prune(compose_prune([*tiny_overrides(tiny_llama_dir, corpus_files), "eval.dense=false",
                             "pattern=2:4"]), tmp_path / "run")
    out = tmp_path / "study.json"
    script = Path(__file__).resolve().parents[1] / "scripts/study_refine_objective.py"
    subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "run"), "--tags", "2of4", "--variants",
                    "none,pruned,dense", "--out", str(out), "--drift"], check=True, capture_output=True,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    rows = {r["variant"]: r for r in __import__("json").loads(out.read_text())}
    assert set(rows) == {"none", "pruned", "dense"} and "refinement" not in rows["none"]
    for v in ("pruned", "dense"):
        assert rows[v]["refinement"]["converged"] and rows[v]["refinement"]["error_ratio"] < 1
    n_blocks = len(rows["none"]["drift"])
    assert n_blocks > 1 and len(rows["dense"]["refinement"]["drift"]) == n_blocks


def test_the_dense_target_weight_is_the_least_squares_fit_of_the_dense_output():
    """``W*`` against ``lstsq(X_m, X_d Wᵀ)``; a channel that never fired keeps W's weights; with equal inputs W* = W."""
    from unipruning_cli.pruning.obs import dense_target_weight

    w, xm, xd = _pair(3, inp=12, tokens=600)
    xm[:, 5] = 0
    moved = dense_target_weight(w, xm.t() @ xm, xm.t() @ xd, percdamp=1e-7)
    live = torch.arange(12) != 5
    fit = torch.linalg.lstsq(xm[:, live], xd @ w.t()).solution.t()
    torch.testing.assert_close(moved[:, live], fit, rtol=1e-3, atol=1e-3)
    assert torch.equal(moved[:, 5], w[:, 5])
    h = xd.t() @ xd
    # with equal inputs (block 0 of every pass) W* = W at the default damping too: the damping is a pull toward W
    # (λ‖V - W‖²), not toward 0, which would shrink W along every direction of little variance in the calibration data
    for percdamp in (1e-7, 0.01, 1.0):
        torch.testing.assert_close(dense_target_weight(w, h, h, percdamp=percdamp), w, rtol=1e-4, atol=1e-4)
    # and it minimises the damped objective ‖W X_d - V X_m‖² + λ‖V - W‖², λ = percdamp · mean diag of X_mᵀX_m
    moved = dense_target_weight(w, xm.t() @ xm, xm.t() @ xd, percdamp=0.5)
    hm = (xm.t() @ xm).clone()
    hm.diagonal()[5] = 1.0
    lam = 0.5 * float(hm.diagonal().mean())
    a = torch.cat([xm[:, live], lam ** 0.5 * torch.eye(11)])
    b = torch.cat([xd @ w.t(), lam ** 0.5 * w[:, live].t()])
    torch.testing.assert_close(moved[:, live], torch.linalg.lstsq(a, b).solution.t(), rtol=1e-3, atol=1e-3)


def test_a_run_with_dense_targets_refines_and_reconstructs_toward_the_dense_model(tmp_path, tiny_llama_dir,
                                                                                  corpus_files, monkeypatch):
    """layer_target=dense with refine=swap and reconstruct=obs: records say so (with the drift per block), the
    masks differ from the pruned-target run's, and layer_target=dense alone is refused before any weight is read."""
    from _helpers import tiny_overrides
    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune, validate_values
    from unipruning_cli.core.errors import UserError

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    base = [*tiny_overrides(tiny_llama_dir, corpus_files), "eval.dense=false", "calibration.nsamples=16",
            "refine=swap", "reconstruct=obs"]
    pruned = run_prune(compose_prune(base), tmp_path / "pruned")
    dense = run_prune(compose_prune([*base, "layer_target=dense"]), tmp_path / "dense")
    tag = "s0.50_per_row"
    r = dense["results"][tag]
    assert r["refinement"]["target"] == "dense" and r["reconstruction"]["target"] == "dense"
    assert len(r["refinement"]["drift"]) > 1 and r["refinement"]["untargeted"] == 0
    assert pruned["results"][tag]["reconstruction"]["target"] == "pruned"
    assert r["ppl"] != pruned["results"][tag]["ppl"]
    with pytest.raises(UserError, match="layer_target=dense sets what"):
        validate_values(compose_prune([*tiny_overrides(tiny_llama_dir, corpus_files), "layer_target=dense"]))
