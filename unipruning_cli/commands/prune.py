"""The prune pipeline: load -> dense eval -> calibrate + prune (or search + cut) -> pruned eval -> report.

The runner only sequences stages; each stage is one call into the module that owns it (``stages/``, the
method's :meth:`..pruning.method.Method.masks`), and every stage reads the run through one
:class:`..core.context.RunContext`. Each stage writes its artifacts atomically and a completion
marker with the fingerprint of the config values it depends on, so rerunning in the same directory
(``hydra.run.dir=<old run>``) skips finished work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..core.config import plain
from ..core.inputs import compare_inputs, recording, run_inputs
from ..core.distributed import SINGLE, Ranks, from_main, start
from ..stages.dense_evaluation import dense_evaluation
from ..stages.evaluation import eval_windows_of, evaluate_masks, evaluate_pruned, result_entry
from ..core.context import RunContext
from ..pruning.method import method_of
from ..pruning.targets import check_targets_fit, make_target, targets_of
from ..models.loading import input_device, load_model, load_model_reused, model_location, report_unprunable
from ..stages.plan.estimate import Plan, check_run_fits
from ..core.provenance import peak_memory, versions
from ..stages.refinement import refine_stage
from ..stages.reconstruction import with_solver_damping
from ..stages.routing import drop_unscored
from ..core.report import print_summary, write_plots, write_summary_md
from ..core.rundir import RunDir, RunDirRefused, atomic_write_json, atomic_write_text, claim_run_dir, run_lock
from ..stages.sharded_search import check_sharded_run, run_sharded_search
from ..stages.storage import check_run_storage
from ..core.sweep import SweepContext

log = logging.getLogger(__name__)


def record_failure(out_dir: Path, err: BaseException) -> None:
    """``error.json`` in the run directory: a sweep report shows the job as failed with this message."""
    atomic_write_json(Path(out_dir) / "error.json", {"error": str(err), "type": type(err).__name__,
                                                      "traceback": traceback.format_exc()[-4000:]})


def run_prune(cfg: DictConfig, out_dir: Path, reuse_model: bool = False, sweep: SweepContext | None = None,
              ranks: Ranks = SINGLE) -> dict | None:
    """Run the whole pipeline into ``out_dir``; returns the metrics written to metrics.json.

    ``reuse_model``: keep the loaded model for the next job of a sweep (see ``load_model_reused``).
    ``sweep``: the sweep this job belongs to, whose other λ its search may serve (see ``run_search``).
    ``ranks``: a launch over several processes (``torchrun``): every rank runs the drift search with FSDP2
    (:mod:`..stages.sharded_search`), then rank 0 alone runs the rest and the others return None. Only rank 0 writes."""
    # the damping a reconstruction uses is saved as a number (config.yaml): export redoes it even if the default moves
    ctx = RunContext(with_solver_damping(cfg), sweep=sweep, ranks=ranks)  # every stage reads the run through it
    asked = Path(out_dir)
    with contextlib.ExitStack() as held:
        def claim() -> tuple[Path, dict | None]:  # rank 0 claims, locks and checks; a refusal stops every rank
            path = claim_run_dir(asked, plain(ctx.cfg), ctx.cfg.existing_run)
            if path != asked:
                follow_log(asked, path)
            held.enter_context(run_lock(path, "prune"))
            check_run_storage(ctx.cfg, path)
            # before config.yaml, so a refused run leaves the old one as it was; a hub snapshot is whole after the load
            return path, checked_inputs(ctx.cfg, RunDir(path)) if ctx.cfg.model.source != "hub" else None

        out_dir, inputs = from_main(claim, ranks)
        ctx.rd = RunDir(Path(out_dir), create=ranks.main)
        return _run_prune(ctx, inputs, reuse_model)


def _run_prune(ctx: RunContext, inputs: dict | None, reuse_model: bool) -> dict | None:
    t_start = time.perf_counter()
    cfg, rd, timer, ranks = ctx.cfg, ctx.rd, ctx.timer, ctx.ranks
    if ranks.main:
        (rd / "error.json").unlink(missing_ok=True)  # a resumed run starts clean
        atomic_write_text(rd / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    ctx.primary = make_target(cfg)
    if ranks.sharded:
        check_sharded_run(cfg, ranks)
    plan = _checked_plan(cfg, ranks) if cfg.plan_check else None  # before any weight is read
    placement = chosen_placement(cfg, plan)
    if ranks.sharded:
        offload = plan.fsdp_offload if plan is not None else str(cfg.schedule.fsdp_offload).lower() == "true"
        run_sharded_search(cfg, rd, timer, ranks, start(ranks), offload)
        if not ranks.main:
            return None

    with timer.stage("load"):
        ctx.loaded(*(load_model_reused if reuse_model else load_model)(cfg.model, placement))
    if inputs is None or inputs["model"] is None:  # a hub model fetched by the load: its files are in the cache now
        inputs = checked_inputs(cfg, rd)
    with recording(inputs):
        metrics = _prune_loaded(ctx, plan, placement)
    metrics["inputs"] = inputs
    metrics["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    if (rd / "metrics.json").is_file():  # a rerun of this run: the later `unipruning eval` records stay with it
        earlier = json.loads((rd / "metrics.json").read_text()).get("evaluations")
        if earlier:
            metrics["evaluations"] = earlier
    atomic_write_json(rd / "metrics.json", metrics)
    plots = write_plots(rd.path, metrics)
    write_summary_md(rd / "summary.md", metrics, plots)
    print_summary(metrics, rd.path)
    return metrics


def follow_log(old: Path, new: Path) -> None:
    """Point the log files Hydra opened in ``old`` (``prune.log``) at the same names in ``new``: the run that moved
    beside another (``existing_run=beside``) logs into its own directory, not into the other run's log."""
    new.mkdir(parents=True, exist_ok=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent.resolve() == old.resolve():
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename = str(new.resolve() / Path(handler.baseFilename).name)
                handler.stream = handler._open()
            finally:
                handler.release()


def checked_inputs(cfg: DictConfig, rd: RunDir) -> dict:
    """:func:`..core.inputs.run_inputs` of ``cfg``, written to ``rd/inputs.json``; a run directory started on other
    inputs (its model, tokenizer or corpus files changed since) is refused with :class:`UserError`: its finished
    stages were computed from them."""
    inputs = run_inputs(cfg)
    saved = rd / "inputs.json"
    if saved.is_file():
        changes = compare_inputs(json.loads(saved.read_text()), inputs, ("model", "tokenizer", "corpora"))
        if changes:
            raise RunDirRefused(f"run directory {rd.path} was started on other inputs ({'; '.join(changes[:6])}): its "
                                "finished stages were computed from them. Choose another hydra.run.dir")
    atomic_write_json(saved, inputs)
    return inputs


def _prune_loaded(ctx: RunContext, plan: Plan | None, placement: str) -> dict:
    """The stages after the load: dense eval, the method's masks (:meth:`..pruning.method.Method.masks`), refined and
    reconstructed, then evaluated; the metrics."""
    cfg = ctx.cfg
    coverage = report_unprunable(ctx.model, ctx.layers)
    ctx.primary = ctx.primary.for_model(ctx.model)  # a heads cut reads the model's head counts
    ctx.targets = drop_unscored(targets_of(cfg, ctx.primary), ctx.primary, ctx.model)
    check_targets_fit(ctx.layers, ctx.targets)

    windows = eval_windows_of(cfg, ctx.tok)
    dense = dense_evaluation(ctx, windows) if cfg.eval.dense else {"perplexity": {}, "zero_shot": {}}

    method = method_of(cfg)
    cuts = method.masks(ctx)
    if cuts.in_place:  # the model holds its one cut, with the weights the method chose
        with ctx.timer.stage("pruned_eval"):
            results = {ctx.primary.tag: evaluate_pruned(ctx, windows, ctx.primary.tag)}
        if method.updates_weights:  # SparseGPT: its own update, no W x mask to compare with
            results[ctx.primary.tag]["weights"] = "updated"
    else:
        masks, refined = refine_stage(ctx, cuts.masks)
        results = evaluate_masks(ctx, masks, windows, refined)

    metrics = run_metrics(ctx, cuts.calibration, dense, results, plan, placement)
    metrics["coverage"] = coverage
    return metrics


def _checked_plan(cfg: DictConfig, ranks: Ranks) -> Plan | None:
    """:func:`check_run_fits` on rank 0, its plan or its refusal then on every rank (all stop, or none)."""
    return from_main(lambda: check_run_fits(cfg, ranks.world), ranks)


def chosen_placement(cfg: DictConfig, plan: Plan | None) -> str:
    """``model.placement`` resolved: as set, else the plan's choice (``onload`` when only that fits), else ``device``."""
    if cfg.model.placement != "auto":
        return cfg.model.placement
    return "onload" if plan is not None and plan.onload else "device"


def run_metrics(ctx: RunContext, calib_info: dict, dense: dict, results: dict[str, dict], plan: Plan | None,
                placement: str = "device") -> dict:
    """The content of ``metrics.json`` (docs/run-directory.md): the primary cut in full, every cut
    in ``results``, with the calibration, seconds per stage (``ctx.timer``'s), the placement and its memory plan,
    peak memory (and per stage on CUDA) and library versions."""
    cfg, model, layers, primary, timer = ctx.cfg, ctx.model, ctx.layers, ctx.primary, ctx.timer
    first = results[primary.tag]
    method = method_of(cfg)
    memory = peak_memory()
    if timer.cuda_peak_mib:  # the stages reset CUDA's peak counter: the run's peak is the largest of theirs
        memory["peak_cuda_mib"] = max(memory.get("peak_cuda_mib", 0.0), *timer.cuda_peak_mib.values())
        memory["stages_cuda_mib"] = dict(timer.cuda_peak_mib)
        memory["stages_cuda_reserved_mib"] = dict(timer.cuda_reserved_mib)  # the allocator's peak, fragmentation too
    if timer.pinned_host_mib:  # pinned host memory CUDA's host allocator holds at each stage's end
        memory["stages_pinned_host_mib"] = dict(timer.pinned_host_mib)
    memory["host_peak_so_far_mib"] = dict(timer.host_peak_mib)  # which stage set the host's peak
    memory["stages_mem_available_mib"] = dict(timer.mem_available_mib)  # the machine's MemAvailable at each stage's end
    weight = next(model.parameters())
    metrics = {
        "model": {"name": cfg.model.name, "location": model_location(cfg.model),
                  "dtype": str(next(model.parameters()).dtype)},
        "method": method.name,
        "method_label": method.label(),
        "local_metric": plain(cfg.local_metric),
        "pattern": primary.tag,
        "target_sparsity": primary.sparsity,
        "allocation": None if primary.is_nm else primary.allocation,
        "seed": cfg.seed,
        "calibration": calib_info,
        "perplexity": {c: {"dense": dense["perplexity"].get(c), "pruned": first["perplexity"][c]}
                       for c in cfg.eval.corpora},
        "sparsity": first["sparsity"],
        "zero_shot": {"dense": dense["zero_shot"], "pruned": first["zero_shot"]},
        "results": {tag: result_entry(r) for tag, r in results.items()},
        "seconds": dict(timer.seconds),
        "placement": {"device": str(input_device(model)), "blocks": str(next(iter(layers.values())).weight.device),
                      "placement": placement, "dtype": str(weight.dtype), "device_map": cfg.model.device_map,
                      "max_memory": plain(cfg.model.max_memory),
                      "search_state": cfg.schedule.search_state if method.searches else None},
        "plan": None if plan is None else {k: plan.to_dict()[k] for k in ("fits", "peak_gpu_gib", "peak_host_gib",
                                                                           "placement")},
        "memory": memory,
        "versions": versions(),
    }
    if method.searches:
        metrics["search"] = {k: plain(cfg[k]) for k in ("regularizer", "schedule")}
    if primary.shares_budget:
        from ..pruning.masks import num_pruned

        numel = {n: m.weight.numel() for n, m in layers.items()}
        metrics["matrices_at_cap"] = {"cap": primary.cap, "names": [
            n for n, sp in first["sparsity"]["per_layer"].items() if round(sp * numel[n]) >= num_pruned(numel[n], primary.cap)]}
    return metrics
