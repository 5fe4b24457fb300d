"""The prune pipeline: load -> dense eval -> calibrate + prune -> masks -> pruned eval -> report.

The runner owns the loop and the run directory; methods only see one block at a time. Each stage
writes its artifacts atomically and a completion marker with the fingerprint of the config values
it depends on, so rerunning in the same directory (``hydra.run.dir=<old run>``) skips finished work.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from . import masks as M
from .calibration import calibrate_blockwise, stats_from_tensors, stats_to_tensors
from .stats import ActivationStats
from .config import SCHEDULE_DRIFT_ONLY, target_sparsity
from .paths import cache_dir
from .data import calibration_windows, corpus_identity, eval_windows, token_stream
from .evaluation.perplexity import perplexity, with_bos
from .methods import (DEFAULT_ALLOCATION, METHODS, LocalMetricPruning, PruningMethod, SparseGPTPruning, Target,
                      apply_masks)
from .metrics import build_metric
from .models import load_model, load_model_reused, model_identity, model_location, prunable_layers
from .report import print_summary, write_plots, write_summary_md
from .rundir import (RunDir, atomic_save_tensors, atomic_write_json, atomic_write_text, file_locks, fingerprint,
                     link_or_copy, load_tensors)
from .sweep import SweepContext

log = logging.getLogger(__name__)


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def make_target(cfg: DictConfig) -> Target:
    p = cfg.pattern
    if p.kind == "nm":
        return Target(sparsity=target_sparsity(cfg), allocation="per_row", n=p.n, m=p.m)
    allocation = p.allocation or DEFAULT_ALLOCATION.get(cfg.local_metric.name, "per_matrix")
    if cfg.method == "sparsegpt":
        allocation = p.allocation or "per_matrix"
    return Target(sparsity=target_sparsity(cfg), allocation=allocation)


def make_method(cfg: DictConfig) -> PruningMethod:
    cls = METHODS.get(cfg.method)
    if cls is LocalMetricPruning:
        knobs = {k: v for k, v in _plain(cfg.local_metric).items() if k != "name"}
        return LocalMetricPruning(build_metric(cfg.local_metric.name, **knobs), seed=cfg.seed)
    if cls is SparseGPTPruning:
        return SparseGPTPruning()
    return cls()


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"unipruning": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# ----------------------------------------------------------------------------------------------
# masks on disk: bit-packed, one uint8 tensor per layer, shapes in the metadata


def save_masks(path: Path, masks: dict[str, torch.Tensor], info: dict) -> None:
    shapes = {n: list(m.shape) for n, m in masks.items()}
    packed = {n: M.pack_mask(m) for n, m in masks.items()}
    atomic_save_tensors(path, packed, {"shapes": json.dumps(shapes), "info": json.dumps(info)})


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    packed = load_tensors(path)
    return {n: M.unpack_mask(packed[n], tuple(shapes[n])) for n in shapes}


# ----------------------------------------------------------------------------------------------
# stages


def _dense_cache_key(cfg: DictConfig, model, what: dict) -> Path:
    key = fingerprint({"model": model_identity(cfg.model), "dtype": str(next(model.parameters()).dtype),
                       "add_bos": cfg.model.add_bos, "versions": versions(), **what})
    return cache_dir() / "dense" / f"{key}.json"


def dense_evaluation(cfg: DictConfig, model, tok, windows: dict[str, torch.Tensor], timer: Timer) -> dict:
    """Dense PPL per corpus and dense zero-shot, cached per model, data and protocol (they never change)."""
    ppl = {}
    for corpus, w in windows.items():
        cached = _dense_cache_key(cfg, model, {"corpus": corpus_identity(corpus), "seqlen": cfg.eval.seqlen,
                                               "max_windows": cfg.eval.max_windows})
        if cached.exists():
            ppl[corpus] = {**json.loads(cached.read_text()), "cached": True}
            log.info("dense perplexity on %s from cache: %.3f", corpus, ppl[corpus]["ppl"])
            continue
        with timer.stage("dense_eval"):
            res = perplexity(model, w, cfg.eval.batch_size, f"dense ppl {corpus}").to_dict()
        atomic_write_json(cached, res)
        ppl[corpus] = {**res, "cached": False}
    zs = {}
    if cfg.eval.tasks:
        cached = _dense_cache_key(cfg, model, {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.task_limit,
                                               "max_length": _max_length(cfg)})
        if cached.exists():
            zs = json.loads(cached.read_text())
        else:
            with timer.stage("dense_eval"):
                zs = zero_shot_of(cfg, model, tok)
            atomic_write_json(cached, zs)
    return {"perplexity": ppl, "zero_shot": zs}


def _max_length(cfg: DictConfig) -> int:
    return cfg.eval.max_length or cfg.eval.seqlen


def zero_shot_of(cfg: DictConfig, model, tok) -> dict:
    from .evaluation.zeroshot import zero_shot

    return zero_shot(model, tok, cfg.eval.tasks, cfg.eval.task_limit, cfg.eval.task_batch_size, _max_length(cfg))


def evaluate_pruned(cfg: DictConfig, model, tok, windows: dict[str, torch.Tensor], label: str) -> dict:
    """Measured sparsity, perplexity per corpus and zero-shot of the model as it is now."""
    return {"sparsity": measured_sparsity(model),
            "perplexity": {c: perplexity(model, w, cfg.eval.batch_size, f"pruned ppl {c} {label}").to_dict()
                           for c, w in windows.items()},
            "zero_shot": zero_shot_of(cfg, model, tok) if cfg.eval.tasks else {}}


def eval_windows_of(cfg: DictConfig, tok) -> dict[str, torch.Tensor]:
    """Evaluation windows per corpus, tokenised once per run; a corpus too short fails here, early."""
    return {c: _eval_windows(cfg, tok, c) for c in cfg.eval.corpora}


def _eval_windows(cfg: DictConfig, tok, corpus: str) -> torch.Tensor:
    windows = eval_windows(token_stream(tok, corpus, "eval"), cfg.eval.seqlen, cfg.eval.max_windows)
    if cfg.model.add_bos and tok.bos_token_id is not None:
        windows = with_bos(windows, tok.bos_token_id)
    return windows


def calibration_set(cfg: DictConfig, tok) -> tuple[torch.Tensor, dict]:
    """The calibration windows of this config and what to record about them."""
    c = cfg.calibration
    stream = token_stream(tok, c.source, "calibration")
    windows = calibration_windows(stream, c.nsamples, c.seqlen, cfg.seed)
    log.info("calibration: %d windows x %d tokens = %d tokens from %s (%s)", c.nsamples, c.seqlen,
             windows.numel(), c.source, c.mode)
    return windows, {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "mode": c.mode,
                     "seed": cfg.seed, "tokens": int(windows.numel()), "corpus_tokens": int(stream.numel())}


def dense_statistics(cfg: DictConfig, model, windows: torch.Tensor) -> tuple[dict[str, ActivationStats], bool]:
    """One-shot statistics of the dense model, shared by every run on the same model and data.

    They depend only on the model, the calibration windows and the library versions, not on the
    metric, sparsity or pattern; so sweeps and benchmarks compute them once (cache under
    ``<cache>/calibration``). Per-sample statistics are kept too: UniPruning's frozen search needs them.
    Returns (statistics, whether they came from the cache).
    """
    key = fingerprint({"model": model_identity(cfg.model), "corpus": corpus_identity(cfg.calibration.source),
                       "dtype": str(next(model.parameters()).dtype), "calibration": _plain(cfg.calibration),
                       "seed": cfg.seed, "versions": versions()})
    path = cache_dir() / "calibration" / f"{key}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        log.info("calibration statistics from cache %s", path)
        return stats_from_tensors(load_tensors(path), meta), True
    stats = calibrate_blockwise(model, windows, want_per_sample=True, offload=cfg.calibration.offload)
    tensors, meta = stats_to_tensors(stats)
    atomic_save_tensors(path, tensors, meta)
    return stats, False


def calibrate_and_prune(cfg: DictConfig, model, tok, method: PruningMethod, target: Target, rd: RunDir) -> tuple[dict, dict]:
    """Masks of every prunable layer at ``target``; weights are pruned in place on return."""
    c = cfg.calibration
    windows, calib_info = calibration_set(cfg, tok)
    layers = prunable_layers(model)
    if isinstance(method, LocalMetricPruning) and c.mode == "one_shot":
        # Scores need only the dense statistics (none at all for magnitude): no pass per run.
        if method.metric.name == "magnitude":
            stats, cached = {}, False
        else:
            stats, cached = dense_statistics(cfg, model, windows)
        calib_info["cached"] = cached
        masks = target.cut(method.scores(layers, stats))
        apply_masks(layers, masks)
    else:
        masks: dict[str, torch.Tensor] = {}

        def on_block(i, block_layers, block_stats):
            block_masks = method.prune_block(block_layers, block_stats, target)
            if not method.updates_weights:
                apply_masks(block_layers, block_masks)
            masks.update(block_masks)

        stats = calibrate_blockwise(model, windows, sequential=c.mode == "sequential",
                                    want_hessian=method.needs_hessian, on_block=on_block, offload=c.offload)
    tensors, meta = stats_to_tensors(stats, per_sample=False)
    atomic_save_tensors(rd / "calibration.safetensors", tensors, meta)
    atomic_write_json(rd / "calibration.json", calib_info)
    return masks, calib_info


def measured_sparsity(model) -> dict:
    layers = prunable_layers(model)
    per_layer, zeros, total = {}, 0, 0
    for name, layer in layers.items():
        z = int((layer.weight == 0).sum())
        per_layer[name] = round(z / layer.weight.numel(), 6)
        zeros += z
        total += layer.weight.numel()
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {"overall": zeros / total, "prunable_params": total, "zeros": zeros,
            "overall_all_params": all_zeros / all_params, "all_params": all_params, "per_layer": per_layer}


def targets_of(cfg: DictConfig, primary: Target) -> list[Target]:
    """The primary target, then every extra sparsity of ``export.sparsities`` (score-based cuts)."""
    out = [primary]
    if cfg.method == "unipruning":
        for sp in cfg.export.sparsities or []:
            t = Target(sparsity=float(sp), allocation=primary.allocation if not primary.is_nm else "per_matrix")
            if t not in out:
                out.append(t)
        for pat in cfg.export.patterns:
            n, m = (int(v) for v in str(pat).split(":"))
            t = Target(sparsity=1 - n / m, allocation="per_row", n=n, m=m)
            if t not in out:
                out.append(t)
    return out


#: Bumped when the search computes a different Γ from the same config, so older checkpoints and indexed
#: searches are not taken for current ones. 2: the prox samples its quantile from its own generator.
SEARCH_REVISION = 2


def search_fingerprint(cfg: DictConfig) -> str:
    """Everything Γ depends on, and nothing else, so equal searches are recognised as equal.

    Left out: the checkpoint interval (resume is bit-exact), where calibration data are offloaded,
    the calibration mode (the search never prunes block by block), and in frozen mode the weight
    optimiser's knobs (a ρ sweep in frozen mode is one search, not three).
    """
    schedule = {k: v for k, v in _plain(cfg.schedule).items() if k != "checkpoint_every"}
    if schedule.get("weight_mode") == "frozen":
        schedule = {k: v for k, v in schedule.items() if k not in SCHEDULE_DRIFT_ONLY}
    calibration = {k: v for k, v in _plain(cfg.calibration).items() if k not in ("mode", "offload")}
    return fingerprint({"model": _plain(cfg.model), "calibration": calibration, "local_metric": _plain(cfg.local_metric),
                        "regularizer": _plain(cfg.regularizer), "schedule": schedule, "seed": cfg.seed,
                        "revision": SEARCH_REVISION})


def _search_index(cfg: DictConfig, fp: str, model) -> Path:
    """Where a finished search is recorded: the run that holds its Γ (an index, not a copy of Γ).

    The key adds what the config cannot say: the files behind the model and the corpus, the library
    versions, and where the weights really live (``dtype: auto`` is bf16 on CUDA, fp32 on CPU)."""
    weight = next(model.parameters())
    key = fingerprint({"search": fp, "model": model_identity(cfg.model), "corpus": corpus_identity(cfg.calibration.source),
                       "versions": versions(), "placement": [str(weight.dtype), weight.device.type]})
    return cache_dir() / "search" / f"{key}.json"


def _indexed_search(index: Path, fp: str) -> RunDir | None:
    """The run (or shared search folder) that the index names, if it still holds that search complete."""
    if not index.exists():
        return None
    source = RunDir(Path(json.loads(index.read_text())["run_dir"]), create=False)
    return source if source.is_complete("search", fp) else None


def reuse_search(cfg: DictConfig, fp: str, rd: RunDir, model) -> dict | None:
    """Adopt the Γ of an earlier run with the same search (another sweep job, another sparsity).

    The earlier run must still hold a complete search stage with this fingerprint; Γ is hard-linked
    into this run (files are only ever replaced, never rewritten, so the link is safe), or copied
    across file systems. Returns the search info, or None when there is nothing to reuse.
    """
    if not cfg.reuse_search:
        return None
    source = _indexed_search(_search_index(cfg, fp, model), fp)
    if source is None or source.path.resolve() == rd.path.resolve():
        return None
    for rel in ("gamma.safetensors", "search.jsonl", "plots/search.png"):
        if (source / rel).exists():
            link_or_copy(source / rel, rd / rel)
    info = {**source.stage_info("search")["info"], "reused_from": str(source.path)}
    rd.mark_complete("search", fp, ["gamma.safetensors", "search.jsonl"], 0.0, info=info)
    log.info("search: reusing Γ of %s (same model, calibration, metric, regularizer and schedule)", source.path)
    return info


@dataclass(frozen=True)
class _LamSearch:
    """A sibling job's search (the same config but λ) that this job can run in its own pass, and
    the folder in the sweep where its Γ is filed."""

    lam: float
    cfg: DictConfig
    fp: str
    index: Path
    dir: Path


def lam_siblings(cfg: DictConfig, sweep: SweepContext | None, model) -> list[_LamSearch]:
    """The other λ of this job's sweep, where one pass can serve them all: W must not depend on Γ
    (frozen mode, or drift with ρ = 0), so the step metrics are the same for every λ."""
    sch = cfg.schedule
    if (sweep is None or not cfg.reuse_search or not cfg.share_lam_search
            or not (sch.weight_mode == "frozen" or sch.rho == 0)):
        return []
    from .config import validate_search
    from .errors import UserError

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
        index = _search_index(sib, fp, model)
        out.append(_LamSearch(lam, sib, fp, index, sweep.dir / ".searches" / index.stem))
    return out


def _available_host_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _siblings_that_fit(siblings: list[_LamSearch], numel: int, weight_mode: str, device: torch.device) -> list[_LamSearch]:
    """As many λ lanes as fit in half the free memory: each holds V and Γ in fp32 on the search's
    device while drifting, and hands its Γ (fp32) back on the host."""
    on_gpu, drift = device.type == "cuda", weight_mode == "drift"
    fit = _available_host_bytes() // 2 // (4 * numel + (8 * numel if drift and not on_gpu else 0))
    if drift and on_gpu:
        fit = min(fit, torch.cuda.mem_get_info(device)[0] // 2 // (8 * numel))
    if fit < len(siblings):
        log.info("search: memory for %d of the sweep's %d other λ in this pass; the rest search in their own jobs",
                 fit, len(siblings))
    return siblings[:fit]


def run_search(cfg: DictConfig, model, tok, rd: RunDir, timer: Timer,
               sweep: SweepContext | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The UniPruning stage: Γ for every prunable matrix (loaded if this run or an earlier one has it).

    In a sweep over λ, where W does not depend on Γ, the pass also searches the other λ and files each
    in ``<sweep>/.searches/`` with an index entry, so their jobs adopt it instead of searching. Locks
    on the index entries make parallel jobs wait for that pass rather than repeat it.
    """
    from .search import LamSibling, SearchSettings, build_regularizer, search_drift, search_frozen

    fp = search_fingerprint(cfg)
    if rd.is_complete("search", fp):
        log.info("search stage complete in %s: loading gamma.safetensors", rd.path)
        return load_tensors(rd / "gamma.safetensors"), rd.stage_info("search")["info"]
    own_index = _search_index(cfg, fp, model)
    siblings = lam_siblings(cfg, sweep, model)
    locks = [own_index.with_suffix(".lock"), *(s.index.with_suffix(".lock") for s in siblings)] if cfg.reuse_search else []
    with file_locks(locks):
        reused = reuse_search(cfg, fp, rd, model)
        if reused is not None:
            return load_tensors(rd / "gamma.safetensors"), reused
        layers = prunable_layers(model)
        siblings = [s for s in siblings if _indexed_search(s.index, s.fp) is None]
        siblings = _siblings_that_fit(siblings, sum(m.weight.numel() for m in layers.values()),
                                      cfg.schedule.weight_mode, next(model.parameters()).device)
        c, sch = cfg.calibration, cfg.schedule
        if sch.weight_mode == "frozen" and sch.rho != 0:
            log.warning("schedule.rho=%g has no effect in frozen mode: ρ only steers the drifting weights", sch.rho)
        knobs = {k: v for k, v in _plain(cfg.local_metric).items() if k != "name"}
        metric = build_metric(cfg.local_metric.name, **knobs)
        prox = build_regularizer(cfg.regularizer.name, cfg.regularizer.lam, cfg.regularizer.threshold_mode)
        settings = SearchSettings(**_plain(sch), seed=cfg.seed)
        windows, _ = calibration_set(cfg, tok)
        ckpt = rd / "checkpoints" / "search.safetensors"
        lanes = [LamSibling(build_regularizer(cfg.regularizer.name, s.lam, cfg.regularizer.threshold_mode),
                            RunDir(s.dir) / "search.jsonl") for s in siblings]
        if lanes:
            log.info("search: one pass for λ = %s (W does not depend on Γ here, so the step metrics are shared)",
                     ", ".join(f"{x:g}" for x in [cfg.regularizer.lam, *(s.lam for s in siblings)]))
        with timer.stage("search"):
            if sch.weight_mode == "frozen":
                stats, _ = dense_statistics(cfg, model, windows)
                gamma, bpp = search_frozen({n: m.weight.detach() for n, m in layers.items()}, stats, metric, prox,
                                           settings, ckpt, fp, rd / "search.jsonl", siblings=lanes)
            else:
                gamma, bpp = search_drift(model, layers, windows, metric, prox, settings, ckpt, fp,
                                          rd / "search.jsonl", siblings=lanes)
        info = {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": cfg.seed,
                "tokens": int(windows.numel()), "steps": sch.steps, "weight_mode": sch.weight_mode,
                "state_bytes_per_param": bpp, "search_seconds": timer.seconds["search"]}
        if lanes:
            info["lams_in_pass"] = [cfg.regularizer.lam,
                                    *(s.lam for s, lane in zip(siblings, lanes) if lane.gamma is not None)]
        _record_search(cfg, fp, rd, gamma, info, own_index)
        for s, lane in zip(siblings, lanes):
            if lane.gamma is not None:
                _record_search(s.cfg, s.fp, RunDir(s.dir), lane.gamma, {**info, "searched_by": str(rd.path)}, s.index)
    return gamma, info


def _record_search(cfg: DictConfig, fp: str, rd: RunDir, gamma: dict[str, torch.Tensor], info: dict,
                   index: Path) -> None:
    """Γ, its plot and the stage marker in ``rd``, then the index entry that lets other runs adopt it."""
    from .report import plot_search

    bad = [n for n, g in gamma.items() if not torch.isfinite(g).all()]
    if bad:
        raise FloatingPointError(f"the search diverged (λ={cfg.regularizer.lam:g}): Γ has NaN/inf in {len(bad)} "
                                 f"matrices (first: {bad[0]}); lower schedule.lr, schedule.rho or schedule.dual_step")
    atomic_save_tensors(rd / "gamma.safetensors", gamma, {"fingerprint": fp})
    plot_search(rd / "search.jsonl", rd / "plots" / "search.png")
    rd.mark_complete("search", fp, ["gamma.safetensors", "search.jsonl"], info["search_seconds"], info=info)
    atomic_write_json(index, {"run_dir": str(rd.path.resolve()), "fingerprint": fp})


def cut_masks(gamma: dict[str, torch.Tensor], targets: list[Target], rd: RunDir) -> dict[str, dict[str, torch.Tensor]]:
    """Masks for every target from one Γ: seconds, no model forward."""
    scores = {n: g.abs() for n, g in gamma.items()}
    out = {}
    for t in targets:
        out[t.tag] = t.cut(scores)
        save_masks(rd / f"masks/{t.tag}.safetensors", out[t.tag], {"target": t.tag, "method": "unipruning"})
    return out


def evaluate_masks(cfg: DictConfig, model, tok, layers, all_masks: dict[str, dict], windows: dict[str, torch.Tensor],
                   timer: Timer) -> dict[str, dict]:
    """Evaluate each set of masks in turn; the original weights are restored between sets."""
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    results = {}
    for tag, masks in all_masks.items():
        apply_masks(layers, masks)
        with timer.stage("pruned_eval"):
            results[tag] = evaluate_pruned(cfg, model, tok, windows, tag)
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(original[n])
    return results


def baseline_masks(cfg: DictConfig, model, tok, targets: list[Target]) -> dict[str, dict]:
    """``eval.baselines``: the same cuts from plain local metrics (dense statistics, cached)."""
    from .metrics import METRICS

    if not cfg.eval.baselines:
        return {}
    windows, _ = calibration_set(cfg, tok)
    stats, _ = dense_statistics(cfg, model, windows)
    layers = prunable_layers(model)
    out = {}
    for name in cfg.eval.baselines:
        scores = LocalMetricPruning(METRICS.get(name)(), seed=cfg.seed).scores(layers, stats)
        for t in targets:
            out[f"{name}:{t.tag}"] = t.cut(scores)
    return out


def result_entry(r: dict) -> dict:
    """The compact per-cut record of metrics.json["results"] (with the protocol each number used)."""
    return {"ppl": {c: p["ppl"] for c, p in r["perplexity"].items()},
            "protocol": {c: {"seqlen": p["seqlen"], "windows": p["windows"]} for c, p in r["perplexity"].items()},
            "measured_sparsity": r["sparsity"]["overall"], "per_layer_sparsity": r["sparsity"]["per_layer"],
            "zero_shot_mean": r["zero_shot"].get("mean")}


def record_failure(out_dir: Path, err: BaseException) -> None:
    """``error.json`` in the run directory: a sweep report shows the job as failed with this message."""
    import traceback

    atomic_write_json(Path(out_dir) / "error.json", {"error": str(err), "type": type(err).__name__,
                                                      "traceback": traceback.format_exc()[-4000:]})


def run_prune(cfg: DictConfig, out_dir: Path, reuse_model: bool = False, sweep: SweepContext | None = None) -> dict:
    """Run the whole pipeline into ``out_dir``; returns the metrics written to metrics.json.

    ``reuse_model``: keep the loaded model for the next job of a sweep (see ``load_model_reused``).
    ``sweep``: the sweep this job belongs to, whose other λ its search may serve (see ``run_search``)."""
    t_start = time.perf_counter()
    rd = RunDir(out_dir)
    (rd / "error.json").unlink(missing_ok=True)  # a resumed run starts clean
    timer = Timer()
    atomic_write_text(rd / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    primary = make_target(cfg)

    with timer.stage("load"):
        model, tok = (load_model_reused if reuse_model else load_model)(cfg.model)
    layers = prunable_layers(model)
    for t in targets_of(cfg, primary):  # before any expensive stage
        if t.is_nm:
            try:
                M.check_nm_applicable({n: tuple(m.weight.shape) for n, m in layers.items()}, t.n, t.m)
            except ValueError as err:
                from .errors import UserError

                raise UserError(str(err)) from None

    windows = eval_windows_of(cfg, tok)
    dense_eval = dense_evaluation(cfg, model, tok, windows, timer) if cfg.eval.dense else {"perplexity": {},
                                                                                            "zero_shot": {}}
    dense = dense_eval["perplexity"]

    if cfg.method == "unipruning":
        gamma, calib_info = run_search(cfg, model, tok, rd, timer, sweep)
        targets = targets_of(cfg, primary)
        with timer.stage("masks"):
            all_masks = cut_masks(gamma, targets, rd)
            all_masks |= baseline_masks(cfg, model, tok, targets)
        results = evaluate_masks(cfg, model, tok, layers, all_masks, windows, timer)
    else:
        masks, calib_info = prune_stage(cfg, model, tok, primary, rd, timer)
        with timer.stage("pruned_eval"):
            results = {primary.tag: evaluate_pruned(cfg, model, tok, windows, primary.tag)}

    first = results[primary.tag]
    metrics = {
        "model": {"name": cfg.model.name, "location": model_location(cfg.model),
                  "dtype": str(next(model.parameters()).dtype)},
        "method": cfg.method,
        "local_metric": _plain(cfg.local_metric),
        "pattern": primary.tag,
        "target_sparsity": primary.sparsity,
        "allocation": None if primary.is_nm else primary.allocation,
        "seed": cfg.seed,
        "calibration": calib_info,
        "perplexity": {c: {"dense": dense.get(c), "pruned": first["perplexity"][c]} for c in cfg.eval.corpora},
        "sparsity": first["sparsity"],
        "zero_shot": {"dense": dense_eval["zero_shot"], "pruned": first["zero_shot"]},
        "results": {tag: result_entry(r) for tag, r in results.items()},
        "seconds": {**timer.seconds, "total": round(time.perf_counter() - t_start, 3)},
        "memory": peak_memory(),
        "versions": versions(),
    }
    if cfg.method == "unipruning":
        metrics["search"] = {k: _plain(cfg[k]) for k in ("regularizer", "schedule")}
    atomic_write_json(rd / "metrics.json", metrics)
    plots = write_plots(rd.path, metrics)
    write_summary_md(rd / "summary.md", metrics, plots)
    print_summary(metrics, rd.path)
    return metrics


def prune_stage(cfg: DictConfig, model, tok, target: Target, rd: RunDir, timer: Timer) -> tuple[dict, dict]:
    """Local-metric or SparseGPT pruning of the model in place (masks reloaded when already done)."""
    method = make_method(cfg)
    layers = prunable_layers(model)
    prune_fp = fingerprint({k: _plain(cfg[k]) for k in ("model", "calibration", "local_metric", "method", "pattern",
                                                        "sparsity", "seed")})
    mask_path = f"masks/{target.tag}.safetensors"
    if rd.is_complete("prune", prune_fp) and not method.updates_weights:
        log.info("prune stage complete in %s: loading %s", rd.path, mask_path)
        masks = load_masks(rd / mask_path)
        apply_masks(layers, masks)
        return masks, json.loads((rd / "calibration.json").read_text())
    with timer.stage("calibrate_prune"):
        masks, calib_info = calibrate_and_prune(cfg, model, tok, method, target, rd)
    save_masks(rd / mask_path, masks, {"target": target.tag, "method": cfg.method})
    rd.mark_complete("prune", prune_fp, [mask_path, "calibration.safetensors", "calibration.json"],
                     timer.seconds["calibrate_prune"])
    return masks, calib_info
