"""Where searches are kept and found again: the search fingerprint, the index under the cache, adoption, λ lanes.

A finished search is recorded in its run (``gamma.safetensors``, ``search.jsonl``, a stage marker) and
in an index entry ``<cache>/search/<key>.json`` that names that run. The key covers everything Γ depends
on (:func:`search_fingerprint`) plus what the config cannot say (the files behind the model and the
corpus, library versions, the weights' dtype and device type), so a later run or sweep job with the
same search adopts that Γ (:func:`reuse_search`, a hard link) instead of searching again. Parallel jobs
serialise on ``<key>.lock`` (``rundir.file_locks``). In a λ sweep where W does not depend on Γ, one pass
serves several λ (:func:`lam_siblings`, :func:`siblings_that_fit`); their Γ are filed in the sweep's
``.searches/`` folder and indexed the same way.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..core.config import model_values, plain, validate_search
from ..data.corpora import corpus_identity
from ..core.errors import UserError
from ..models.loading import model_identity
from ..core.paths import cache_dir
from ..core.provenance import host_available_bytes, versions
from ..core.rundir import RunDir, atomic_save_tensors, atomic_write_json, fingerprint, link_or_copy
from ..core.sweep import SweepContext
from ..search.placement import free_gpu_bytes
from ..search.settings import DRIFT_ONLY, NOT_IN_FINGERPRINT

log = logging.getLogger(__name__)

#: Bumped when the search computes a different Γ from the same config, so older checkpoints and indexed
#: searches are not taken for current ones. 2: the prox samples its quantile from its own generator.
#: 3: on a GPU the metric's and the prox's draws come from CUDA generators (CPU draws unchanged).
#: 4: routers and expert gates are no prunable layers (a Γ recorded before holds one for them, issue 26), and lists
#: of Linear experts pool a rarely routed expert's step statistics.
SEARCH_REVISION = 4


#: Knobs added after searches were recorded, with the value that gives the Γ of before: at that value they stay out
#: of the fingerprint, so a recorded search is still found (mixture-of-experts knobs do nothing on a dense model).
ADDED_LATER = {"schedule": {"router_aux_loss": False}, "calibration": {"min_expert_tokens": 32}}


def search_fingerprint(cfg: DictConfig) -> str:
    """Everything Γ depends on, and nothing else, so equal searches are recognised as equal.

    Left out: the checkpoint interval (resume is bit-exact), activation checkpointing (the same gradients),
    where calibration data are offloaded,
    the calibration mode (the search never prunes block by block), and in frozen mode the weight
    optimiser's knobs (a ρ sweep in frozen mode is one search, not three).
    """
    schedule = {k: v for k, v in plain(cfg.schedule).items() if k not in NOT_IN_FINGERPRINT}
    if schedule.get("weight_mode") == "frozen":
        schedule = {k: v for k, v in schedule.items() if k not in DRIFT_ONLY}
    calibration = {k: v for k, v in plain(cfg.calibration).items() if k not in ("mode", "offload")}
    for group, values in (("schedule", schedule), ("calibration", calibration)):
        for key, default in ADDED_LATER[group].items():
            if values.get(key) == default:
                values.pop(key, None)
    return fingerprint({"model": model_values(cfg.model), "calibration": calibration, "local_metric": plain(cfg.local_metric),
                        "regularizer": plain(cfg.regularizer), "schedule": schedule, "seed": cfg.seed,
                        "revision": SEARCH_REVISION})


def weight_placement(model) -> list[str]:
    """``[dtype, device type]`` of a loaded model's weights: what :func:`search_index` keys on."""
    weight = next(model.parameters())
    return [str(weight.dtype), weight.device.type]


def search_index(cfg: DictConfig, fp: str, placement: list[str]) -> Path:
    """Where a finished search is recorded: the run that holds its Γ (an index, not a copy of Γ).

    The key adds what the config cannot say: the files behind the model and the corpus, the library
    versions, and where the weights really live (``placement``, :func:`weight_placement`: ``dtype: auto`` is
    bf16 on CUDA, fp32 on CPU). One process or FSDP2 ranks: the same key (the same Γ within rounding)."""
    key = fingerprint({"search": fp, "model": model_identity(cfg.model), "corpus": corpus_identity(cfg.calibration.source),
                       "versions": versions(), "placement": list(placement)})
    return cache_dir() / "search" / f"{key}.json"


def indexed_search(index: Path, fp: str) -> RunDir | None:
    """The run (or shared search folder) that the index names, if it still holds that search complete."""
    if not index.exists():
        return None
    source = RunDir(Path(json.loads(index.read_text())["run_dir"]), create=False)
    return source if source.is_complete("search", fp) else None


def reuse_search(cfg: DictConfig, fp: str, rd: RunDir, index: Path) -> dict | None:
    """Adopt the Γ of an earlier run with the same search (another sweep job, another sparsity).

    ``index``: this search's :func:`search_index` entry. The earlier run must still hold a complete search stage
    with this fingerprint; Γ is hard-linked into this run (files are only ever replaced, never rewritten, so the
    link is safe), or copied across file systems. Returns the search info, or None when there is nothing to reuse.
    """
    if not cfg.reuse_search:
        return None
    source = indexed_search(index, fp)
    if source is None or source.path.resolve() == rd.path.resolve():
        return None
    for rel in ("gamma.safetensors", "search.jsonl", "plots/search.png"):
        if (source / rel).exists():
            link_or_copy(source / rel, rd / rel)
    info = {**source.stage_info("search")["info"], "reused_from": str(source.path)}
    rd.mark_complete("search", fp, ["gamma.safetensors", "search.jsonl"], 0.0, info=info)
    log.info("search: reusing Γ of %s (same model, calibration, metric, regularizer and schedule)", source.path)
    return info


def record_search(cfg: DictConfig, fp: str, rd: RunDir, gamma: dict[str, torch.Tensor], info: dict,
                  index: Path) -> None:
    """Γ, its plot and the stage marker in ``rd``, then the index entry that lets other runs adopt it.

    Raises ``FloatingPointError`` (nothing written) when any Γ holds NaN or inf."""
    from ..core.report import plot_search

    bad = [n for n, g in gamma.items() if not torch.isfinite(g).all()]
    if bad:
        raise FloatingPointError(f"the search diverged (λ={cfg.regularizer.lam:g}): Γ has NaN/inf in {len(bad)} "
                                 f"matrices (first: {bad[0]}); lower schedule.lr, schedule.rho or schedule.dual_step")
    atomic_save_tensors(rd / "gamma.safetensors", gamma, {"fingerprint": fp})
    plot_search(rd / "search.jsonl", rd / "plots" / "search.png")
    rd.mark_complete("search", fp, ["gamma.safetensors", "search.jsonl"], info["search_seconds"], info=info)
    atomic_write_json(index, {"run_dir": str(rd.path.resolve()), "fingerprint": fp})


@dataclass(frozen=True)
class LamSearch:
    """A sibling job's search (the same config but λ) that this job can run in its own pass, and
    the folder in the sweep where its Γ is filed."""

    lam: float
    cfg: DictConfig
    fp: str
    index: Path
    dir: Path


def lam_siblings(cfg: DictConfig, sweep: SweepContext | None, model) -> list[LamSearch]:
    """The other λ of this job's sweep, where one pass can serve them all: W must not depend on Γ
    (frozen mode, or drift with ρ = 0), so the step metrics are the same for every λ."""
    sch = cfg.schedule
    if (sweep is None or not cfg.reuse_search or not cfg.share_lam_search
            or not (sch.weight_mode == "frozen" or sch.rho == 0)):
        return []
    out = []
    for lam in dict.fromkeys(sweep.lams):
        if lam == cfg.regularizer.lam:
            continue
        sib = copy.deepcopy(cfg)
        sib.regularizer.lam = lam
        try:  # only λ differs from this job's validated config, so only the search checks can fail
            validate_search(sib)
        except UserError:  # that job fails on its own; it must not take this one down with it
            continue
        fp = search_fingerprint(sib)
        index = search_index(sib, fp, weight_placement(model))
        out.append(LamSearch(lam, sib, fp, index, sweep.dir / ".searches" / index.stem))
    return out


def _available_host_bytes() -> int:  # the seam a test replaces to play a smaller machine
    return host_available_bytes()


def siblings_that_fit(siblings: list[LamSearch], numel: int, weight_mode: str, device: torch.device) -> list[LamSearch]:
    """As many λ lanes as fit in half the free memory: each holds V and Γ in fp32 on the search's
    device while drifting (8 B per prunable weight), and hands its Γ (fp32, 4 B) back on the host."""
    on_gpu, drift = device.type == "cuda", weight_mode == "drift"
    fit = _available_host_bytes() // 2 // (4 * numel + (8 * numel if drift and not on_gpu else 0))
    if drift and on_gpu:
        fit = min(fit, free_gpu_bytes(device) // 2 // (8 * numel))
    if fit < len(siblings):
        log.info("search: memory for %d of the sweep's %d other λ in this pass; the rest search in their own jobs",
                 fit, len(siblings))
    return siblings[:fit]
