"""Baselines under their published protocols (issue 17, findings 1-3): ``calibration.mode=auto``, ``eval.baselines``
with each metric's own protocol and allocation, and the options a method would ignore, refused."""

from __future__ import annotations

import copy

import pytest
import torch

from _helpers import build_tiny_model
from unipruning_cli.stages.baselines import Baseline, parse_baseline, sequential_masks
from unipruning_cli.data.calibration import calibrate_blockwise
from unipruning_cli.core.errors import UserError
from unipruning_cli.pruning.blockwise import LocalMetricPruning
from unipruning_cli.pruning.targets import Target, calibration_mode, make_target
from unipruning_cli.metrics import build_metric
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.stages.preflight import validate
from unipruning_cli.commands.prune import run_prune


@pytest.mark.parametrize("entry, expected", [
    ("wanda", Baseline("wanda", "sequential")), ("ria", Baseline("ria", "sequential")),
    ("wanda@one_shot", Baseline("wanda", "one_shot")), ("ria@sequential", Baseline("ria", "sequential")),
    ("magnitude", Baseline("magnitude", None))])
def test_a_baseline_runs_under_its_published_protocol_unless_told(entry, expected):
    assert parse_baseline(entry) == expected


@pytest.mark.parametrize("entry, words", [("wnda", "did you mean"), ("wanda@twice", "unknown protocol"),
                                          ("magnitude@sequential", "no protocol")])
def test_a_bad_baseline_entry_is_refused_with_what_to_write(entry, words):
    with pytest.raises(UserError, match=words):
        parse_baseline(entry)


def test_each_baseline_is_cut_with_its_own_comparison_group_not_the_runs():
    run_target = Target(0.6, "per_matrix")  # e.g. a UniPruning run cut per matrix
    assert parse_baseline("wanda").target(run_target) == Target(0.6, "per_row")
    assert parse_baseline("ria").target(Target(0.6, "per_row")) == Target(0.6, "per_matrix")
    nm = Target(0.5, "per_row", 2, 4)
    assert parse_baseline("ria").target(nm) == nm


@pytest.mark.parametrize("overrides, mode", [
    (["method=local", "local_metric=wanda"], "sequential"),
    (["method=local", "local_metric=ria", "pattern=2:4"], "sequential"),
    (["method=sparsegpt"], "sequential"),
    (["method=local", "local_metric=magnitude"], "one_shot"),
    (["method=local", "local_metric=wanda", "pattern.allocation=global"], "one_shot"),
    (["method=unipruning"], "one_shot"),
    (["method=local", "local_metric=wanda", "calibration.mode=one_shot"], "one_shot")])
def test_calibration_mode_auto_is_each_methods_published_protocol(overrides, mode, frozen_search_cfg):
    cfg = frozen_search_cfg(*overrides)
    assert cfg.calibration.mode in ("auto", "one_shot")
    assert calibration_mode(cfg) == mode


def test_sparsegpt_says_it_cuts_per_block_of_columns(frozen_search_cfg):
    assert make_target(frozen_search_cfg("method=sparsegpt", "sparsity=0.6")).tag == "s0.60_per_block"


@pytest.mark.parametrize("overrides, words", [
    (["method=sparsegpt", "pattern.allocation=per_row"], "pattern.allocation"),
    (["method=local", "eval.baselines=[wanda]"], "eval.baselines"),
    (["method=sparsegpt", "export.sparsities=[0.5,0.6]"], "export.sparsities"),
    (["method=local", "local_metric=magnitude", "calibration.mode=sequential"], "calibration.mode"),
    (["eval.baselines=[wanda@often]"], "unknown protocol")])
def test_an_option_the_method_would_ignore_is_refused(overrides, words, frozen_search_cfg):
    with pytest.raises(UserError, match=words):
        frozen_search_cfg(*overrides)


def _windows(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (4, 24), generator=torch.Generator().manual_seed(2))


def test_sequential_masks_are_the_sequential_prune_and_the_model_comes_back_bit_for_bit(tiny_tokenizer):
    """The masks equal those of a plain sequential prune (block i scored on the outputs of the pruned blocks < i),
    differ from the one-shot masks, and the model's weights are as before the pass."""
    torch.set_num_threads(1)
    vocab = len(tiny_tokenizer)
    windows = _windows(vocab)
    target = Target(0.6, "per_row")
    method = LocalMetricPruning(build_metric("wanda"))
    model = build_tiny_model("llama", vocab)
    before = copy.deepcopy(model.state_dict())
    got = sequential_masks(model, windows, method, target)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # the reference: prune a copy for good, block after block, on the pruned model's own activations
    pruned = build_tiny_model("llama", vocab)
    layers = prunable_layers(pruned)
    expected = {}
    for i in range(len(pruned.model.layers)):
        stats = calibrate_blockwise(pruned, windows)  # one-shot statistics of the model as pruned so far
        block = {n: m for n, m in layers.items() if n.startswith(f"model.layers.{i}.")}
        masks = target.cut({n: build_metric("wanda").score(m.weight, stats[n]) for n, m in block.items()})
        with torch.no_grad():
            for n, m in masks.items():
                block[n].weight.mul_(m)
        expected |= masks
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)
    one_shot_stats = calibrate_blockwise(build_tiny_model("llama", vocab), windows)
    one_shot = target.cut({n: build_metric("wanda").score(m.weight, one_shot_stats[n])
                           for n, m in prunable_layers(model).items()})
    assert any(not torch.equal(got[n], one_shot[n]) for n in got if ".layers.0." not in n)


def test_a_unipruning_run_reports_each_baseline_with_its_protocol_and_allocation(frozen_search_cfg, tmp_path):
    cfg = frozen_search_cfg("sparsity=0.5", "eval.baselines=[wanda,ria@one_shot,magnitude]", "eval.dense=false")
    validate(cfg)
    metrics = run_prune(cfg, tmp_path / "run")
    tags = set(metrics["results"])
    assert {"wanda@sequential:s0.50_per_row", "ria@one_shot:s0.50_per_matrix",
            "magnitude:s0.50_per_matrix"} <= tags
    for tag in tags:
        assert metrics["results"][tag]["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
