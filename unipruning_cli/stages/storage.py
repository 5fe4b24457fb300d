"""Storage checked before the work: the folders a command writes are writable, and their file systems hold what it
will write.

A read-only cache or a full disk found after the load and the dense evaluation costs tens of minutes at 70B
(huggingface_hub#2797, LLaMA-Factory#5155); here it costs a second. The run's figure (:func:`run_disk_bytes`) is an
upper bound from the shapes of the model on the ``meta`` device (no weight is read): the masks of every cut at 1 bit
per weight, UniPruning's Γ and the search checkpoints (two at once while one replaces the other), the calibration
statistics in the run and in the cache. A write that still fails names its path, what it wrote and the bytes it
needed (:func:`..core.rundir.storage_error`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from ..core.errors import UserError
from ..core.paths import cache_dir, nearest_existing

log = logging.getLogger(__name__)

#: Beside the tensors: configs, logs, metrics, plots, search.jsonl.
SMALL_FILES = 16 * 2**20


def check_writable(path: Path, what: str) -> None:
    """:class:`UserError` unless a file can be created in ``path`` (or, where it does not exist yet, in the nearest
    ancestor that does): tried for real with a temporary file, since permission bits do not tell a read-only mount
    (or root's view of one)."""
    base = nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{what} {path}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".unipruning-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{what} {path} is not writable ({err.strerror or err} in {base}): choose a writable "
                        "folder") from None


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the file system that holds (or would hold) ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_free(path: Path, need: int, what: str) -> None:
    """:class:`UserError` when the file system of ``path`` has fewer than ``need`` bytes free for ``what``."""
    free = free_bytes(path)
    if need > free:
        raise UserError(f"{what} needs about {need / 2**30:,.2f} GiB at {path}, but only {free / 2**30:,.2f} GiB are "
                        "free there: free some space or point it at another disk")


def run_disk_bytes(cfg: DictConfig, device: str | None = None) -> dict[str, int]:
    """Upper bounds of the bytes a prune run of ``cfg`` writes: ``{"run_dir": bytes, "cache": bytes}``.

    From the model's shapes on the ``meta`` device (P prunable weights, N others, Σ of the prunable matrices' input
    widths): ``ceil(P/8)`` per cut's masks file (the run's targets, times one more per baseline metric); for
    UniPruning, Γ (fp32, 4P) and the search checkpoints, at most two at once (one per ``schedule.checkpoint_every``
    steps before the last; frozen: matrices; each frozen: Γ and V, 8P; drift: also W, its gradient and Adam's two
    moments, b bytes each under ``schedule.drift_dtype``, plus the other weights' gradients, bN); calibration statistics (fp32 per input channel) in the
    run, and per sample in the cache. ``device`` (``cuda`` / ``cpu``): where ``model.dtype=auto`` is resolved (default:
    ``model.device`` on this machine). Raises whatever building the meta model raises."""
    import torch

    from ..pruning.method import method_of
    from ..pruning.targets import make_target, targets_of
    from ..models.loading import prunable_layers
    from .plan.architectures import meta_model

    model = meta_model(cfg.model, torch.float32)
    layers = prunable_layers(model)
    P = sum(m.weight.numel() for m in layers.values())
    N = sum(p.numel() for p in model.parameters()) - P
    sum_in = sum(m.weight.shape[1] for m in layers.values())
    cuts = len(targets_of(cfg, make_target(cfg)))
    uni = method_of(cfg).searches
    baselines = cfg.eval.baselines if cfg.eval.baselines is not None else (["wanda"] if uni else [])
    run = cuts * (1 + len(baselines)) * math.ceil(P / 8) + 2 * 4 * sum_in + SMALL_FILES
    if uni:
        # checkpoints every schedule.checkpoint_every steps (frozen: matrices) before the last; while one replaces
        # the other, two are on disk (search/state.py), so at most two count
        every = max(1, int(cfg.schedule.checkpoint_every))
        if cfg.schedule.weight_mode == "drift":
            from ..models.loading import resolve_device, resolve_dtype
            from ..search.settings import drift_element_size

            where = torch.device(device) if device else resolve_device(cfg.model.device)
            weights = resolve_dtype(cfg.model.dtype, where).itemsize
            b = drift_element_size(cfg.schedule.drift_dtype, weights)
            run += 4 * P + min(2, (int(cfg.schedule.steps) - 1) // every) * ((8 + 4 * b) * P + b * N)
        else:
            run += 4 * P + min(2, (len(layers) - 1) // every) * 8 * P
    cache = cfg.calibration.nsamples * 4 * sum_in + SMALL_FILES
    return {"run_dir": int(run), "cache": int(cache)}


def check_run_storage(cfg: DictConfig, run_dir: Path) -> dict[str, int] | None:
    """The run directory and the cache writable, and the free space of their file systems at least
    :func:`run_disk_bytes` (summed where both share one; less what ``run_dir`` already holds, for a resumed run).
    Raises :class:`UserError`; returns the figure checked (None where ``plan_check=false`` or the architecture cannot
    be built here: then only writability is checked, the latter with a warning)."""
    cache = cache_dir()
    check_writable(run_dir, "the run directory")
    check_writable(cache, "the cache (UNIPRUNING_CACHE)")
    if not cfg.plan_check:
        return None
    try:
        need = run_disk_bytes(cfg)
    except Exception as err:  # noqa: BLE001 - an architecture the meta device cannot build: the load will tell
        log.warning("the disk space a run of %s needs cannot be estimated before loading (%s)", cfg.model.path, err)
        return None
    # a resumed run has written part of it already: what it holds counts as written (files are replaced, not added)
    held = sum(f.stat().st_size for f in Path(run_dir).rglob("*") if f.is_file()) if Path(run_dir).is_dir() else 0
    need = {**need, "run_dir": max(0, need["run_dir"] - held)}
    same = os.stat(nearest_existing(run_dir)).st_dev == os.stat(nearest_existing(cache)).st_dev
    if same:
        check_free(run_dir, need["run_dir"] + need["cache"], "this run (its run directory and the cache)")
    else:
        check_free(run_dir, need["run_dir"], "this run's directory")
        check_free(cache, need["cache"], "the cache")
    return need
