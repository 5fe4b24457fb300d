"""The drift search over several ranks (``torchrun``, FSDP2, gloo on this CPU): the same Γ and masks as one process,
one run directory written by rank 0 alone, resume after a rank is killed; the launch checks and the plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _helpers import (
    assert_same_run,
    cli_env,
    sharded_overrides,
    single_and_sharded,
    tiny_overrides,
    torchrun_command,
)
from unipruning_cli.core.distributed import Ranks, launch_ranks, row_range
from unipruning_cli.core.errors import UserError

# The default suite runs Qwen2 here and Llama with rho > 0 in the resume test below (about 2 minutes on 2 cores);
# make test-slow runs the rest.
@pytest.mark.parametrize("model,rho", [
    pytest.param("llama", 0.0, marks=pytest.mark.slow),
    pytest.param("llama", 0.5, marks=pytest.mark.slow),
    pytest.param("qwen2", 0.0),
    pytest.param("qwen2", 0.5, marks=pytest.mark.slow),
])
@pytest.mark.e2e
def test_two_ranks_give_the_single_process_gamma_and_masks_in_one_run_directory(
        model, rho, tmp_path, tiny_tokenizer, corpus_files):
    from _helpers import build_tiny_model

    model_dir = tmp_path / model
    build_tiny_model(model, len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    args = sharded_overrides(model_dir, corpus_files, f"schedule.rho={rho}", "local_metric=ria" if model == "qwen2" else
                      "local_metric=stochria")
    single, sharded, t_single, t_sharded = single_and_sharded(tmp_path, args)
    print(f"{model} rho={rho}: one process {t_single:.1f} s, 2 ranks {t_sharded:.1f} s")
    assert_same_run(single, sharded)


@pytest.mark.e2e
def test_a_rank_killed_mid_search_then_a_rerun_resumes_and_ends_with_the_same_gamma(
        tiny_llama_dir, corpus_files, tmp_path, monkeypatch):
    import psutil

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.commands.prune import run_prune

    args = sharded_overrides(tiny_llama_dir, corpus_files, "schedule.steps=20", "schedule.rho=0.5")
    run = tmp_path / "run"
    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    cmd = torchrun_command([*args, f"hydra.run.dir={run}"])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run / "checkpoints" / "search.json"
    deadline = time.time() + 240
    while not pointer.exists():
        assert proc.poll() is None and time.time() < deadline, "the search ended or stalled before its first checkpoint"
        time.sleep(0.01)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    ranks[0].suspend()  # rank 0 then waits on rank 1 in the next collective: the search cannot end meanwhile
    os.kill(ranks[0].pid, signal.SIGKILL)
    assert proc.wait(timeout=240) != 0
    assert not (run / "gamma.safetensors").exists()  # killed mid-search
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "resuming the drift search at step" in out
    # the reference: the same search, uninterrupted, in one process (this one: no second interpreter to start)
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_prune(compose_prune(args), tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    assert_same_run(tmp_path / "single", run, same_files=False)
    assert not (tmp_path / "runs").exists()  # hydra.run.dir given: no rank made a folder of its own


def _sharded_worker(rank: int, world: int, port: int) -> None:
    """One rank of :func:`test_sharded_prox_gather_and_log_equal_the_whole_matrix_s` (gloo, CPU)."""
    import torch.distributed as dist

    from unipruning_cli.search.log import sample_index, summarise
    from unipruning_cli.search.regularizers import EXACT_QUANTILE_MAX, L1Prox
    from unipruning_cli.search.shards import RowShards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks, shards = Ranks(rank, world), RowShards(Ranks(rank, world))
        for rows, cols in ((1201, 1000), (37, 50)):  # above EXACT_QUANTILE_MAX (sampled quantile), and below it
            assert (rows * cols > EXACT_QUANTILE_MAX) == (rows == 1201)
            v = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
            start, stop = row_range(rows, ranks)
            local = v[start:stop].clone()
            prox = L1Prox(0.05)
            whole = prox(v, torch.Generator().manual_seed(1))
            mine = prox(local, torch.Generator().manual_seed(1), shards.magnitudes(local, v.shape))
            assert torch.equal(mine, whole[start:stop])
            assert torch.equal(shards.gather(mine, rows), whole)
            index = {"m": sample_index(v.numel(), 3)}
            got = shards.summarise({"m": mine}, index, {"m": v.shape})
            want = summarise({"m": whole}, index)
            assert got.keys() == want.keys()
            assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)
    finally:
        dist.destroy_process_group()


def test_sharded_prox_gather_and_log_equal_the_whole_matrix_s():
    """Three ranks with uneven row shards: the prox's λ-quantile (sampled above 10⁶ entries, whole below), the
    gather of Γ and the log's Γ summary equal those of the whole matrix in one process."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(3, 29400 + os.getpid() % 500), nprocs=3, join=True)


@pytest.mark.parametrize("rows,world", [(1, 2), (5, 2), (64, 2), (96, 8), (7, 3), (2, 4)])
def test_row_shards_follow_torch_chunk_as_fsdp2_shard0_does(rows, world):
    reference = torch.arange(rows).chunk(world)  # FSDP2's Shard(0): torch.chunk, the trailing ranks may be empty
    for r in range(world):
        start, stop = row_range(rows, Ranks(r, world))
        expected = reference[r].tolist() if r < len(reference) else []
        assert list(range(start, stop)) == expected


def test_the_launch_is_read_from_torchrun_and_slurm_variables():
    assert launch_ranks({}) == Ranks()
    assert launch_ranks({"RANK": "0", "WORLD_SIZE": "1"}).world == 1
    assert launch_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1, "torchrun")
    step = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert launch_ranks(step) == Ranks(5, 8, 1, "slurm")
    assert launch_ranks({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}).world == 1  # a batch script: one process
    assert launch_ranks({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}).world == 1


@pytest.mark.parametrize("extra,message", [
    (["method=local", "local_metric=wanda"], "method=local"),
    (["schedule.weight_mode=frozen"], "weight_mode=frozen"),
    (["model.device_map=auto"], "model.device_map"),
    (["schedule.drift_dtype=float32", "model.dtype=bfloat16"], "drift_dtype=float32"),
    pytest.param(["schedule.fsdp_offload=true"], "fsdp_offload=true",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="offload is refused only without a GPU")),
])
def test_what_several_ranks_cannot_run_is_refused_before_any_weight_is_read(extra, message, tiny_llama_dir,
                                                                            corpus_files, monkeypatch, tmp_path):
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.sharded_search import check_sharded_run

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    cfg = compose_prune([*base, "method=unipruning", *extra])
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        check_sharded_run(cfg, Ranks(1, 2, 1, "torchrun"))
    check_sharded_run(compose_prune([*base, "method=unipruning"]), Ranks(1, 2, 1, "torchrun"))  # the drift search: fine


def test_a_sweep_under_torchrun_is_refused_with_the_launcher_that_does_it(monkeypatch):
    from unipruning_cli.cli import _rank_overrides

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="hydra/launcher=slurm"):
        _rank_overrides(["-m", "regularizer.lam=0,0.01"])


def test_plan_says_the_70b_drift_search_fits_8_gpus_of_80gb_and_how(tmp_path, monkeypatch):
    import json

    from unipruning_cli.commands.plan import plan_command

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "plan.json"
    plan_command(["model=llama-3.1-70b", "--gpus", "8", "--gpu-memory", "80GiB", "--host-memory", "2TiB",
                  "--json", str(out)])
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["ranks"] == 8
    stages = {s["stage"]: s for s in plan["stages"]}
    assert "FSDP2 over 8 ranks" in plan["placement"]
    assert stages["search"]["gpu_gib"] <= 0.92 * 80
    # one GPU of 80 GB cannot hold it: the single-process plan says so
    one = tmp_path / "one.json"
    plan_command(["model=llama-3.1-70b", "--gpus", "1", "--gpu-memory", "80GiB", "--json", str(one)])
    assert not json.loads(one.read_text())["fits"]


@pytest.mark.slow
@pytest.mark.e2e
def test_an_srun_step_of_two_tasks_runs_the_sharded_search_in_one_run_directory(tiny_llama_dir, corpus_files, tmp_path):
    """Two processes with the variables ``srun --ntasks 2`` sets (no SLURM here): ranks from SLURM_* via submitit."""
    args = sharded_overrides(tiny_llama_dir, corpus_files)
    procs = []
    for rank in (0, 1):
        env = {**cli_env(tmp_path / "runs", tmp_path / "cache"), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR", "UNIPRUNING_LAUNCHER"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "unipruning_cli", "prune", *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    runs = list((tmp_path / "runs" / "prune").iterdir())
    assert len(runs) == 1
    info = json.loads((runs[0] / "stages" / "search.json").read_text())["info"]
    assert info["ranks"] == 2 and info["launcher"] == "slurm"
