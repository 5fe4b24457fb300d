"""A run whose search equals an earlier one's adopts its Γ instead of searching again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from unipruning_cli.core.rundir import link_or_copy, load_tensors
from unipruning_cli.commands.prune import run_prune
from unipruning_cli.stages.search_store import search_fingerprint
from unipruning_cli.search import regularizers as REG
from unipruning_cli.core.sweep import SweepContext


def _search_stage(run: Path) -> dict:
    return json.loads((run / "stages" / "search.json").read_text())


def test_a_new_sparsity_reuses_the_search_and_gives_the_same_gamma(frozen_search_cfg, tmp_path):
    first = run_prune(frozen_search_cfg("sparsity=0.5"), tmp_path / "a")
    assert "search" in first["seconds"] and "reused_from" not in _search_stage(tmp_path / "a")["info"]

    second = run_prune(frozen_search_cfg("sparsity=0.7"), tmp_path / "b")
    assert "search" not in second["seconds"]  # no search ran
    assert _search_stage(tmp_path / "b")["info"]["reused_from"] == str((tmp_path / "a").resolve())
    ga, gb = load_tensors(tmp_path / "a" / "gamma.safetensors"), load_tensors(tmp_path / "b" / "gamma.safetensors")
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert abs(second["sparsity"]["overall"] - 0.7) < 1e-3

    # searching again from scratch gives the very same Γ: reuse changes nothing but the time
    third = run_prune(frozen_search_cfg("sparsity=0.7", "reuse_search=false"), tmp_path / "c")
    assert "search" in third["seconds"]
    gc = load_tensors(tmp_path / "c" / "gamma.safetensors")
    assert all(torch.equal(ga[k], gc[k]) for k in ga)
    assert third["results"] == second["results"]


def test_what_the_search_does_not_depend_on_is_left_out_of_its_fingerprint(frozen_search_cfg):
    base = search_fingerprint(frozen_search_cfg())
    # frozen W: the weight optimiser's knobs, the checkpoint interval, sparsity and pattern cannot change Γ
    for same in (["schedule.rho=1e-3"], ["schedule.lr=1e-2"], ["schedule.checkpoint_every=1"], ["sparsity=0.6"],
                 ["pattern=2:4"], ["calibration.mode=sequential"], ["eval.max_windows=2"]):
        assert search_fingerprint(frozen_search_cfg(*same)) == base, same
    for other in (["regularizer.lam=1e-2"], ["schedule.steps=4"], ["schedule.dual_step=0.1"], ["seed=1"],
                  ["calibration.nsamples=4"], ["local_metric=wanda"], ["schedule.weight_mode=drift"]):
        assert search_fingerprint(frozen_search_cfg(*other)) != base, other
    # in drift mode ρ and lr steer W, so they do count
    drift = search_fingerprint(frozen_search_cfg("schedule.weight_mode=drift"))
    assert search_fingerprint(frozen_search_cfg("schedule.weight_mode=drift", "schedule.rho=1e-3")) != drift
    assert search_fingerprint(frozen_search_cfg("schedule.weight_mode=drift", "schedule.lr=1e-2")) != drift


def test_a_deleted_or_different_source_run_is_not_reused(frozen_search_cfg, tmp_path):
    run_prune(frozen_search_cfg(), tmp_path / "a")
    other = run_prune(frozen_search_cfg("regularizer.lam=1e-2"), tmp_path / "b")
    assert "search" in other["seconds"]  # another λ: a search of its own
    shutil.rmtree(tmp_path / "a")
    again = run_prune(frozen_search_cfg(), tmp_path / "c")
    assert "search" in again["seconds"]  # the recorded run is gone: search, and record this one
    assert not (tmp_path / "a").exists()  # looking it up did not recreate it
    fourth = run_prune(frozen_search_cfg("sparsity=0.6"), tmp_path / "d")
    assert _search_stage(tmp_path / "d")["info"]["reused_from"] == str((tmp_path / "c").resolve())
    assert "search" not in fourth["seconds"]


def test_link_or_copy_shares_content_and_survives_replacing_the_source(tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "sub" / "dst.bin"
    src.write_bytes(b"gamma")
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"gamma"
    tmp = tmp_path / "new.bin"
    tmp.write_bytes(b"other")
    tmp.replace(src)  # how artifacts are rewritten: the linked copy keeps the old content
    assert dst.read_bytes() == b"gamma"
    link_or_copy(src, dst)  # and an existing destination is replaced
    assert dst.read_bytes() == b"other"


# ------------------------------------------------------------------------------- λ siblings in one pass


def _gamma(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "gamma.safetensors")


@pytest.mark.parametrize("mode", ["frozen", "drift"])
def test_one_pass_serves_every_lam_of_a_sweep_and_each_gamma_equals_its_own_search(frozen_search_cfg, tmp_path,
                                                                                   monkeypatch, mode):
    # Force the prox's sampled quantile on these tiny matrices, so the lanes' random streams are exercised.
    monkeypatch.setattr(REG, "EXACT_QUANTILE_MAX", 16)
    monkeypatch.setattr(REG, "QUANTILE_SAMPLE", 8)
    mode_args = [f"schedule.weight_mode={mode}", "schedule.rho=0", "schedule.lr=1e-2"]
    sweep = SweepContext(dir=tmp_path / "sweep", lams=(0.0, 1e-2, 5e-2))
    first = run_prune(frozen_search_cfg(*mode_args, "regularizer.lam=1e-2"), sweep.dir / "0", sweep=sweep)
    assert "search" in first["seconds"]
    assert _search_stage(sweep.dir / "0")["info"]["lams_in_pass"] == [1e-2, 0.0, 5e-2]
    for job, lam in (("1", "0"), ("2", "5e-2")):
        later = run_prune(frozen_search_cfg(*mode_args, f"regularizer.lam={lam}"), sweep.dir / job, sweep=sweep)
        assert "search" not in later["seconds"]  # adopted from the first job's pass
        source = Path(_search_stage(sweep.dir / job)["info"]["reused_from"])
        assert source.parent == (sweep.dir / ".searches").resolve()
        alone = run_prune(frozen_search_cfg(*mode_args, f"regularizer.lam={lam}", "reuse_search=false"),
                          tmp_path / f"alone-{lam}")
        assert "search" in alone["seconds"]
        ga, gb = _gamma(sweep.dir / job), _gamma(tmp_path / f"alone-{lam}")
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
        assert later["results"] == alone["results"]
    # the λ lanes differ from each other (the prox did act)
    assert not torch.equal(_gamma(sweep.dir / "1")[next(iter(ga))], _gamma(sweep.dir / "0")[next(iter(ga))])


def test_no_lanes_where_w_depends_on_gamma_or_when_turned_off(frozen_search_cfg, tmp_path):
    sweep = SweepContext(dir=tmp_path / "sweep", lams=(0.0, 1e-2))
    for i, extra in enumerate([("schedule.weight_mode=drift", "schedule.rho=1e-3"), ("share_lam_search=false",),
                               ("reuse_search=false",)]):
        run_prune(frozen_search_cfg(*extra, "regularizer.lam=0"), sweep.dir / str(i), sweep=sweep)
        assert "lams_in_pass" not in _search_stage(sweep.dir / str(i))["info"]
    assert not (sweep.dir / ".searches").exists()


def test_a_lam_the_sweep_cannot_run_is_left_to_its_own_job(frozen_search_cfg, tmp_path):
    sweep = SweepContext(dir=tmp_path / "sweep", lams=(0.0, 1e-2, 2.0))  # a quantile level of 2 is invalid
    run_prune(frozen_search_cfg("regularizer.lam=0"), sweep.dir / "0", sweep=sweep)
    assert _search_stage(sweep.dir / "0")["info"]["lams_in_pass"] == [0.0, 1e-2]


def test_a_drift_search_refuses_lam_siblings_when_rho_is_positive(tmp_path):
    from unipruning_cli.search import L1Prox, LamSibling, SearchSettings, search_drift

    with pytest.raises(ValueError, match="rho=0"):
        search_drift(None, {}, torch.zeros(1, 1), None, L1Prox(0.0), SearchSettings(rho=1e-3), tmp_path / "c", "fp",
                     tmp_path / "l.jsonl", siblings=[LamSibling(L1Prox(1e-2), tmp_path / "s.jsonl")])


def test_sweep_values_reads_what_the_sweep_gives_a_key(tmp_path):
    from unipruning_cli.core.sweep import sweep_context, sweep_values

    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        "method=unipruning", "regularizer.lam=0,1e-3,1e-2", "schedule.rho=choice(0,1e-5)", "seed=range(0,3)",
        "schedule.lr=interval(0.1,1.0)"]}}}))
    assert sweep_values(tmp_path, "regularizer.lam") == ["0", "0.001", "0.01"]
    assert sweep_values(tmp_path, "schedule.rho") == ["0", "1e-05"]
    assert sweep_values(tmp_path, "seed") == ["0", "1", "2"]
    assert sweep_values(tmp_path, "schedule.lr") == []  # an interval cannot be enumerated
    assert sweep_values(tmp_path, "method") == []  # not swept
    assert sweep_context(tmp_path).lams == (0.0, 1e-3, 1e-2)
    assert sweep_context(tmp_path / "none").lams == ()


def test_file_locks_exclude_another_process_until_released(tmp_path):
    import fcntl
    import subprocess
    import sys

    lock = tmp_path / "a.lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys; from unipruning_cli.core.rundir import file_locks\n"
        f"with file_locks([{str(tmp_path / 'b.lock')!r}, {str(lock)!r}]):\n"
        "    print('held', flush=True); sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with open(lock, "a") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == 0
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the holder let go
    finally:
        child.kill()


def test_a_pass_takes_only_the_lams_that_fit_in_half_the_free_memory(monkeypatch):
    from unipruning_cli.stages import search_store as store

    sibs = ["a", "b", "c"]
    numel = 1000
    monkeypatch.setattr(store, "_available_host_bytes", lambda: 2 * 12 * numel * 2)  # two drift lanes on CPU
    assert store.siblings_that_fit(sibs, numel, "drift", torch.device("cpu")) == ["a", "b"]
    assert store.siblings_that_fit(sibs, numel, "frozen", torch.device("cpu")) == sibs  # 4 B each: six fit
    monkeypatch.setattr(store, "_available_host_bytes", lambda: 0)
    assert store.siblings_that_fit(sibs, numel, "frozen", torch.device("cpu")) == []


def test_knobs_added_later_leave_the_fingerprint_of_a_recorded_search_alone_at_their_defaults(frozen_search_cfg):
    """A search recorded before ``calibration.min_expert_tokens`` and ``schedule.router_aux_loss`` existed is still
    found: at their defaults they are not in the fingerprint; away from them they are."""
    from omegaconf import OmegaConf, open_dict

    from unipruning_cli.stages.search_store import search_fingerprint

    cfg = frozen_search_cfg()
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(old):
        del old.calibration["min_expert_tokens"]
        del old.schedule["router_aux_loss"]
    assert search_fingerprint(cfg) == search_fingerprint(old)
    assert search_fingerprint(frozen_search_cfg("calibration.min_expert_tokens=8")) != search_fingerprint(cfg)
