"""Helpers shared by the CLI / end-to-end test modules (not a test module itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

# What a run leaves behind; none of it may exist after a refused run.
ARTIFACTS = ("config.yaml", "metrics.json", "summary.md", "calibration.safetensors", "calibration.json")
LLAMA_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "unipruning"
    if script.exists():
        return [str(script)]
    found = shutil.which("unipruning")
    return [found] if found else [sys.executable, "-m", "unipruning_cli.cli"]


def cli_env(runs: Path | None, cache: Path | None, threads: int | None = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("UNIPRUNING_RUNS", None)
    env.pop("UNIPRUNING_CACHE", None)
    if runs is not None:
        env["UNIPRUNING_RUNS"] = str(runs)
    if cache is not None:
        env["UNIPRUNING_CACHE"] = str(cache)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HYDRA_FULL_ERROR="0", COLUMNS="200")
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*cli_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def merge_overrides(base: list[str], *extra: str) -> list[str]:
    """``base`` with any key that ``extra`` sets removed, then ``extra`` (Hydra rejects duplicates)."""
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


def linears(model) -> dict[str, nn.Linear]:
    """Every Linear inside model.model.layers, by full name (independent of unipruning_cli.models)."""
    return {f"model.layers.{i}.{n}": m for i, block in enumerate(model.model.layers)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def hook_sq_sums(model, windows: torch.Tensor, only: str | None = None) -> dict[str, torch.Tensor]:
    """Σ x_j² (fp64) of every block Linear's inputs over ordinary full forwards, window by window."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for name, lin in linears(model).items():
        if only is not None and not name.startswith(only):
            continue

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        for w in windows:
            model(w.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return sq
