"""Training-free mask refinement (``refine=swap``, issue: beyond the paper): swaps inside a row (an N:M group) keep
the counts, never raise a row's output error on the calibration data, take the move a slow reference takes, and end
where no swap helps (N:M, searched exactly)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from unipruning_cli.stages.refinement import row_errors, swap_refine


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
    new, swaps = swap_refine(w, keep, xtx)
    assert swaps == 0 and torch.equal(new, keep)


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "4:8"])
def test_counts_are_kept_and_no_rows_error_rises(kind):
    w, x, xtx = _layer(1, inp=32)
    keep = _wanda(w, x) if kind == "unstructured" else _nm(w, x, *map(int, kind.split(":")))
    m = None if kind == "unstructured" else int(kind.split(":")[1])
    new, swaps = swap_refine(w, keep, xtx, group=m)
    assert swaps > 0
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
    new, _ = swap_refine(w, keep, xtx, max_rounds=1)
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


def test_an_nm_mask_ends_where_no_swap_inside_a_group_helps():
    w, x, xtx = _layer(3, out=6, inp=16)
    keep = _nm(w, x)
    new, swaps = swap_refine(w, keep, xtx, group=4, max_rounds=1000)
    assert swaps > 0
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
    for tag in ("s0.50_owl", "2of4"):
        assert metrics["results"][tag]["refinement"]["swaps"] > 0
        assert read_masks_header(run / "masks" / f"{tag}.safetensors")[1]["refine"] == "swap"
    nm = load_masks(run / "masks/2of4.safetensors")
    assert all(bool((m.view(m.shape[0], -1, 4).sum(-1) == 2).all()) for m in nm.values())
    with pytest.raises(UserError, match="refine=swap.*unipruning eval"):
        export_run(run, sparsity=0.6, out=tmp_path / "export")
    evaluate_run(run, ["sparsity=0.6"])
    assert read_masks_header(run / "masks/s0.60_owl.safetensors")[1]["refine"] == "swap"
    assert json.loads((run / "metrics.json").read_text())["results"]["s0.60_owl"]["refinement"]["swaps"] > 0
