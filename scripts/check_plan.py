"""The memory plan against reality: ``unipruning plan`` and ``unipruning prune`` with the same overrides, each in
its own process, and the planned peak host memory (and GPU memory, where there is one) over the measured.

    python scripts/check_plan.py schedule.steps=3 calibration.nsamples=8 eval.max_windows=2
    python scripts/check_plan.py model=local model.path=/models/random-1b model.dtype=bfloat16 method=local

Prints one JSON line: planned and measured GiB and their ratios (the plan's aim: within 15 %).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run, plan = Path(tmp) / "run", Path(tmp) / "plan.json"
        env = {**os.environ, "UNIPRUNING_RUNS": tmp}
        cli = [sys.executable, "-m", "unipruning_cli.cli"]
        subprocess.run([*cli, "plan", *overrides, "--json", str(plan)], check=True, env=env, capture_output=True)
        subprocess.run([*cli, "prune", *overrides, "reuse_search=false", f"hydra.run.dir={run}"], check=True, env=env,
                       capture_output=True)
        planned = json.loads(plan.read_text())
        memory = json.loads((run / "metrics.json").read_text())["memory"]
    out = {"overrides": overrides, "planned_host_gib": planned["peak_host_gib"],
           "measured_host_gib": round(memory["peak_rss_mib"] / 1024, 3)}
    out["host_ratio"] = round(out["planned_host_gib"] / out["measured_host_gib"], 3)
    if "peak_cuda_mib" in memory:
        out |= {"planned_gpu_gib": planned["peak_gpu_gib"], "measured_gpu_gib": round(memory["peak_cuda_mib"] / 1024, 3)}
        out["gpu_ratio"] = round(out["planned_gpu_gib"] / out["measured_gpu_gib"], 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
