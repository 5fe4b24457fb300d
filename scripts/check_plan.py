"""The memory plan against reality: ``unipruning plan`` and ``unipruning prune`` with the same overrides, each in
its own process, and the planned peak host memory (and GPU memory, where there is one) over the measured.

    python scripts/check_plan.py schedule.steps=3 calibration.nsamples=8 eval.max_windows=2
    python scripts/check_plan.py model=local model.path=/models/random-1b model.dtype=bfloat16 method=local
    python scripts/check_plan.py --random meta-llama/Llama-3.2-1B method=local   # a random-weight 1B model, bf16

``--random HUB_ID`` builds a random-weight model with that named architecture (``plan.architectures``) in bf16,
with a small tokenizer and two generated corpora (``scripts/gpu_check.py``'s builder), and points the run at it.

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
           "measured_host_gib": round(memory["peak_rss_mib"] / 1024, 3),
           "planned_stages_host_gib": {s["stage"]: s["host_gib"] for s in planned["stages"]},
           "measured_host_peak_so_far_gib": {k: round(v / 1024, 3) for k, v in memory.get("host_peak_so_far_mib", {}).items()}}
    out["host_ratio"] = round(out["planned_host_gib"] / out["measured_host_gib"], 3)
    if "peak_cuda_mib" in memory:
        out |= {"planned_gpu_gib": planned["peak_gpu_gib"], "measured_gpu_gib": round(memory["peak_cuda_mib"] / 1024, 3)}
        out["gpu_ratio"] = round(out["planned_gpu_gib"] / out["measured_gpu_gib"], 3)
    print(json.dumps(out))
    return out


def with_random_model(args: list[str]) -> list[str]:
    """``--random HUB_ID [--work DIR]`` replaced by the overrides of a freshly built random-weight model."""
    if "--random" not in args:
        return args
    from gpu_check import build

    i = args.index("--random")
    arch, rest = args[i + 1], args[:i] + args[i + 2:]
    work = Path(tempfile.gettempdir()) / "check_plan_random"
    if not (work / "model" / "config.json").exists():
        build(arch, work, "cpu", "bfloat16")
    return [f"model=local", f"model.path={work / 'model'}", "model.dtype=bfloat16", "model.seqlen=256",
            f"calibration.source={work / 'calib.txt'}", "calibration.nsamples=8",
            f"eval.corpora=[{work / 'eval.txt'}]", "eval.max_windows=2", *rest]


if __name__ == "__main__":
    main(with_random_model(sys.argv[1:]))
