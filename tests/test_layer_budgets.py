"""Layer-wise budgets (issue: beyond the paper): OWL's rule against a plain re-implementation of its code, the
exact global budget, nesting across sparsities, the per-matrix cap, and the ``gamma`` rule's bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unipruning_cli.pruning.layer_budgets import gamma_offsets, layer_of, layer_sparsities, layerwise_masks, owl_offsets
from unipruning_cli.pruning.masks import mask_sparsity, num_pruned


def _scores(seed: int = 0, layers: int = 4, heavy: int = 1) -> dict[str, torch.Tensor]:
    """Random scores of ``layers`` decoder layers (2 matrices each), with outliers planted more densely in the
    first ``heavy`` layers, as Wanda's scores of a real model have them in some layers more than others."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for proj, shape in (("self_attn.q_proj", (32, 48)), ("mlp.down_proj", (48, 64))):
            s = torch.rand(shape, generator=gen)
            share = 0.02 * (1 + i) if i >= heavy else 0.2
            s[torch.rand(shape, generator=gen) < share] *= 40
            out[f"model.layers.{i}.{proj}"] = s
    return out


def _owl_reference(scores, sparsity: float, m: float, lam: float) -> list[float]:
    """OWL's own steps (their lib/prune.py, prune_wanda_outlier), with numpy, layer by layer: the share of a
    layer's concatenated scores above M x their mean, in percent; min-max scaled to [0, 2λ]; re-centred on the
    target density; each layer's sparsity is 1 minus its density."""
    ratios = []
    for i in range(len({layer_of(n) for n in scores})):
        w = np.concatenate([v.numpy().ravel() for n, v in scores.items() if n.startswith(f"model.layers.{i}.")])
        ratios.append((w > m * w.mean()).sum() / w.size * 100)
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - sparsity)
    return [1 - x for x in r]


def _equal_layers(scores):
    return {n: torch.rand_like(v) if "down_proj" in n else v for n, v in scores.items()}


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_per_layer_sparsities_match_a_plain_reimplementation_of_its_code(sparsity):
    scores = _scores()
    # OWL's mean is over layers, unweighted: with layers of one size the size-weighted mean is the same
    sizes = {f"model.layers.{i}": 1 for i in range(4)}
    got = layer_sparsities(sizes, owl_offsets(scores, 5, 0.08), sparsity)
    want = _owl_reference(scores, sparsity, 5, 0.08)
    assert [got[f"model.layers.{i}"] for i in range(4)] == pytest.approx(want, abs=1e-9)
    assert got["model.layers.0"] < sparsity  # the layer with the most outliers keeps the most weights


@pytest.mark.parametrize("rule", ["owl", "gamma"])
def test_each_layerwise_rule_hits_the_budget_exactly_and_its_cuts_nest(rule):
    scores = _scores(1)
    offsets = owl_offsets(scores) if rule == "owl" else gamma_offsets(scores, 0.08)
    assert any(abs(o) > 1e-3 for o in offsets.values())
    previous = None
    for sparsity in (0.3, 0.5, 0.6, 0.7, 0.9):
        masks, per_layer = layerwise_masks(scores, sparsity, offsets)
        sizes = {layer: sum(scores[n].numel() for n in scores if layer_of(n) == layer) for layer in per_layer}
        assert sum(per_layer[k] * sizes[k] for k in sizes) / sum(sizes.values()) == pytest.approx(sparsity, abs=1e-12)
        measured = sum(mask_sparsity(m) * m.numel() for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert abs(measured - sparsity) <= 0.5 / 48  # per-row rounding only: half a weight per row at most
        for n, m in masks.items():  # each matrix at its layer's sparsity, row by row
            assert torch.all((~m).sum(1) == num_pruned(m.shape[1], per_layer[layer_of(n)]))
        if previous is not None:
            assert all(torch.all(masks[n] <= previous[n]) for n in masks)  # kept at s2 > s1 => kept at s1
        previous = masks


def test_a_layerwise_cut_respects_the_per_matrix_cap():
    scores = _scores(2)
    offsets = {k: 3 * v for k, v in owl_offsets(scores, 5, 0.2).items()}  # wide offsets: some layers hit the cap
    masks, per_layer = layerwise_masks(scores, 0.85, offsets, cap=0.9)
    assert max(per_layer.values()) == pytest.approx(0.9) and min(per_layer.values()) < 0.85
    # the cap holds row by row, rounded as every cut rounds (num_pruned: half up)
    assert all(torch.all((~m).sum(1) <= num_pruned(m.shape[1], 0.9)) for m in masks.values())
    with pytest.raises(ValueError, match="cap"):
        layerwise_masks(scores, 0.95, offsets, cap=0.9)


def test_the_gamma_rule_prunes_more_where_the_scores_are_globally_small_within_its_bounds():
    scores = _scores(3)
    scores = {n: v * (0.1 if n.startswith("model.layers.2.") else 1.0) for n, v in scores.items()}
    offsets = gamma_offsets(scores, 0.05)
    assert offsets["model.layers.2"] == pytest.approx(0.05)  # the small layer: as much more as the bound allows
    assert all(-0.05 <= o <= 0.05 for o in offsets.values())


def test_layer_of_names_the_decoder_layer():
    assert layer_of("model.layers.3.mlp.experts.5.down_proj") == "model.layers.3"
    assert layer_of("transformer.h.11.attn.c_attn") == "transformer.h.11"
    assert layer_of("lonely") == "lonely"


@pytest.fixture()
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("method, allocation", [("unipruning", "owl"), ("unipruning", "gamma"), ("local", "owl")])
def test_a_run_cuts_layerwise_budgets_at_every_target_and_export_cuts_a_new_one(
        method, allocation, tmp_path, tiny_llama_dir, corpus_files, _own_cache):
    from _helpers import tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.export.apply import export_run
    from unipruning_cli.pruning.mask_files import load_masks
    from unipruning_cli.commands.prune import run_prune

    torch.set_num_threads(1)
    extra = (["method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3", "export.sparsities=[0.6,0.7]"]
             if method == "unipruning" else [])
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if method == "local" or
            not o.startswith(("method=", "local_metric="))]
    run = tmp_path / "run"
    metrics = run_prune(compose_prune([*base, *extra, f"pattern.allocation={allocation}", "eval.dense=false"]), run)
    tags = [f"s{s:.2f}_{allocation}" for s in ((0.5, 0.6, 0.7) if method == "unipruning" else (0.5,))]
    assert list(metrics["results"]) == tags
    for tag in tags:
        per = metrics["results"][tag]["per_layer_sparsity"]
        assert abs(metrics["results"][tag]["measured_sparsity"] - float(tag[1:5])) <= 0.5 / 64
        assert len({round(v, 4) for v in per.values()}) > 1  # not one sparsity for every matrix
    if method == "unipruning":
        masks = [load_masks(run / f"masks/{t}.safetensors") for t in tags]
        assert all(torch.all(b[n] <= a[n]) for a, b in zip(masks, masks[1:]) for n in a)  # nested
        out = export_run(run, sparsity=0.65, out=tmp_path / "export")
        assert out["tag"] == f"s0.65_{allocation}" and abs(out["kept"]["measured_sparsity"] - 0.65) <= 0.5 / 64

