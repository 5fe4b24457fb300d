"""The UniPruning search stage of a run: Γ for every prunable matrix, from this run, an earlier one, or a new pass.

Order of preference: this run's own finished search (a resumed run), then an indexed search with the
same fingerprint (:func:`store.reuse_search`), then a new mirror-descent pass (:mod:`..search.mirror_descent`),
which resumes from ``checkpoints/search.*`` when interrupted. In a λ sweep where W does not depend on
Γ, the new pass also searches the sweep's other λ and files them (:mod:`.search_store`).
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from ..data.calibration_set import dense_statistics
from ..core.config import plain
from ..metrics import build_metric
from ..core.context import RunContext
from ..models.loading import input_device
from ..models.onload import weights_on
from ..core.rundir import RunDir, file_locks, load_tensors
from ..search.frozen import search_frozen
from ..search.mirror_descent import LamSibling, search_drift
from ..search.regularizers import build_regularizer
from ..search.settings import SearchSettings
from .search_store import (indexed_search, lam_siblings, record_search, reuse_search, search_fingerprint,
                           search_index, siblings_that_fit, weight_placement)

log = logging.getLogger(__name__)


def run_search(ctx: RunContext) -> tuple[dict[str, torch.Tensor], dict]:
    """Γ of ``ctx.model`` (name -> fp32 ``[out, in]``, on the CPU) and the search info recorded in the stage marker.

    In a sweep over λ, where W does not depend on Γ, the pass also searches the other λ and files each
    in ``<sweep>/.searches/`` with an index entry, so their jobs adopt it instead of searching. Locks
    on the index entries make parallel jobs wait for that pass rather than repeat it.
    Raises ``FloatingPointError`` when the search diverges (Γ not finite).
    """
    cfg, model, rd, timer, sweep = ctx.cfg, ctx.model, ctx.rd, ctx.timer, ctx.sweep
    fp = search_fingerprint(cfg)
    if rd.is_complete("search", fp):
        log.info("search stage complete in %s: loading gamma.safetensors", rd.path)
        return load_tensors(rd / "gamma.safetensors"), rd.stage_info("search")["info"]
    own_index = search_index(cfg, fp, weight_placement(model))
    siblings = lam_siblings(cfg, sweep, model)
    locks = [own_index.with_suffix(".lock"), *(s.index.with_suffix(".lock") for s in siblings)] if cfg.reuse_search else []
    with file_locks(locks):
        reused = reuse_search(cfg, fp, rd, own_index)
        if reused is not None:
            return load_tensors(rd / "gamma.safetensors"), reused
        layers = ctx.layers
        siblings = [s for s in siblings if indexed_search(s.index, s.fp) is None]
        siblings = siblings_that_fit(siblings, sum(m.weight.numel() for m in layers.values()),
                                     cfg.schedule.weight_mode, next(model.parameters()).device)
        sch = cfg.schedule
        if sch.weight_mode == "frozen" and sch.rho != 0:
            log.warning("schedule.rho=%g has no effect in frozen mode: ρ only steers the drifting weights", sch.rho)
        metric, prox, settings = search_parts(cfg)
        windows, calib = ctx.calibration()
        ckpt = rd / "checkpoints" / "search.safetensors"
        lanes = [LamSibling(build_regularizer(cfg.regularizer.name, s.lam, cfg.regularizer.threshold_mode),
                            RunDir(s.dir) / "search.jsonl") for s in siblings]
        if lanes:
            log.info("search: one pass for λ = %s (W does not depend on Γ here, so the step metrics are shared)",
                     ", ".join(f"{x:g}" for x in [cfg.regularizer.lam, *(s.lam for s in siblings)]))
        with timer.stage("search"):
            if sch.weight_mode == "frozen":
                stats, _ = dense_statistics(cfg, model, windows)
                gamma, bpp = search_frozen(weights_on(layers, input_device(model)), stats, metric, prox,
                                           settings, ckpt, fp, rd / "search.jsonl", siblings=lanes)
            else:
                gamma, bpp = search_drift(model, layers, windows, metric, prox, settings, ckpt, fp,
                                          rd / "search.jsonl", siblings=lanes)
        info = search_info(cfg, calib, windows, bpp, timer.seconds["search"])
        if lanes:
            info["lams_in_pass"] = [cfg.regularizer.lam,
                                    *(s.lam for s, lane in zip(siblings, lanes) if lane.gamma is not None)]
        record_search(cfg, fp, rd, gamma, info, own_index)
        for s, lane in zip(siblings, lanes):
            if lane.gamma is not None:
                record_search(s.cfg, s.fp, RunDir(s.dir), lane.gamma, {**info, "searched_by": str(rd.path)}, s.index)
    return gamma, info


def search_parts(cfg: DictConfig) -> tuple:
    """The local metric, the regulariser's prox and the search settings a config asks for."""
    knobs = {k: v for k, v in plain(cfg.local_metric).items() if k != "name"}
    metric = build_metric(cfg.local_metric.name, **knobs)
    prox = build_regularizer(cfg.regularizer.name, cfg.regularizer.lam, cfg.regularizer.threshold_mode)
    return metric, prox, SearchSettings(**plain(cfg.schedule), seed=cfg.seed,
                                            min_expert_tokens=cfg.calibration.min_expert_tokens)


def search_info(cfg: DictConfig, calib: dict, windows, bytes_per_param: float, seconds: float) -> dict:
    """What the search stage's marker records: the calibration it used, its steps, state bytes and seconds."""
    c, sch = cfg.calibration, cfg.schedule
    return {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": cfg.seed,
            **{k: calib[k] for k in ("sampling", "requested", "documents", "bos") if k in calib},
            "tokens": int(windows.numel()), "steps": sch.steps, "weight_mode": sch.weight_mode,
            "state_bytes_per_param": bytes_per_param, "search_seconds": seconds}
