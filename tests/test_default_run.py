"""What ``unipruning prune`` with no overrides cuts (issue: beyond the paper): one Γ at 50 / 60 / 70 % with OWL's
layer budgets and at 2:4, beside Wanda (one-shot, the same calibration statistics) at the same four targets, and a
summary that compares them; other methods keep one cut and no baselines."""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.core.config import compose_prune
from unipruning_cli.pruning.targets import baselines_of, make_target, targets_of


def test_the_default_config_cuts_four_targets_from_one_gamma_beside_wanda():
    cfg = compose_prune([])
    assert cfg.method.name == "unipruning"
    assert [t.tag for t in targets_of(cfg, make_target(cfg))] == ["s0.50_auto", "s0.60_auto", "s0.70_auto", "2of4"]
    assert baselines_of(cfg) == ["wanda@one_shot"]


@pytest.mark.parametrize("overrides, tags, baselines", [
    (["method=local", "local_metric=wanda"], ["s0.50_per_row"], []),
    (["method=sparsegpt"], ["s0.50_per_block"], []),
    (["export.sparsities=[]", "export.patterns=[]", "eval.baselines=[]"], ["s0.50_auto"], []),
    (["pattern=2:4"], ["2of4", "s0.50_auto", "s0.60_auto", "s0.70_auto"], ["wanda@one_shot"]),
    (["pattern.allocation=per_row", "export.patterns=[4:8]", "eval.baselines=[ria]"],
     ["s0.50_per_row", "s0.60_per_row", "s0.70_per_row", "4of8"], ["ria"]),
    (["experiment=paper_offline"], ["s0.50_per_matrix", "s0.60_per_matrix", "s0.70_per_matrix", "2of4", "4of8"], []),
])
def test_other_methods_and_explicit_lists_keep_their_cuts(overrides, tags, baselines):
    from unipruning_cli.stages.preflight import validate_method_options

    cfg = compose_prune(overrides)
    validate_method_options(cfg)  # the defaults never refuse another method
    assert [t.tag for t in targets_of(cfg, make_target(cfg))] == tags
    assert baselines_of(cfg) == baselines


def test_the_default_runs_summary_compares_unipruning_and_wanda_at_four_targets(tmp_path, tiny_llama_dir,
                                                                                corpus_files, monkeypatch):
    from _helpers import tiny_overrides
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    # the tiny model and corpora, the search shortened; every cut and baseline left at its default
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files)
            if not o.startswith(("method=", "local_metric=", "export.", "eval.baselines"))]
    metrics = run_prune(compose_prune([*base, "schedule.steps=3"]), tmp_path / "run")
    assert set(metrics["results"]) == {"s0.50_auto", "s0.60_auto", "s0.70_auto", "2of4", "wanda@one_shot:s0.50_per_row",
                                       "wanda@one_shot:s0.60_per_row", "wanda@one_shot:s0.70_per_row",
                                       "wanda@one_shot:2of4"}
    for tag, r in metrics["results"].items():
        expected = 0.5 if "2of4" in tag else float(tag.rsplit("s", 1)[-1].split("_")[0])
        assert r["measured_sparsity"] == pytest.approx(expected, abs=0.01), tag
    summary = (tmp_path / "run/summary.md").read_text()
    table = summary.split("same calibration samples:", 1)[1].split("\n\n", 2)[1].splitlines()
    assert table[0].startswith("| target | unipruning | wanda@one_shot |")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["50%", "60%", "70%", "2:4"]
    for row in table[2:]:
        cells = [c.strip() for c in row.split("|")[2:4]]
        assert all(cells) and sum(c.startswith("**") for c in cells) >= 1, row
    assert (tmp_path / "run/plots/ppl_vs_sparsity.png").is_file()


def test_a_run_made_under_the_old_default_allocation_keeps_its_own_cut(tmp_path):
    """A UniPruning run whose config left ``pattern.allocation`` null when null meant per matrix: export and eval of
    "the run's own cut" still mean its per-matrix cut (recorded in metrics.json), not today's auto; an OWL run's, OWL."""
    import json

    from omegaconf import OmegaConf

    from unipruning_cli.stages.export.run import open_run, resolve_target

    run = tmp_path / "old"
    (run / "stages").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose_prune(["export.sparsities=[0.6]"])))
    (run / "stages/search.json").write_text("{}")
    for recorded, tag in (("per_matrix", "s0.50_per_matrix"), ("owl", "s0.50_owl"), ("auto", "s0.50_auto")):
        (run / "metrics.json").write_text(json.dumps({"allocation": recorded, "results": {}}))
        info = open_run(run)
        assert resolve_target(info).tag == tag
        assert resolve_target(info, sparsity=0.6).tag == tag.replace("0.50", "0.60")
