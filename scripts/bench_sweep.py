"""What a sweep saves over running its jobs one by one, on the embedded model.

Runs, each in a fresh process and with a fresh cache (nothing inherited from earlier runs):
1. one standalone ``unipruning prune`` with the grid's first values: what a user pays per job
   without a sweep (imports, model load, dense perplexity, search, cuts, evaluation);
2. the whole grid as one ``unipruning prune -m`` sweep.
Prints sweep wall time / (jobs x standalone wall time), and the per-stage seconds summed over the
jobs, so it shows which work ran once (load, dense evaluation, searches that equal another job's)
and which ran per job. Presets:
- ``paper``: the paper's Figure 3 grid, λ x ρ in drift mode: the three ρ = 0 jobs share one search pass
  (``share_lam_search``), each of the six ρ > 0 jobs needs its own search (ρ lets Γ steer W);
- ``cuts``: λ x sparsity (drift, ρ = 0): one pass searches the three λ, and every job adopts its Γ.

    python scripts/bench_sweep.py [--preset paper|cuts] [--steps 2] [--nsamples 8] [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import isolated_cache

PRESETS = {
    "paper": {"regularizer.lam": ["0", "1e-3", "1e-2"], "schedule.rho": ["0", "1e-5", "1e-3"]},
    "cuts": {"regularizer.lam": ["0", "1e-3", "1e-2"], "sparsity": ["0.5", "0.6", "0.7"]},
}


def prune(args: list[str], runs: Path, cache: Path) -> float:
    env = {**os.environ, "UNIPRUNING_RUNS": str(runs), "UNIPRUNING_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "unipruning_cli.cli", "prune", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prune {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def stage_seconds(runs: Path) -> dict[str, float]:
    total: dict[str, float] = {}
    for m in runs.rglob("metrics.json"):
        for stage, secs in json.loads(m.read_text())["seconds"].items():
            total[stage] = round(total.get(stage, 0.0) + secs, 1)
    return total


def main() -> None:
    from unipruning_cli.core.paths import cache_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()
    grid = PRESETS[args.preset]
    common = ["method=unipruning", "schedule.weight_mode=drift", f"schedule.steps={args.steps}",
              f"calibration.nsamples={args.nsamples}", f"eval.max_windows={args.windows}"]
    n_jobs = 1
    for values in grid.values():
        n_jobs *= len(values)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        isolated_cache(cache_dir(), tmp / "cache-one")
        isolated_cache(cache_dir(), tmp / "cache-sweep")
        one = prune([*common, *(f"{k}={v[0]}" for k, v in grid.items())], tmp / "one", tmp / "cache-one")
        print(f"standalone job: {one:.1f} s", flush=True)
        sweep = prune(["-m", *common, *(f"{k}={','.join(v)}" for k, v in grid.items())], tmp / "sweep",
                      tmp / "cache-sweep")
        res = {"preset": args.preset, "grid": grid, "common": common, "jobs": n_jobs,
               "standalone_s": round(one, 1), "sweep_s": round(sweep, 1),
               "ratio_sweep_over_jobs_x_standalone": round(sweep / (n_jobs * one), 3),
               "stage_seconds_standalone": stage_seconds(tmp / "one"),
               "stage_seconds_sweep_total": stage_seconds(tmp / "sweep")}
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
