"""Training-free mask refinement (``refine=swap``, issue: beyond the paper): swaps inside a row (an N:M group) keep
the counts, never raise a row's output error on the calibration data, take the move a slow reference takes, and end
where no swap helps (N:M, searched exactly)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from unipruning_cli.pruning.swaps import row_errors, swap_refine


def _layer(seed: int = 0, out: int = 12, inp: int = 16, tokens: int = 300):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, inp, generator=gen) @ (torch.eye(inp) + 0.5 * torch.randn(inp, inp, generator=gen))
         * torch.linspace(0.2, 3.0, inp))
    x[:, 3] = 0  # a channel that never fires
    w = torch.randn(out, inp, generator=gen)
    return w, x, x.t() @ x


def _wanda(w, x, sparsity=0.5):
    score = w.abs() * x.norm(dim=0)
    k = int(w.shape[1] * (1 - sparsity))
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)


def _nm(w, x, n=2, m=4):
    score = (w.abs() * x.norm(dim=0)).view(w.shape[0], -1, m)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(n, dim=-1).indices, True)
    return keep.view(w.shape)


def _error(w, keep, x):
    """The slow, obvious output error per row: ‖(W ⊙ ¬keep) xᵀ‖² over the tokens."""
    return ((w * ~keep) @ x.t()).pow(2).sum(1)


def test_an_all_ones_mask_is_left_alone():
    w, _, xtx = _layer()
    keep = torch.ones_like(w, dtype=torch.bool)
    got = swap_refine(w, keep, xtx)
    assert got.swaps == 0 and got.rounds == 0 and got.converged and torch.equal(got.keep, keep)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "4:8"])
def test_counts_are_kept_and_no_rows_error_rises(kind, batch):
    w, x, xtx = _layer(1, inp=32)
    keep = _wanda(w, x) if kind == "unstructured" else _nm(w, x, *map(int, kind.split(":")))
    m = None if kind == "unstructured" else int(kind.split(":")[1])
    got = swap_refine(w, keep, xtx, group=m, batch=batch)
    new = got.keep
    assert got.swaps > 0 and got.converged
    assert torch.equal(new.sum(1), keep.sum(1))
    if m:
        assert torch.equal(new.view(w.shape[0], -1, m).sum(-1), keep.view(w.shape[0], -1, m).sum(-1))
    before, after = _error(w, keep, x), _error(w, new, x)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < 0.97 * before.sum(), (after.sum(), before.sum())
    torch.testing.assert_close(row_errors(w, new, xtx), after, rtol=1e-4, atol=1e-3)


def test_one_round_takes_the_move_of_a_slow_reference():
    """Unstructured: per row, revive the pruned weight whose revival lowers the error most, then prune the kept
    weight that adds least, both measured by recomputing the error; taken when the pair lowers it."""
    w, x, xtx = _layer(2)
    keep = _wanda(w, x)
    new = swap_refine(w, keep, xtx, max_rounds=1, batch=False).keep
    expected = keep.clone()
    for r in range(w.shape[0]):
        base = float(_error(w[r:r + 1], keep[r:r + 1], x))
        grown = []
        for j in (~keep[r]).nonzero().flatten().tolist():
            k = keep[r].clone()
            k[j] = True
            grown.append((float(_error(w[r:r + 1], k[None], x)), j))
        _, j = min(grown)
        after_grow = keep[r].clone()
        after_grow[j] = True
        dropped = []
        for i in keep[r].nonzero().flatten().tolist():
            k = after_grow.clone()
            k[i] = False
            dropped.append((float(_error(w[r:r + 1], k[None], x)), i))
        err, i = min(dropped)
        if err < base * (1 - 1e-5):
            expected[r, j], expected[r, i] = True, False
    assert torch.equal(new, expected)


@pytest.mark.parametrize("batch", [True, False])
def test_an_nm_mask_ends_where_no_swap_inside_a_group_helps(batch):
    w, x, xtx = _layer(3, out=6, inp=16)
    keep = _nm(w, x)
    got = swap_refine(w, keep, xtx, group=4, batch=batch)
    new = got.keep
    assert got.swaps > 0 and got.converged
    for r in range(w.shape[0]):
        err = float(_error(w[r:r + 1], new[r:r + 1], x))
        for g in range(4):
            cols = range(4 * g, 4 * g + 4)
            for j, i in itertools.product(cols, cols):
                if new[r, j] or not new[r, i]:
                    continue
                k = new[r].clone()
                k[j], k[i] = True, False
                assert float(_error(w[r:r + 1], k[None], x)) >= err * (1 - 1e-4), (r, j, i)


def test_the_joint_change_of_a_batch_is_the_recomputed_error():
    """The batch's exact joint change (``2 Δ gᵀ + Δ H Δᵀ``) against the error recomputed from the tokens, for several
    swaps of one row at once, including two that share inputs."""
    from unipruning_cli.pruning.swaps import _joint_change

    w, x, xtx = _layer(4, inp=16)
    keep = _wanda(w, x)
    g = (w * ~keep) @ xtx
    grow, drop = torch.zeros_like(keep), torch.zeros_like(keep)
    for r in range(w.shape[0]):
        pruned, kept = (~keep[r]).nonzero().flatten(), keep[r].nonzero().flatten()
        grow[r, pruned[: 1 + r % 3]] = True
        drop[r, kept[: 1 + r % 3]] = True
    new = (keep | grow) & ~drop
    joint, moved = _joint_change(w, g, xtx, grow, drop)
    torch.testing.assert_close(joint, _error(w, new, x) - _error(w, keep, x), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(g + moved, (w * ~new) @ xtx, rtol=1e-4, atol=1e-3)  # g after the move


@pytest.mark.parametrize("group", [None, 4])
def test_a_batched_round_is_never_worse_than_the_single_swap(group):
    """From the same mask, one batched round lowers every row's error at least as much as the single best swap, and
    swaps more weights in total; both end converged, where no single swap helps."""
    w, x, xtx = _layer(5, out=16, inp=32)
    keep = _wanda(w, x) if group is None else _nm(w, x)
    single = swap_refine(w, keep, xtx, group=group, max_rounds=1, batch=False)
    batched = swap_refine(w, keep, xtx, group=group, max_rounds=1)
    assert (_error(w, batched.keep, x) <= _error(w, single.keep, x) * (1 + 1e-5) + 1e-4).all()
    assert batched.swaps > single.swaps and batched.rounds == single.rounds == 1
    assert not batched.converged
    done = swap_refine(w, keep, xtx, group=group)
    assert done.converged
    again = swap_refine(w, done.keep, xtx, group=group, batch=False)
    assert again.swaps == 0 and again.converged and again.rounds == 0


def test_the_round_cap_and_the_deadline_stop_the_refinement_unconverged():
    w, x, xtx = _layer(6, out=16, inp=32)
    keep = _wanda(w, x)
    capped = swap_refine(w, keep, xtx, max_rounds=2, batch=False)
    assert capped.rounds == 2 and not capped.converged
    late = swap_refine(w, keep, xtx, deadline=0.0)
    assert late.rounds == late.swaps == 0 and not late.converged and torch.equal(late.keep, keep)


@pytest.mark.parametrize("override, message", [("refine=swop", "refine='swop'"),
                                               ("refine_rounds=0", "refine_rounds=0"),
                                               ("refine_seconds=-1", "refine_seconds=-1")])
def test_bad_refine_settings_are_refused(override, message):
    from unipruning_cli.core.config import compose_prune, validate_values
    from unipruning_cli.core.errors import UserError

    with pytest.raises(UserError, match=message):
        validate_values(compose_prune([override]))


def test_bad_shapes_are_refused():
    w, _, xtx = _layer()
    with pytest.raises(ValueError, match="keep must be bool"):
        swap_refine(w, torch.ones_like(w), xtx)
    with pytest.raises(ValueError, match="groups of 5"):
        swap_refine(w, torch.ones_like(w, dtype=torch.bool), xtx, group=5)


def test_a_run_with_refinement_keeps_the_counts_saves_the_refined_masks_and_records_them(tmp_path, tiny_llama_dir,
                                                                                       corpus_files, monkeypatch):
    """Wanda's mask refined in a run: the same counts per row, another mask (saved, its header says so), a lower
    output error on the calibration data, and the refined mask is the one evaluated (the weights are W x mask)."""
    from _helpers import tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.pruning.mask_files import load_masks, read_masks_header
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    base = [*tiny_overrides(tiny_llama_dir, corpus_files), "eval.dense=false", "calibration.nsamples=16"]
    plain = run_prune(compose_prune(base), tmp_path / "plain")
    swap = run_prune(compose_prune([*base, "refine=swap"]), tmp_path / "swap")
    tag = "s0.50_per_row"
    assert "refinement" not in plain["results"][tag]
    record = swap["results"][tag]["refinement"]
    assert record["method"] == "swap" and record["swaps"] > 0 and record["error_ratio"] < 1
    path = tmp_path / "swap/masks" / f"{tag}.safetensors"
    assert read_masks_header(path)[1]["refine"] == "swap"
    a, b = load_masks(tmp_path / "plain/masks" / f"{tag}.safetensors"), load_masks(path)
    assert all(torch.equal(a[n].sum(1), b[n].sum(1)) for n in a)
    changed = sum(int((a[n] != b[n]).sum()) for n in a)  # a later swap may undo part of an earlier one
    assert 0 < changed <= 2 * record["swaps"]
    (corpus,) = swap["results"][tag]["ppl"]
    assert swap["results"][tag]["ppl"][corpus] != plain["results"][tag]["ppl"][corpus]
    assert swap["results"][tag]["measured_sparsity"] == plain["results"][tag]["measured_sparsity"]


def test_a_unipruning_run_refines_every_cut_and_a_new_cut_is_refined_or_refused(tmp_path, tiny_llama_dir,
                                                                               corpus_files, monkeypatch):
    """Every cut of one Γ (unstructured and 2:4, swaps inside groups) is refined; `unipruning eval` refines a cut
    new from Γ as the run's were, and export refuses a cut the run does not hold (it would not be refined)."""
    from _helpers import tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.commands.eval import evaluate_run
    from unipruning_cli.stages.export.apply import export_run
    from unipruning_cli.pruning.mask_files import load_masks, read_masks_header
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    run = tmp_path / "run"
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    metrics = run_prune(compose_prune([*base, "method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3",
                                       "refine=swap", "eval.dense=false", "export.patterns=[2:4]"]), run)
    for tag in ("s0.50_auto", "2of4"):
        assert metrics["results"][tag]["refinement"]["swaps"] > 0
        assert read_masks_header(run / "masks" / f"{tag}.safetensors")[1]["refine"] == "swap"
    nm = load_masks(run / "masks/2of4.safetensors")
    assert all(bool((m.view(m.shape[0], -1, 4).sum(-1) == 2).all()) for m in nm.values())
    with pytest.raises(UserError, match="(refine=swap|allocation=auto).*unipruning eval"):
        export_run(run, sparsity=0.6, out=tmp_path / "export")
    evaluate_run(run, ["sparsity=0.6"])
    assert read_masks_header(run / "masks/s0.60_auto.safetensors")[1]["refine"] == "swap"
    entry = json.loads((run / "metrics.json").read_text())["results"]["s0.60_auto"]
    assert entry["refinement"]["swaps"] > 0
    assert entry["allocation"]["picked"] in entry["allocation"]["losses"]  # chosen in eval, as the run chose
    assert read_masks_header(run / "masks/s0.60_auto.safetensors")[1]["allocation"] == entry["allocation"]["picked"]


def test_refinement_with_reconstruction_shares_its_pass_saves_the_refined_masks_and_export_rebuilds_them(
        tmp_path, tiny_llama_dir, corpus_files, monkeypatch):
    """refine=swap with reconstruct=obs: each cut is refined inside its reconstruction's calibration pass (no pass
    more than reconstruct=obs alone), the refined masks are saved and recorded (rounds, converged), the cut evaluated
    is the reconstruction on the refined masks, and export redoes that update from the saved masks."""
    from _helpers import tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.pruning import block_loop
    from unipruning_cli.pruning.mask_files import load_masks, read_masks_header
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    passes = []
    real = block_loop.calibrate_blockwise
    monkeypatch.setattr(block_loop, "calibrate_blockwise", lambda *a, **k: passes.append(1) or real(*a, **k))
    base = [*tiny_overrides(tiny_llama_dir, corpus_files), "eval.dense=false", "calibration.nsamples=16",
            "reconstruct=obs"]
    obs = run_prune(compose_prune(base), tmp_path / "obs")
    alone = len(passes)
    kept = run_prune(compose_prune([*base[:-1], "reconstruct=none"]), tmp_path / "kept")  # W x the same masks
    assert obs["results"]["s0.50_per_row"]["weights_kept"]["ppl"] == kept["results"]["s0.50_per_row"]["ppl"]
    passes.clear()
    both = run_prune(compose_prune([*base, "refine=swap"]), tmp_path / "both")
    assert len(passes) == alone
    tag = "s0.50_per_row"
    record = both["results"][tag]["refinement"]
    assert record["swaps"] > 0 and record["error_ratio"] < 1 and record["converged"] and record["rounds"] >= 1
    assert both["results"][tag]["reconstruction"]["method"] == "obs"
    path = tmp_path / "both/masks" / f"{tag}.safetensors"
    assert read_masks_header(path)[1]["refine"] == "swap"
    plain = load_masks(tmp_path / "obs/masks" / f"{tag}.safetensors")
    refined = load_masks(path)
    assert any(not torch.equal(plain[n], refined[n]) for n in plain)
    assert all(torch.equal(plain[n].sum(1), refined[n].sum(1)) for n in plain)
    assert both["results"][tag]["ppl"] != obs["results"][tag]["ppl"]
    summary = (tmp_path / "both/summary.md").read_text()
    (corpus,) = both["results"][tag]["ppl"]
    kept_ppl, updated_ppl = both["results"][tag]["weights_kept"]["ppl"][corpus], both["results"][tag]["ppl"][corpus]
    assert f"| 50% | {kept_ppl:.3f} (`{tag}`) | {updated_ppl:.3f} (`{tag}`) |" in summary
    from safetensors.torch import load_file
    from unipruning_cli.stages.export.apply import export_run

    out = tmp_path / "export"
    export_run(tmp_path / "both", out=out)
    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(load_file(f))
    for name, keep in refined.items():  # the update never revives a pruned weight, and keeps the refined ones
        w = weights[f"{name}.weight"]
        assert not bool(w[~keep].any()), name
        assert bool((w[keep] != 0).float().mean() > 0.99), name
