"""``reconstruct=admm`` (issue 29, step 3; ALPS, Meng et al. 2024, on a fixed mask): the kept weights solved exactly
on the mask, checked against the row-by-row least-squares solve; never worse than the OBS sweep on the same mask; the
mask kept exactly; a run and its export do it on the run's calibration samples."""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.pruning.admm import admm_reconstruct, masked_least_squares
from unipruning_cli.pruning.mask_solvers import solve_on_mask
from unipruning_cli.pruning.obs import obs_reconstruct
from unipruning_cli.pruning.swaps import output_error


def _layer(seed: int = 0, out: int = 24, inp: int = 40, tokens: int = 400):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, inp, generator=gen) @ (torch.eye(inp) + 0.5 * torch.randn(inp, inp, generator=gen))
         * torch.linspace(0.2, 3.0, inp))
    x[:, 5] = 0  # a channel that never fires
    w = torch.randn(out, inp, generator=gen)
    return w, 2 * x.t() @ x / tokens


def _masks(w):
    score = w.abs() * torch.rand(w.shape, generator=torch.Generator().manual_seed(7))
    groups = score.view(w.shape[0], -1, 4)
    nm = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True).view(w.shape)
    return {"70%": score >= score.flatten().kthvalue(int(w.numel() * 0.7)).values, "2:4": nm}


def _damped(h, percdamp=0.01):
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += percdamp * diag.mean()
    return h


def _row_by_row(w, h, keep):
    """The obviously-right reference: each row's kept weights = (H_KK)⁻¹ (H w)_K, from the dense row."""
    out = torch.zeros_like(w, dtype=torch.float64)
    hd, wd = h.double(), w.double()
    for r in range(w.shape[0]):
        k = keep[r]
        out[r, k] = torch.linalg.solve(hd[k][:, k], (wd[r] @ hd)[k])
    return out


@pytest.mark.parametrize("kind", ["70%", "2:4"])
def test_it_is_the_least_squares_solve_on_the_mask_and_beats_obs(kind):
    w, h = _layer()
    keep = _masks(w)[kind]
    got = admm_reconstruct(w, h, keep, percdamp=0.01, tol=1e-9, cg_steps=500)
    ref = _row_by_row(w, _damped(h), keep)
    dead = h.diagonal() == 0
    ref[:, dead] = (w * keep)[:, dead].double()  # a channel that never fired: its kept weights as they were
    assert torch.equal(got.weight != 0, keep & (w != 0))
    assert torch.allclose(got.weight.double(), ref, atol=1e-4, rtol=1e-4), (got.weight.double() - ref).abs().max()
    assert got.residual <= 1e-9
    hd = _damped(h)
    masked, obs, exact = (output_error(v - w, hd) for v in (w * keep, obs_reconstruct(w, h, keep, percdamp=0.01), got.weight))
    assert exact < obs < masked
    assert obs > 1.02 * exact  # the sweep is measurably short of the optimum on this layer (why admm exists)


def test_admm_alone_gets_near_and_conjugate_gradients_alone_get_there():
    w, h = _layer(1)
    keep = _masks(w)["2:4"]
    hd = _damped(h)
    exact = output_error(admm_reconstruct(w, h, keep, percdamp=0.01, tol=1e-10, cg_steps=1000).weight - w, hd)
    masked = output_error(w * keep - w, hd)
    admm = [output_error(admm_reconstruct(w, h, keep, percdamp=0.01, admm_steps=k, cg_steps=0).weight - w, hd) for k in (10, 30, 100)]
    cg_only = admm_reconstruct(w, h, keep, percdamp=0.01, admm_steps=0, cg_steps=1000, tol=1e-10)
    assert masked > admm[0] > admm[1] > admm[2] > exact and admm[2] < exact * 1.001
    # ALPS's growing ρ freezes W = D short of the optimum on a fixed support (why rho_growth defaults to 1)
    grown = output_error(admm_reconstruct(w, h, keep, percdamp=0.01, admm_steps=100, rho_growth=1.3, cg_steps=0).weight - w, hd)
    assert grown > 1.02 * exact
    assert output_error(cg_only.weight - w, hd) == pytest.approx(exact, rel=1e-5)
    assert 0 < cg_only.cg_steps < 1000


def test_an_all_ones_mask_leaves_the_weights_unchanged_and_bad_input_is_refused():
    w, h = _layer(2)
    ones = torch.ones_like(w, dtype=torch.bool)
    assert torch.allclose(admm_reconstruct(w, h, ones).weight, w, atol=1e-5)
    with pytest.raises(ValueError, match="of q_proj.*bool"):
        admm_reconstruct(w, h, ones.float(), name="q_proj")
    with pytest.raises(ValueError, match="NaN"):
        admm_reconstruct(w, h * float("nan"), ones)
    with pytest.raises(ValueError, match="admm_steps=-1"):
        admm_reconstruct(w, h, ones, admm_steps=-1)
    with pytest.raises(ValueError, match="unknown solver 'sgd'"):
        solve_on_mask("sgd", w, h, ones)


def test_conjugate_gradients_stop_at_the_tolerance_and_keep_the_support():
    w, h = _layer(3)
    keep = _masks(w)["70%"]
    hd = _damped(h)
    x, steps, rel = masked_least_squares(w, hd, keep, w * keep, max_steps=3, tol=0.0)
    assert steps == 3 and rel > 0 and torch.equal(x * ~keep, torch.zeros_like(x))
    x2, steps2, rel2 = masked_least_squares(w, hd, keep, w * keep, max_steps=1000, tol=1e-3)
    assert rel2 <= 1e-3 and steps2 > 3 and output_error(x2 - w, hd) < output_error(x - w, hd)


def test_each_solver_has_its_own_damping_where_none_is_given():
    from unipruning_cli.pruning.mask_solvers import DEFAULT_PERCDAMP, percdamp_of

    w, h = _layer(5)
    keep = _masks(w)["2:4"]
    assert DEFAULT_PERCDAMP == {"obs": 0.01, "admm": 0.001}
    assert torch.equal(solve_on_mask("obs", w, h, keep), obs_reconstruct(w, h, keep, percdamp=0.01))
    got = solve_on_mask("admm", w, h, keep)
    assert torch.equal(got, admm_reconstruct(w, h, keep, percdamp=0.001).weight)
    assert not torch.equal(got, admm_reconstruct(w, h, keep, percdamp=0.01).weight)
    assert torch.equal(solve_on_mask("admm", w, h, keep, percdamp=0.01), admm_reconstruct(w, h, keep, percdamp=0.01).weight)
    assert percdamp_of("obs", 0.05) == 0.05
    with pytest.raises(ValueError, match="unknown solver 'ls'"):
        percdamp_of("ls", None)


@pytest.mark.parametrize("how", ["obs", "admm"])
def test_solve_on_mask_keeps_the_dtype(how):
    w, h = _layer(4)
    keep = _masks(w)["2:4"]
    got = solve_on_mask(how, w.to(torch.bfloat16), h, keep)
    assert got.dtype == torch.bfloat16 and torch.equal(got != 0, keep & (got != 0)) and not (got * ~keep).any()


def test_a_run_with_admm_beats_obs_on_its_calibration_error_and_exports_what_it_evaluated(
        tmp_path, tiny_llama_dir, corpus_files, monkeypatch):
    from transformers import AutoModelForCausalLM

    from omegaconf import OmegaConf

    from _helpers import eval_windows_of, tiny_overrides
    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.stages.export.apply import export_run

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    base = [*tiny_overrides(tiny_llama_dir, corpus_files), "eval.dense=false", "calibration.nsamples=16"]
    runs = {how: run_prune(compose_prune([*base, f"reconstruct={how}"]), tmp_path / how) for how in ("obs", "admm")}
    tag = "s0.50_per_row"
    obs, admm = (runs[h]["results"][tag]["reconstruction"] for h in ("obs", "admm"))
    assert admm["method"] == "admm" and admm["layers"] == obs["layers"] == 21
    assert (obs["percdamp"], admm["percdamp"]) == (0.01, 0.001)  # each solver's own damping where the run sets none
    saved = {h: OmegaConf.load(tmp_path / h / "config.yaml").reconstruct_percdamp for h in runs}
    assert saved == {"obs": 0.01, "admm": 0.001}  # as numbers: export redoes the update with them
    assert admm["error_ratio"] < obs["error_ratio"] < 1
    assert runs["admm"]["results"][tag]["weights_kept"] == runs["obs"]["results"][tag]["weights_kept"]
    out = export_run(tmp_path / "admm", out=tmp_path / "export")
    windows, batch_size, corpus = eval_windows_of(tmp_path / "admm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
    assert got == pytest.approx(runs["admm"]["results"][out["tag"]]["ppl"][corpus], rel=1e-6)


def test_the_updates_damping_is_a_validated_option_the_run_passes_on(monkeypatch):
    from unipruning_cli.core.config import compose_prune, validate_values
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.stages import reconstruction

    for bad in ("0", "-0.01", "inf"):
        with pytest.raises(UserError, match="reconstruct_percdamp"):
            validate_values(compose_prune(["reconstruct=admm", f"reconstruct_percdamp={bad}"]))
    validate_values(compose_prune(["reconstruct=admm", "reconstruct_percdamp=0.001"]))
    assert compose_prune(["reconstruct=admm"]).reconstruct_percdamp is None  # the solver's own
    cfg = compose_prune(["reconstruct=admm", "reconstruct_percdamp=0.001"])
    seen = {}
    monkeypatch.setattr(reconstruction, "reconstruct", lambda *a: seen.update(args=a) or {})

    class Ctx:
        model, passes = None, None

        def __init__(self, cfg):
            self.cfg = cfg

        def calibration(self):
            return ["windows"], {}

    reconstruction.reconstruct_cut(Ctx(cfg), {})
    assert seen["args"][-2:] == ("admm", 0.001)
