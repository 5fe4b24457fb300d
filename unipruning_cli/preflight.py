"""Every check of a prune config that can run before any weight is read: values, names, model, corpora, tasks.

:mod:`unipruning_cli.config` checks what the config alone can tell (ranges, cross-field rules); this
module adds what needs a lookup: the method, local metric and regulariser in their registries, the model folder or
hub id, each corpus, the lm-eval tasks and the baselines. It imports those modules; none of them
imports it, so there is no circle. The CLI calls :func:`validate` before it loads anything.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .baselines.local import parse_baseline
from .config import check, validate_eval_values, validate_values
from .data import check_calibration_documents, check_corpus_available
from .errors import UserError
from .evaluation.zeroshot import check_tasks
from .methods import METHODS
from .metrics import METRICS, build_metric
from .models import check_model_reachable
from .search.regularizers import REGULARIZERS


def validate(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for anything in ``cfg`` that would fail later, before a model is loaded.

    The message names the field and what is allowed (``Unknown local_metric 'wnda'; did you mean 'wanda'?``).
    """
    validate_values(cfg)
    check_model_reachable(cfg.model)
    try:
        METHODS.get(cfg.method)
    except KeyError as err:
        raise UserError(f"method: {err}") from None
    check(cfg.regularizer.name in REGULARIZERS, f"regularizer.name: {REGULARIZERS.unknown_message(cfg.regularizer.name)}")
    knobs = {k: v for k, v in OmegaConf.to_container(cfg.local_metric, resolve=True).items() if k != "name"}
    try:
        build_metric(cfg.local_metric.name, **knobs)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"local_metric: {err}") from None
    validate_eval(cfg.eval)
    validate_method_options(cfg)
    for where, corpus in [("calibration.source", cfg.calibration.source), *[("eval.corpora", c) for c in cfg.eval.corpora]]:
        try:
            check_corpus_available(corpus)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    check_calibration_documents(cfg.calibration.source, cfg.calibration.sampling, cfg.calibration.nsamples)


def validate_eval(e: DictConfig) -> None:
    """The ``eval`` group: its ranges, its baselines (registered local metrics) and its lm-eval tasks."""
    validate_eval_values(e)
    for b in e.baselines:
        parse_baseline(b)
    check_tasks(e.tasks)


def validate_method_options(cfg: DictConfig) -> None:
    """Refuse an option the chosen method would ignore, so no run reports a setting it did not use."""
    uni = cfg.method == "unipruning"
    check(uni or not cfg.eval.baselines,
          f"eval.baselines cuts local metrics beside a UniPruning Γ; with method={cfg.method} run each baseline as "
          f"its own run (method=local local_metric=<name>)")
    check(uni or not (cfg.export.sparsities or cfg.export.patterns),
          f"export.sparsities / export.patterns cut one Γ at several targets (method=unipruning); method={cfg.method} "
          f"prunes one target per run: sweep it with -m sparsity=0.5,0.6,0.7")
    check(cfg.method != "sparsegpt" or cfg.pattern.allocation is None,
          f"method=sparsegpt chooses its mask per block of 128 columns as it updates the weights (SparseGPT §3.2), "
          f"so pattern.allocation={cfg.pattern.allocation} would be ignored: drop it")
    check(not (cfg.method == "local" and not METRICS.get(cfg.local_metric.name).uses_activations
               and cfg.calibration.mode == "sequential"),
          f"local_metric={cfg.local_metric.name} reads no calibration data, so calibration.mode=sequential would be "
          f"ignored: drop it")
