"""Sweeps through the optional Hydra launchers: joblib (parallel processes on one machine) and
submitit (the SLURM launcher's machinery, run with its local executor, since no cluster is here)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from _helpers import cli_env, merge_overrides, run_cli, tiny_overrides

pytestmark = pytest.mark.e2e  # sweeps through the launchers, the CLI in subprocesses


def _plugin(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]' installs it)")


def _sweep(tmp_path, tiny_llama_dir, corpus_files, *launcher: str):
    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    base = merge_overrides(tiny_overrides(tiny_llama_dir, corpus_files), "method=unipruning",
                           "schedule.weight_mode=frozen", "schedule.steps=2")
    proc, _ = run_cli(["prune", "-m", *base, *launcher, "regularizer.lam=0,1e-2"], tmp_path, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2
    lams = sorted(json.loads((j / "metrics.json").read_text())["search"]["regularizer"]["lam"] for j in jobs)
    assert lams == [0.0, 1e-2]
    proc, _ = run_cli(["report", str(sweep)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_joblib_launcher_runs_the_jobs_in_parallel_processes(tmp_path, tiny_llama_dir, corpus_files):
    _plugin("hydra_plugins.hydra_joblib_launcher")
    sweep = _sweep(tmp_path, tiny_llama_dir, corpus_files, "hydra/launcher=joblib_local", "hydra.launcher.n_jobs=2")
    # Both jobs start at once; the search locks make one wait for the other's pass over both λ.
    searched = [p for p in sweep.glob("*/metrics.json") if "search" in json.loads(p.read_text())["seconds"]]
    assert len(searched) == 1


@pytest.mark.slow  # submitit's executor spawns the jobs as processes (about 20 s): make test-slow
def test_submitit_launcher_runs_the_jobs(tmp_path, tiny_llama_dir, corpus_files):
    _plugin("hydra_plugins.hydra_submitit_launcher")
    sweep = _sweep(tmp_path, tiny_llama_dir, corpus_files, "hydra/launcher=submitit_local",
                   "hydra.launcher.timeout_min=10")
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit's executor


def test_the_slurm_launcher_config_composes(tmp_path):
    _plugin("hydra_plugins.hydra_submitit_launcher")
    proc, _ = run_cli(["prune", "hydra/launcher=slurm", "--cfg", "hydra", "--package", "hydra.launcher"],
                      tmp_path, cli_env(tmp_path / "runs", tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SlurmLauncher" in proc.stdout and "gpus_per_node: 1" in proc.stdout
