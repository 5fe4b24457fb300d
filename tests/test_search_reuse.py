"""A run whose search equals an earlier one's adopts its Γ instead of searching again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from unipruning_cli.rundir import link_or_copy, load_tensors
from unipruning_cli.runner import run_prune, search_fingerprint


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
