"""A ρ x λ sweep through Hydra's multirun on a tiny model, its report, and a failing job inside it."""

from __future__ import annotations

import csv
import json

import pytest

from _helpers import cli_env, merge_overrides, run_cli, tiny_overrides

pytestmark = pytest.mark.e2e  # sweeps and reports through the CLI in subprocesses


def test_grid_sweep_report_with_a_failed_job(tmp_path, tiny_llama_dir, corpus_files):
    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    base = merge_overrides(tiny_overrides(tiny_llama_dir, corpus_files), "method=unipruning", "local_metric=stochria",
                           "schedule.weight_mode=drift", "schedule.steps=2", "schedule.lr=1e-2")
    # dual_step=2 is out of range: that job must fail on its own and be reported, the others must land
    proc, _ = run_cli(["prune", "-m", *base, "regularizer.lam=0,1e-2", "schedule.rho=0,1e-3", "schedule.dual_step=0.01,2"],
                      tmp_path, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 8
    failed = [j for j in jobs if (j / "error.json").exists()]
    done = [j for j in jobs if (j / "metrics.json").exists()]
    assert len(failed) == 4 and len(done) == 4
    # ρ = 0: W does not depend on Γ, so the first λ's job searched both λ in one pass; ρ > 0: one each
    searched = [j for j in done if "search" in json.loads((j / "metrics.json").read_text())["seconds"]]
    assert len(searched) == 3

    proc, _ = run_cli(["report", str(sweep)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 8
    assert sum(r["status"] == "failed" for r in rows) == 4
    assert all("dual_step" in r["error"] for r in rows if r["status"] == "failed")
    assert sum("(best)" in r["job"] for r in rows) == 1
    assert "1 of 4 jobs reused another job's search" in (sweep / "report.md").read_text()


def test_two_axis_sweep_draws_a_heatmap(tmp_path, tiny_llama_dir, corpus_files):
    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    base = merge_overrides(tiny_overrides(tiny_llama_dir, corpus_files), "method=unipruning", "schedule.weight_mode=frozen",
                           "schedule.steps=2")
    proc, _ = run_cli(["prune", "-m", *base, "regularizer.lam=0,1e-2", "schedule.dual_step=0.01,0.1"], tmp_path, env,
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "multirun").iterdir())
    proc, _ = run_cli(["report", str(sweep)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "report.png").stat().st_size > 10_000
    # the model is loaded once per sweep process, not once per job
    logs = "".join(p.read_text() for p in sweep.glob("*/prune.log"))
    assert logs.count("model reused from the previous job") == 3


def test_report_refuses_a_folder_that_is_no_sweep(tmp_path):
    proc, _ = run_cli(["report", str(tmp_path)], tmp_path, cli_env(None, None))
    assert proc.returncode == 2 and "no sweep jobs" in proc.stderr


def test_jobs_with_the_same_search_share_it(tmp_path, tiny_llama_dir, corpus_files):
    """Sparsity never changes Γ, nor does ρ when W is frozen: four jobs, one search."""
    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    base = merge_overrides(tiny_overrides(tiny_llama_dir, corpus_files), "method=unipruning", "schedule.weight_mode=frozen",
                           "schedule.steps=2")
    proc, _ = run_cli(["prune", "-m", *base, "sparsity=0.5,0.6", "schedule.rho=0,1e-3"], tmp_path, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "multirun").iterdir())
    searched = [p for p in sweep.glob("*/metrics.json") if "search" in json.loads(p.read_text())["seconds"]]
    assert len(searched) == 1
    proc, _ = run_cli(["report", str(sweep)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 4 jobs reused another job's search" in (sweep / "report.md").read_text()
