"""``unipruning eval <run_dir>``: re-evaluating a finished run reproduces it and adds new cuts."""

from __future__ import annotations

import json

import pytest

from unipruning_cli.errors import UserError
from unipruning_cli.evaluation.existing_run import evaluate_run
from unipruning_cli.runner import run_prune


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
