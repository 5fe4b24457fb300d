"""``unipruning eval <run_dir>``: evaluate the masks of a finished run again, without searching.

Any cut the run holds (or that its Γ can cut) is applied to the original weights and measured with
the run's protocol, or with ``eval.*`` overrides (more windows, other corpora, zero-shot tasks). The
results are merged into the run's ``metrics.json``, and ``summary.md`` and the plots are rewritten.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..core.errors import UserError

log = logging.getLogger(__name__)


def eval_command(args: list[str]) -> None:
    from ..core.progress import console_logging

    ap = argparse.ArgumentParser(prog="unipruning eval", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("settings", nargs="*", help="sparsity=S | pattern=N:M | allocation=A | all | eval.<key>=<value>")
    ap.add_argument("--allow-changed-model", action="store_true",
                    help="evaluate although the model's files differ from those the run pruned (recorded)")
    ns = ap.parse_args(args)
    console_logging()
    evaluate_run(ns.run_dir, ns.settings, allow_changed_model=ns.allow_changed_model)


def _parse(settings: list[str]) -> tuple[dict, list[str], bool]:
    cut, dotlist, every = {}, [], False
    for s in settings:
        if s == "all":
            every = True
        elif s.startswith("eval."):
            dotlist.append(s)
        elif "=" in s and s.split("=", 1)[0] in ("sparsity", "pattern", "allocation"):
            k, v = s.split("=", 1)
            cut[k] = v
        else:
            raise UserError(f"unipruning eval: cannot read {s!r}; use sparsity=S, pattern=N:M, allocation=A, all, "
                            f"or eval.<key>=<value>")
    return cut, dotlist, every


def evaluate_run(run_dir: Path, settings: list[str], allow_changed_model: bool = False) -> dict:
    """Evaluate cuts of the finished run ``run_dir`` (``settings``: see :func:`eval_command`) and merge the results
    into its ``metrics.json``. Before the model loads, the model's files must be the ones the run read
    (:func:`..core.inputs.check_same_inputs`; ``allow_changed_model`` lets a change through: then the figures go only into
    a new entry of ``evaluations``, marked ``changed_model``, never over the run's own), and no other process may be
    writing the run (:func:`..core.rundir.run_lock`). Raises :class:`UserError`."""
    from ..stages.export.run import open_run
    from ..core.rundir import run_lock

    run = open_run(run_dir)
    with run_lock(run.path, "eval"):
        return _evaluate(run, settings, allow_changed_model)


def _evaluate(run, settings: list[str], allow_changed_model: bool) -> dict:
    from ..data.corpora import check_corpus_available
    from ..stages.export.run import held_tags, load_or_cut, masks_source, resolve_target
    from ..core.context import RunContext
    from ..models.loading import load_model
    from ..stages.preflight import validate_eval
    from ..core.report import print_summary, write_plots, write_summary_md
    from ..core.rundir import atomic_write_json
    from ..pruning.mask_files import load_masks
    from ..stages.refinement import refine_stage
    from ..stages.allocation import choose_allocations
    from ..core.lazymap import LazyMap
    from ..pruning.targets import AUTO
    from ..core.rundir import load_tensors
    from ..core.rundir import RunDir
    from ..stages.dense_evaluation import dense_evaluation
    from ..stages.evaluation import eval_windows_of, evaluate_masks, result_entry

    import tempfile

    from ..stages.export.folder import check_mask_shapes
    from ..models.loading import check_model_reachable
    from ..core.paths import cache_dir
    from ..stages.storage import check_writable
    from ..core.inputs import check_same_inputs, recording

    cut, dotlist, every = _parse(settings)
    cfg = run.cfg
    if dotlist:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"unipruning eval: {err}") from None
    validate_eval(cfg.eval)
    for corpus in cfg.eval.corpora:
        check_corpus_available(corpus)
    if every:
        tags = held_tags(run)
        sources = {t: "file" for t in tags}
        targets = {t: None for t in tags}
    else:
        target = resolve_target(run, float(cut["sparsity"]) if "sparsity" in cut else None, cut.get("pattern"),
                                cut.get("allocation"))
        targets, sources = {target.tag: target}, {target.tag: masks_source(run, target, can_choose=True)}
    check_model_reachable(cfg.model)
    check_writable(cache_dir(), "the cache (UNIPRUNING_CACHE)")
    changed = check_same_inputs(run.metrics.get("inputs"), cfg.model, f"run {run.path}", allow_changed_model, False)
    # everything is checked: now the model, placed as the run placed it (a 70B run onloaded is evaluated onloaded)
    placement = cfg.model.get("placement") or "auto"
    if placement == "auto":
        placement = (run.metrics.get("placement") or {}).get("placement") or "device"
    model, tok = load_model(cfg.model, placement)
    changed += check_same_inputs(run.metrics.get("inputs"), cfg.model, f"run {run.path}", allow_changed_model, True)
    ctx = RunContext(cfg).loaded(model, tok)
    layers = ctx.layers
    with recording(run.metrics.get("inputs")), tempfile.TemporaryDirectory() as scratch:
        for t, target in targets.items():  # allocation=auto from Γ: chosen here, as the run chose its own cuts
            if target is not None and sources[t] == "gamma" and target.allocation == AUTO:
                gamma = load_tensors(run.gamma_path)
                (targets[t],), choice = choose_allocations(ctx, LazyMap(gamma, lambda n: gamma[n].abs()), [target])
                ctx.allocation_choices.update(choice)
        all_masks = {t: (load_masks(run.mask_path(t)) if targets[t] is None else
                         load_or_cut(run, targets[t], sources[t])) for t in targets}
        for t, masks in all_masks.items():
            check_mask_shapes(layers, masks, str(run.mask_path(t)))
        timer = ctx.timer
        windows = eval_windows_of(cfg, tok)
        dense = dense_evaluation(ctx, windows)
        # a run that refined its masks (refine=swap): a cut new from Γ is refined as the run's were, and saved so;
        # on other weights (--allow-changed-model) the refined masks are not the run's: they stay out of it
        ctx.rd = RunDir(scratch if changed else run.path)
        all_masks, refined = refine_stage(ctx, all_masks)
        results = evaluate_masks(ctx, all_masks, windows, refined)
    metrics = dict(run.metrics)
    for tag, r in (results.items() if not changed else ()):  # the run's own figures are of the run's own weights
        metrics.setdefault("results", {})[tag] = result_entry(r)
        if tag == metrics.get("pattern"):
            metrics["perplexity"] = {c: {"dense": dense["perplexity"][c], "pruned": r["perplexity"][c]} for c in windows}
            metrics["zero_shot"] = {"dense": dense["zero_shot"], "pruned": r["zero_shot"]}
            metrics["sparsity"] = r["sparsity"]
    metrics.setdefault("evaluations", []).append({"tags": list(results), "eval": OmegaConf.to_container(cfg.eval),
                                                  **({"changed_model": changed} if changed else {}),
                                                  "dense": {"perplexity": dense["perplexity"],
                                                            "zero_shot": dense["zero_shot"]},
                                                  "seconds": timer.seconds, "per_tag": {
                                                      t: {"perplexity": r["perplexity"], "zero_shot": r["zero_shot"]}
                                                      for t, r in results.items()}})
    atomic_write_json(run.path / "metrics.json", metrics)
    if changed:  # what was measured is shown as what it is; the run's own summary and plots stay the run's
        tag, first = next(iter(results.items()))
        shown = {**metrics, "results": {t: result_entry(r) for t, r in results.items()}, "pattern": tag,
                 "sparsity": first["sparsity"], "perplexity": {
                     c: {"dense": dense["perplexity"][c], "pruned": first["perplexity"][c]} for c in windows}}
        log.warning("CHANGED MODEL (--allow-changed-model): the figures below are of the weights now at %s, not of "
                    "the run's; metrics.json keeps them under evaluations[-1], beside the run's own", cfg.model.path)
        print_summary(shown, run.path)
        return metrics
    plots = write_plots(run.path, metrics)
    write_summary_md(run.path / "summary.md", metrics, plots)
    print_summary(metrics, run.path)
    return metrics
