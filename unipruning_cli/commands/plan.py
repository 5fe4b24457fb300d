"""``unipruning plan [overrides] [--gpus N] [--gpu-memory 80GiB] [--host-memory 256GiB] [--json FILE]``.

Prints, stage by stage, the peak GPU and host memory of the run ``unipruning prune <overrides>`` would start,
where it would place the model, and whether it fits; nothing is loaded but the architecture (seconds, offline
for the named models). ``--json`` writes the same (keys ``fits``, ``peak_gpu_gib``, ``peak_host_gib``, ``stages``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..core.errors import UserError
from ..core.provenance import host_total_bytes

_SIZE = re.compile(r"^\s*([0-9.]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*$", re.I)
_UNITS = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12, None: 2**30}


def parse_size(text: str, flag: str) -> float:
    """``80GiB``, ``80GB``, ``80`` (GiB) -> bytes. Raises :class:`UserError` for anything else."""
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"{flag}={text!r}: give a size such as 80GiB, 141GB or 24 (GiB)")
    return float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None]


def plan_command(args: list[str]) -> None:
    import torch

    from ..core.config import compose_prune, validate_values
    from ..pruning.method import method_of
    from ..stages.plan.estimate import GIB, USABLE, plan_run

    ap = argparse.ArgumentParser(prog="unipruning plan", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="the same key=value overrides as unipruning prune")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPUs of the run (default: those visible; 0: CPU only); N > 1 with the drift search and no "
                         "model.device_map: a torchrun launch of N ranks, the search sharded over them with FSDP2")
    ap.add_argument("--gpu-memory", default=None, help="memory of each GPU, e.g. 80GiB (default: the visible GPU's)")
    ap.add_argument("--host-memory", default=None,
                    help="host memory, e.g. 256GiB (default: this machine's; not checked when --gpus or --gpu-memory "
                         "describe another machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the plan as JSON to this file")
    ns = ap.parse_intermixed_args(args)  # overrides before, between or after the options
    visible = torch.cuda.device_count()
    gpus = visible if ns.gpus is None else ns.gpus
    if gpus < 0:
        raise UserError(f"--gpus={gpus}: must be 0 (CPU only) or more")
    gpu_memory = parse_size(ns.gpu_memory, "--gpu-memory") if ns.gpu_memory else (
        torch.cuda.get_device_properties(0).total_memory if gpus and visible else None)
    if gpus and gpu_memory is None:
        raise UserError("--gpus without a visible GPU: say how large each is, e.g. --gpu-memory 80GiB")
    other_machine = ns.gpus is not None or ns.gpu_memory is not None
    host_memory = parse_size(ns.host_memory, "--host-memory") if ns.host_memory else (
        None if other_machine else host_total_bytes())
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_prune(ns.overrides)
    except (HydraException, OmegaConfBaseException) as err:  # an unknown option or a bad value: the message, no trace
        raise UserError(str(err).strip().split("\nConfig search path")[0]) from None
    validate_values(cfg)
    method_of(cfg).check()
    drift = method_of(cfg).backpropagates()
    ranks = gpus if drift and gpus > 1 and not cfg.model.device_map else 1  # N GPUs, no device_map: torchrun -n N
    plan = plan_run(cfg, gpus, gpu_memory, host_memory, ranks)
    _print(plan, GIB, USABLE)
    disk = _print_disk(cfg, GIB, "cuda" if gpus else "cpu")
    exported = _print_export(cfg, "cuda" if gpus else "cpu")
    if drift and gpu_memory and not cfg.model.device_map:
        _print_gpus_needed(cfg, gpu_memory, host_memory, GIB, one_fits=plan.fits and ranks == 1)
    if ns.json:
        from ..core.rundir import atomic_write_json

        atomic_write_json(ns.json, {**plan.to_dict(), "disk_gib": disk, "export": exported})


def _print_export(cfg, device: str) -> dict | None:
    """A structural cut's exported model (:func:`..stages.plan.structural.exported_model`), printed; returned."""
    import torch

    from ..core.progress import console
    from ..models.loading import resolve_dtype
    from ..stages.plan.structural import exported_model

    dtype = resolve_dtype(cfg.model.dtype, torch.device(device))
    out = exported_model(cfg, dtype)
    if out is None:
        return None
    before, after = out["parameters"]
    if not out["standard"]:
        console.print(f"export: {out['tag']} keeps different expert counts per layer; no standard config holds them, "
                      "so the run measures it and export refuses it")
    else:
        console.print(f"export: `unipruning export <run_dir>` writes {out['tag']} as a standard model of {after:,} "
                      f"parameters instead of {before:,} ({after / before:.3f}x): about {out['bytes'] / 2**30:.2f} GiB "
                      f"of weights in {str(dtype).removeprefix('torch.')}, on disk and in memory once loaded")
    return out


def _print_disk(cfg, gib: float, device: str) -> dict[str, float]:
    """The disk a run writes (:func:`..stages.storage.run_disk_bytes`, upper bounds), printed; returned in GiB."""
    from ..pruning.method import method_of
    from ..core.progress import console
    from ..stages.storage import run_disk_bytes

    disk = {k: round(v / gib, 2) for k, v in run_disk_bytes(cfg, device).items()}
    what = "masks, Γ, search checkpoints, calibration statistics" if method_of(cfg).searches else \
        "masks, calibration statistics"
    console.print(f"disk: at most {disk['run_dir']:.2f} GiB in the run directory and {disk['cache']:.2f} GiB in the "
                  f"unipruning cache ({what}; the model's own download not counted); checked against the free space "
                  "before a run loads any weight")
    return disk


def _print(plan, gib: float, usable: float) -> None:
    from rich.table import Table

    from ..core.progress import console

    mode = f" ({plan.weight_mode} W)" if plan.weight_mode else ""
    table = Table(title=f"plan: {plan.model}, {plan.method}{mode}, {plan.placement}")
    for col in ("stage", "GPU GiB", "host GiB", "what it holds"):
        table.add_column(col, justify="left" if col in ("stage", "what it holds") else "right")
    for s in plan.stages:
        table.add_row(s.name, f"{s.gpu / gib:.1f}" if plan.gpus else "-", f"{s.host / gib:.1f}", s.what)
    console.print(table)
    gpu = (f"peak GPU {plan.peak_gpu / gib:.1f} GiB of {usable * plan.gpu_memory / gib:.1f} usable per GPU; "
           if plan.gpus else "")
    host = f" of {usable * plan.host_memory / gib:.1f} usable" if plan.host_memory else " (host not checked)"
    console.print(f"{plan.prunable_weights:,} prunable weights, {plan.other_weights:,} others. {gpu}"
                  f"peak host {plan.peak_host / gib:.1f} GiB{host} (process baseline {plan.host_baseline / gib:.1f}).")
    console.print("[bold green]fits[/]" if plan.fits else "[bold red]does not fit[/]; what would: "
                  + "; ".join(plan.advice))


def _print_gpus_needed(cfg, gpu_memory: float, host_memory: float | None, gib: float, one_fits: bool = False) -> None:
    """How many GPUs of this size the drift search needs with FSDP2 (torchrun, one rank per GPU; at least 2), with
    and without FSDP's CPU offload, on this host (or the ``--host-memory`` given). ``one_fits``: the plan above fits
    one GPU in one process, so the line says FSDP2 is an option, not a need."""
    from ..core.progress import console
    from ..stages.plan.estimate import gpus_needed

    parts = []
    for offload in (False, True):
        n = gpus_needed(cfg, gpu_memory, host_memory, offload)
        how = "with FSDP CPU offload (schedule.fsdp_offload=true)" if offload else "without offload"
        parts.append(f"{n} {how}" if n else f"more than 64 {how}")
    lead = "fits one GPU in one process (above); over several" if one_fits else "drift search on"
    console.print(f"{lead} GPUs of {gpu_memory / gib:.0f} GiB with FSDP2 (torchrun --nproc-per-node N "
                  f"-m unipruning_cli prune ...): needs " + "; ".join(parts))
