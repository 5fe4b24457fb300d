"""scripts/bench_methods.py's cost column (issue 29, step 4): refining and reconstructing a cut, counted in the same
run's calibration passes; the jobs carry the chosen reconstruction."""

from __future__ import annotations

import pytest
from _helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_methods")


def test_cost_is_the_refine_and_reconstruct_stages_per_cut_over_the_calibration_pass(bench):
    one = {"seconds": {"calibrate_prune": 200.0, "refine": 0.0, "reconstruct": 500.0}, "results": {"2of4": {}}}
    assert bench.passes_per_cut(one) == pytest.approx(2.5)
    two = {"seconds": {"calibrate_prune": 100.0, "refine": 300.0, "reconstruct": 100.0}, "results": {"a": {}, "b": {}}}
    assert bench.passes_per_cut(two) == pytest.approx(2.0)
    assert bench.passes_per_cut({"seconds": {"calibrate_prune": 100.0}, "results": {"a": {}}}) is None
    assert bench.passes_per_cut({"seconds": {"search": 100.0, "reconstruct": 5.0}, "results": {"a": {}}}) is None


def test_jobs_carry_the_reconstruction_but_not_to_sparsegpt(bench):
    todo = bench.jobs(True, reconstruct="admm", refine=True)
    for label, ov in todo:
        assert ("reconstruct=admm" in ov and "refine=swap" in ov) == (label != "sparsegpt"), (label, ov)
    assert all(not any(o.startswith("reconstruct") for o in ov) for _, ov in bench.jobs(True))
