"""``reconstruct_percdamp=auto`` (issue 29): the damping of a solve on a fixed mask picked per layer by the output
error on held-out calibration samples, checked against a brute-force choice made with row-by-row solves; the pass
holds out every k-th sample's XᵀX exactly; a run records what was picked; bad values are refused up front."""

from __future__ import annotations

import copy

import pytest
import torch

from unipruning_cli.pruning.damping import DAMPING_CANDIDATES, choose_damping
from unipruning_cli.pruning.mask_solvers import solve_on_mask
from unipruning_cli.pruning.swaps import output_error


def _samples(seed: int, tokens: int, inp: int = 32, out: int = 12):
    """A layer whose inputs have a spread of variances (few dominant channels, as LLM activations have) and
    ``tokens`` held-in plus 400 held-out inputs."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=gen)
    scale = torch.logspace(-1.5, 1, inp)
    x = (torch.randn(tokens + 400, inp, generator=gen) @ mix) * scale
    w = torch.randn(out, inp, generator=gen)
    keep = torch.rand(out, inp, generator=gen) > 0.6
    return w, x[:tokens], x[tokens:], keep


def _row_by_row(w, h, keep, percdamp):
    """The obviously-right damped solve on the mask: each row's kept weights = ((H + λI)_KK)⁻¹ ((H + λI) w)_K."""
    hd = h.double().clone()
    hd.diagonal().add_(percdamp * hd.diagonal().mean())
    out = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        k = keep[r]
        out[r, k] = torch.linalg.solve(hd[k][:, k], (w[r].double() @ hd)[k])
    return out.float()


def _checked_pick(tokens: int) -> float:
    """choose_damping on a layer fit on ``tokens`` inputs, its errors and pick checked against reference solves."""
    w, fit, val, keep = _samples(0, tokens)
    xtx, held = torch.cat([fit, val]).t() @ torch.cat([fit, val]), val.t() @ val
    count, held_count = tokens + 400, 400
    got = choose_damping(w, xtx, count, held, held_count, keep,
                         lambda h, d, start: solve_on_mask("admm", w, h, keep, "layer", d, start))
    h_fit = 2 * fit.t() @ fit / tokens
    base = output_error(w * keep - w, held)
    want = {d: output_error(_row_by_row(w, h_fit, keep, d) - w, held) / base for d in DAMPING_CANDIDATES}
    assert got.errors == pytest.approx(want, rel=2e-3)
    assert got.percdamp == min(want, key=want.get)
    assert got.start is not None and torch.equal(got.start != 0, keep & (got.start != 0))
    return got.percdamp


def test_the_pick_is_the_brute_force_one_and_follows_the_data():
    """Few tokens to fit on: the held-out samples want a strong ridge; many: a weak one. The choice follows the
    data, and its errors are those of the reference solves."""
    assert _checked_pick(24) > _checked_pick(4000)


def test_without_held_out_tokens_the_fallback_is_kept_and_said():
    w, fit, _, keep = _samples(1, 100)
    calls = []
    got = choose_damping(w, fit.t() @ fit, 100, None, 0, keep, lambda *a: calls.append(a))
    assert (got.percdamp, got.errors, calls) == (0.01, None, [])
    got = choose_damping(w, fit.t() @ fit, 100, fit.t() @ fit, 100, keep, lambda *a: calls.append(a))
    assert (got.percdamp, got.errors, calls) == (0.01, None, [])  # nothing left to fit on
    with pytest.raises(ValueError, match="candidates"):
        choose_damping(w, fit.t() @ fit, 100, fit.t() @ fit, 10, keep, lambda *a: None, candidates=(0.0,))


def test_the_pass_holds_out_every_kth_samples_product(tiny_llama_dir):
    """``xtx_holdout`` of a layer is XᵀX over samples k-1, 2k-1, ... exactly, and ``xtx`` still covers them all."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.pruning.block_loop import block_pass

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (7, 10))

    def grab(rows, every):
        seen = {}

        def step(i, layers, stats):
            for n in layers:
                seen[n] = (stats[n].xtx.clone(), stats[n].xtx_holdout, stats[n].holdout_count, stats[n].count)
        block_pass(copy.deepcopy(model), rows, step, want_hessian=True, holdout_every=every, sequential=False)
        return seen

    both, held = grab(windows, 3), grab(windows[[2, 5]], 0)
    for n, (xtx, xtx_holdout, held_count, count) in both.items():
        torch.testing.assert_close(xtx_holdout, held[n][0], rtol=1e-5, atol=1e-4)
        assert held_count == held[n][3] == 20 and count == 70
    assert all(v[1] is None and v[2] == 0 for v in held.values())


def test_a_run_with_auto_damping_records_the_picks_and_matches_a_fixed_damping_when_only_it_is_offered(
        tmp_path, tiny_llama_dir, monkeypatch):
    """reconstruct=admm with percdamp=auto: every layer scored and counted; offered a single candidate, the result is
    the fixed-damping reconstruction's (the warm starts change only the solver's tolerance-level digits)."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.models.loading import prunable_layers
    from unipruning_cli.pruning import damping
    from unipruning_cli.stages.reconstruction import reconstruct

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (16, 12))
    masks = {n: torch.rand(m.weight.shape) > 0.5 for n, m in prunable_layers(model).items()}
    auto = reconstruct(copy.deepcopy(model), windows, masks, solver="admm", percdamp="auto")
    record = auto["damping"]
    assert sum(record["picked"].values()) == auto["layers"] == len(masks) and record["fallback"] == 0
    assert set(record["heldout_error"]) == {repr(d) for d in DAMPING_CANDIDATES}
    monkeypatch.setattr(damping, "DAMPING_CANDIDATES", (0.001,))
    one, fixed = copy.deepcopy(model), copy.deepcopy(model)
    got = reconstruct(one, windows, masks, solver="admm", percdamp="auto")
    want = reconstruct(fixed, windows, masks, solver="admm", percdamp=0.001)
    assert got["damping"]["picked"] == {"0.001": len(masks)}
    assert got["error_ratio"] == pytest.approx(want["error_ratio"], rel=1e-3)
    for n, layer in prunable_layers(one).items():
        assert torch.equal(layer.weight != 0, prunable_layers(fixed)[n].weight != 0)


def test_the_option_is_validated_before_any_weight_is_read():
    from unipruning_cli.core.config import compose_prune, validate_values
    from unipruning_cli.core.errors import UserError

    validate_values(compose_prune(["reconstruct=admm", "reconstruct_percdamp=auto"]))
    for bad in ("0", "-0.01", "inf", "often", "true"):
        with pytest.raises(UserError, match="reconstruct_percdamp"):
            validate_values(compose_prune(["reconstruct=admm", f"reconstruct_percdamp={bad}"]))
    with pytest.raises(UserError, match="layer_target=dense"):
        validate_values(compose_prune(["reconstruct=admm", "reconstruct_percdamp=auto", "layer_target=dense"]))
