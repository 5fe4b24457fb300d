"""``scripts/gpu_check.py``, the device check (issue 25): its CPU form runs every part end to end and writes the
layout the device run writes (slow), its arguments and parts hold together (fast), and ``Timer`` records the
figures per stage the check reads from ``metrics.json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _gpu_check():
    return load_script("gpu_check")


def test_every_part_has_its_keys_its_reserve_and_its_function():
    gc = _gpu_check()
    assert gc.PARTS == ("probe", "cpu_vs_device", "checkpoint_7b", "drift_7b", "frozen_and_onload", "fsdp")
    assert set(gc.PART_KEYS) == set(gc.RESERVE) == set(gc.PART_FUNCTIONS) == set(gc.PARTS)
    for name in gc.PARTS:
        record = gc.empty_part(name)
        assert set(record) == {*gc.BASE_KEYS, *gc.PART_KEYS[name]} and all(v is None for v in record.values())
    assert set(gc.empty_run()) == set(gc.RUN_KEYS)


def test_defaults_fit_the_device_and_the_tiny_form_fits_its_positions():
    from unipruning_cli.stages.plan.architectures import ARCHITECTURES

    gc = _gpu_check()
    device = gc.parse_args(["--out", "o"])
    assert (device.arch, device.small_arch, device.seqlen, device.dtype) == \
        ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-0.5B", 4096, "bfloat16")
    assert device.arch in ARCHITECTURES and device.small_arch in ARCHITECTURES
    assert device.budget == 450 and device.steps >= 2 and device.parts == list(gc.PARTS)
    tiny = gc.parse_args(["--arch", "tiny", "--device", "cpu", "--out", "o", "--parts", "probe,drift_7b"])
    assert (tiny.small_arch, tiny.seqlen, tiny.dtype) == ("tiny", 256, "float32")
    assert tiny.seqlen <= gc.TINY["max_position_embeddings"] and tiny.parts == ["probe", "drift_7b"]
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", "o", "--parts", "probe,bogus"])
    with pytest.raises(SystemExit):
        gc.parse_args([])  # --out is needed, except by the helper modes
    assert gc.parse_args(["--fwdbwd", "m", "--seqlen", "8"]).fwdbwd == Path("m")


def test_step_seconds_start_at_step_two_and_stages_pair_with_the_plan():
    gc = _gpu_check()
    rows = [{"step": 2, "seconds": 5.5}, {"step": 1, "seconds": 5.0}, {"step": 3, "seconds": 6.1}]
    assert gc.step_deltas(rows) == [0.5, 0.6]  # step 1 (warm-up, pinning) left out
    plan = {"stages": [{"stage": "load", "gpu_gib": 1.0, "host_gib": 2.0},
                       {"stage": "prune", "gpu_gib": 3.0, "host_gib": 4.0}]}
    memory = {"stages_cuda_mib": {"load": 1024.0, "calibrate_prune": 2048.0, "between stages": 512.0},
              "stages_cuda_reserved_mib": {"load": 1536.0, "calibrate_prune": 3072.0},
              "host_peak_so_far_mib": {"load": 100.0}, "stages_mem_available_mib": {"load": 2048.0}}
    rows = {r["stage"]: r for r in gc.compare_stages(plan, memory, {"load": 1.5, "total": 9.0})}
    assert list(rows) == ["load", "prune", "between stages"]  # "total" is no stage
    assert rows["prune"]["allocated_gib"] == 2.0 and rows["prune"]["reserved_gib"] == 3.0
    assert rows["load"]["mem_available_gib"] == 2.0 and rows["load"]["seconds"] == 1.5
    assert rows["between stages"]["planned_gpu_gib"] is None


def test_a_stage_records_mem_available_and_cuda_figures_only_where_cuda_is_in_use():
    from unipruning_cli.core.progress import Timer, pinned_host_bytes

    timer = Timer()
    with timer.stage("work"):
        torch.ones(1000).sum()
    assert timer.mem_available_mib["work"] > 0 and timer.host_peak_mib["work"] > 0
    pinned = pinned_host_bytes()
    assert pinned is None or pinned >= 0
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert timer.cuda_peak_mib == timer.cuda_reserved_mib == timer.pinned_host_mib == {}


@pytest.mark.slow
def test_the_cpu_form_runs_every_part_and_writes_the_device_layout(tmp_path):
    gc = _gpu_check()
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "tiny", "--device", "cpu", "--ranks", "2",
                           "--out", str(out), "--work", str(work)], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert proc.returncode == 0, {n: p["error"] for n, p in parts.items()}
    assert list(parts) == list(gc.PARTS)
    for name, record in parts.items():
        assert set(record) == {*gc.BASE_KEYS, *gc.PART_KEYS[name]}, name
        assert record["ok"] is True, (name, record["error"])
        assert record["disk_peak_gib"] is not None and record["seconds"] > 0
    probe = parts["probe"]
    assert probe["pinned_expected_bytes"] == 536870912 and probe["torch"] == torch.__version__
    assert probe["context_mib"] is None and probe["pinned_probe_bytes"] is None  # CUDA-only: null on a CPU
    assert probe["sharded_buffers"]["ok"] and probe["probe_errors"] == {}  # load_sharded in a world of one rank
    same = parts["cpu_vs_device"]
    assert same["masks_kept_in_common"] == 1.0 and same["gamma_rel_diff_worst_matrix"] <= 1e-6
    runs = [parts["drift_7b"]["run"], parts["checkpoint_7b"]["run"], parts["frozen_and_onload"]["frozen"],
            parts["frozen_and_onload"]["sparsegpt_onload"], parts["fsdp"]["run"]]
    for run in runs:
        assert set(run) == set(gc.RUN_KEYS) and run["returncode"] == 0 and run["plan"]["fits"] is True
        measured = [row for row in run["stages"] if row["seconds"] is not None]
        assert measured and all(row["mem_available_gib"] > 0 and row["host_peak_so_far_gib"] > 0 for row in measured)
    drift = parts["drift_7b"]
    assert drift["run"]["search_steps"] == 3 and len(drift["run"]["search_step_deltas"]) == 2
    assert drift["fwdbwd"]["seconds"] > 0 and drift["fwdbwd"]["seconds_checkpointed"] > 0
    assert drift["step_over_fwdbwd"] is not None and drift["gamma_gib"] is not None
    checkpoint = parts["checkpoint_7b"]
    assert checkpoint["truncated"] is True and checkpoint["checkpoint_files"] > 0
    assert checkpoint["full_depth_checkpoint_gib"] >= checkpoint["checkpoint_gib"] > 0
    assert parts["fsdp"]["ranks"] == 2 and parts["fsdp"]["gamma_rel_diff_worst_matrix"] < 1e-5
    assert 0 < report["disk_peak_gib"] < 1
    assert not any((work / "models").iterdir()), "each part removes its models"
    summary = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(out / "gpu_check.json")],
                             capture_output=True, text=True, check=True).stdout
    assert all(f"[{name}] ok" in summary for name in gc.PARTS)
