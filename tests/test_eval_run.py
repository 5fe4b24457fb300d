"""``unipruning eval <run_dir>``: re-evaluating a finished run reproduces it and adds new cuts."""

from __future__ import annotations

import json

import pytest

from unipruning_cli.core.errors import UserError
from unipruning_cli.commands.eval import evaluate_run
from unipruning_cli.commands.prune import run_prune


@pytest.fixture()
def finished_run(tmp_path, frozen_search_cfg):
    run_dir = tmp_path / "run"
    return run_dir, run_prune(frozen_search_cfg("export.sparsities=[0.5,0.6]"), run_dir)


def test_eval_reproduces_the_run_and_adds_a_cut(finished_run):
    run_dir, original = finished_run
    again = evaluate_run(run_dir, ["all"])
    for tag, r in original["results"].items():
        assert again["results"][tag]["ppl"] == r["ppl"], tag  # same masks, same windows: the same floats
    more = evaluate_run(run_dir, ["sparsity=0.8"])
    assert abs(more["results"]["s0.80_per_matrix"]["measured_sparsity"] - 0.8) < 1e-3  # per-matrix rounding
    assert (run_dir / "masks" / "s0.80_per_matrix.safetensors").is_file()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert len(saved["evaluations"]) == 2 and "s0.80_per_matrix" in saved["results"]
    assert (run_dir / "plots" / "ppl_vs_sparsity.png").is_file()


def test_eval_refuses_bad_input_before_loading(finished_run, tmp_path):
    run_dir, _ = finished_run
    with pytest.raises(UserError, match="cannot read"):
        evaluate_run(run_dir, ["foo"])
    with pytest.raises(UserError, match="does not exist"):
        evaluate_run(tmp_path / "nope", [])
    with pytest.raises(UserError, match="corpus"):
        evaluate_run(run_dir, ["eval.corpora=[nosuch]"])


def test_evaluating_several_cuts_in_turn_equals_each_alone_and_restores_the_model(tiny_tokenizer):
    import copy

    import torch
    from omegaconf import OmegaConf

    from _helpers import build_tiny_model
    from unipruning_cli.pruning.masks import masks_for
    from unipruning_cli.pruning.weights import apply_masks
    from unipruning_cli.models.loading import prunable_layers
    from unipruning_cli.stages.evaluation import evaluate_masks, evaluate_pruned
    from unipruning_cli.core.context import RunContext

    model = build_tiny_model("llama", len(tiny_tokenizer)).eval()
    layers = prunable_layers(model)
    before = copy.deepcopy(model.state_dict())
    scores = {n: m.weight.abs() for n, m in layers.items()}
    cuts = {"a": masks_for(scores, 0.5), "b": masks_for(scores, 0.8, "per_row"), "c": masks_for(scores, 0.3)}
    cfg = OmegaConf.create({"eval": {"batch_size": 2, "tasks": []}, "reconstruct": "none"})
    windows = {"w": torch.randint(3, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))}
    together = evaluate_masks(RunContext(cfg).loaded(model, None), cuts, windows)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left as it was found
    for tag, masks in cuts.items():
        alone = build_tiny_model("llama", len(tiny_tokenizer)).eval()
        apply_masks(prunable_layers(alone), masks)
        assert together[tag] == evaluate_pruned(RunContext(cfg).loaded(alone, None), windows, tag), tag
