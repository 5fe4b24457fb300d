"""Typed config schemas for the Hydra app and the semantic checks Hydra's types cannot express.

The dataclasses are registered in Hydra's ConfigStore, so YAML files in ``configs/<group>/`` are type-checked at
compose time (``sparsity=abc`` fails there). Range and cross-field rules (a sparsity in [0, 1), an N:M pattern that is
one) live in :func:`validate_values`; the checks that look a name, a model, a corpus or a task up are in
:mod:`unipruning_cli.stages.preflight`, which the CLI calls before any model is loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError, check
from ..pruning.targets import SHARED_BUDGET
from ..search.settings import LR_SCHEDULES, ScheduleConfig

MODEL_SOURCES = ("hub", "local", "embedded", "gguf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PLACEMENTS = ("auto", "device", "onload")
ALLOCATIONS = ("per_row", "per_matrix", "global", "owl", "gamma")
CALIBRATION_MODES = ("auto", "one_shot", "sequential")
CALIBRATION_SAMPLINGS = ("windows", "documents", "stream")
WEIGHT_MODES = ("drift", "frozen")
THRESHOLD_MODES = ("quantile", "absolute")


@dataclass
class ModelConfig:
    """Which model to prune and how to place it. ``path`` is an HF id, a folder, or an embedded asset."""

    name: str = MISSING
    source: str = "hub"
    path: str = MISSING
    revision: Optional[str] = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    device_map: Optional[str] = None  # e.g. "auto" to shard a model larger than one GPU (accelerate)
    max_memory: Dict[Any, str] = field(default_factory=dict)  # device_map caps: +model.max_memory.0=70GiB (accelerate)
    # device: every weight on model.device; onload: decoder blocks in host memory, one at a time on the GPU
    # (sequential onloading, onload.py); auto: the memory plan's choice (device when it fits).
    placement: str = "auto"
    seqlen: int = 2048  # default calibration / evaluation window for this model
    # BOS first in every calibration window, search batch and evaluation window: "auto" follows what the model's
    # tokenizer does when it encodes text (models trained with BOS: Llama, Gemma); "true" / "false" force it
    add_bos: str = "auto"
    trust_remote_code: bool = False
    # RoPE models: allow windows longer than the model's position limit (max_position_embeddings) where it has no
    # RoPE scaling; a model with learned positions can never run past its table
    allow_long_context: bool = False


@dataclass
class PatternConfig:
    """Sparsity pattern: ``unstructured`` with an allocation rule, N:M along the input dimension, ``channels``,
    ``heads`` or ``experts`` (whole units: :mod:`..pruning.channels`, :mod:`..pruning.heads`, :mod:`..pruning.experts`)."""

    kind: str = "unstructured"
    n: int = 0
    m: int = 0
    allocation: Optional[str] = None  # None: the method's own comparison group
    # where the budget is shared across matrices (allocation=global): the most any one matrix may lose; the
    # budget a capped matrix leaves goes to the others (a matrix pruned to 100 % breaks the model's forward)
    max_matrix_sparsity: float = 0.99
    # allocation=owl: OWL's outlier threshold M and the half-range λ of the layer sparsities (published: 5, 0.08)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    # allocation=gamma: the most a layer's sparsity may differ from the target (our choice: OWL's λ)
    gamma_delta: float = 0.08
    experts_removed: Optional[float] = None  # pattern=experts: a share in (0, 1) or a count (null: ``sparsity``)
    expert_score: str = "saliency"  # pattern=experts: saliency | reap | frequency (configs/pattern/experts.yaml)
    channel_score: str = "weights"  # pattern=channels / heads: weights | flap (configs/pattern/channels.yaml)
    experts_floor: Optional[int] = None  # pattern=experts: null, the same count per layer; N: one budget, N kept at least


@dataclass
class CalibrationConfig:
    """``calibration``: its values and their meaning are in ``configs/prune.yaml`` (written once, there)."""

    source: str = MISSING
    nsamples: int = MISSING
    seqlen: int = MISSING
    mode: str = MISSING
    offload: str = "cpu"  # where captured block inputs live between blocks
    sampling: str = MISSING
    min_expert_tokens: int = MISSING


@dataclass
class EvalConfig:
    """``eval``: its values and their meaning are in ``configs/prune.yaml`` (written once, there)."""

    corpora: List[str] = MISSING
    seqlen: int = MISSING
    max_windows: Optional[int] = MISSING
    random_windows: Optional[int] = MISSING
    batch_size: int = MISSING
    dense: bool = True  # also measure the unpruned model (cached per model, corpus, seqlen)
    tasks: List[str] = MISSING
    task_limit: Optional[int] = MISSING
    task_batch_size: int = MISSING
    max_length: Optional[int] = MISSING
    baselines: Optional[List[str]] = MISSING


@dataclass
class RegularizerConfig:
    """Ω and λ of the search. ``quantile``: λ is the per-matrix quantile level of |V| (reference code)."""

    name: str = "l1"
    lam: float = 1e-3
    threshold_mode: str = "quantile"


@dataclass
class ExportConfig:
    """``export``: which masks to cut from one set of scores (UniPruning's Γ); values in ``configs/prune.yaml``."""

    sparsities: Optional[List[float]] = MISSING
    patterns: Optional[List[str]] = MISSING


@dataclass
class PruneConfig:
    """The schema of ``configs/prune.yaml``. Every default is written once: the top-level values, ``calibration``,
    ``eval`` and ``export`` in ``prune.yaml`` (MISSING here), the groups' in their dataclasses (``ModelConfig``,
    ``PatternConfig``, ``RegularizerConfig``, ``search.settings.ScheduleConfig``, the metrics' knobs), whose option
    files say only what differs (``tests/test_config_defaults.py``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    local_metric: Dict[str, Any] = MISSING
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pattern: PatternConfig = field(default_factory=PatternConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    method: Any = MISSING  # the method group: name and settings (methods.base.Method.Settings)
    sparsity: Optional[float] = MISSING
    seed: int = MISSING
    reuse_search: bool = MISSING
    share_lam_search: bool = MISSING
    plan_check: bool = MISSING
    reconstruct: str = MISSING
    reconstruct_percdamp: Optional[float] = MISSING  # None: the solver's own (pruning/mask_solvers.py)
    refine: str = MISSING
    refine_rounds: Optional[int] = MISSING
    refine_seconds: Optional[float] = MISSING
    layer_target: str = MISSING
    existing_run: str = MISSING
    experiment: Optional[str] = None


_LAUNCH_TIME = None


def set_launch_time(when) -> None:
    """Fix ``${launch_time:<strftime pattern>}`` (the run and sweep folders) to ``when`` (a ``datetime``): the ranks
    of a launch take rank 0's, so they compose one run directory."""
    global _LAUNCH_TIME
    _LAUNCH_TIME = when


def _launch_time(pattern: str) -> str:
    from datetime import datetime

    return (_LAUNCH_TIME or datetime.now()).strftime(pattern)


# Hydra's ${now:...}, except that a multi-rank launch shares rank 0's time (set_launch_time).
OmegaConf.register_new_resolver("launch_time", _launch_time, use_cache=True, replace=True)


def register_schemas() -> None:
    """Register the prune schema, the defaults of every method's and local metric's knobs (their YAML options take
    them from there), and a group option for every registered method, local metric and regulariser that has no YAML
    of its own in ``configs/``: a new one is then selectable as ``method=<name>`` (``local_metric=<name>``,
    ``regularizer=<name>``) with its class defaults, without a config file."""
    from dataclasses import asdict

    from ..pruning.method import METHODS
    from ..metrics import METRICS, knob_defaults
    from ..search.regularizers import REGULARIZERS

    cs = ConfigStore.instance()
    cs.store(name="prune_schema", node=PruneConfig)
    root = Path(config_dir())
    for name in METHODS:  # the settings' defaults come from the method's Settings alone; its YAML only adds docs
        own = (root / "method" / f"{name}.yaml").exists()
        try:
            settings = asdict(METHODS.get(name).Settings())
        except Exception as err:  # noqa: BLE001 - a plugin that does not load fails only where it is chosen
            logging.getLogger(__name__).warning("method %s is not available: %s: %s", name, type(err).__name__, err)
            continue
        cs.store(group="method" if not own else "defaults/method", name=name, node={"name": name, **settings})
    for name in METRICS:  # the knobs' defaults come from the metric's class alone; a YAML of its own only adds docs
        own = (root / "local_metric" / f"{name}.yaml").exists()
        cs.store(group="local_metric" if not own else "defaults/local_metric", name=name,
                 node={"name": name, **knob_defaults(METRICS.get(name))})
    for name in REGULARIZERS:
        if not (root / "regularizer" / f"{name}.yaml").exists():
            cs.store(group="regularizer", name=name, node={"name": name})


def config_dir() -> str:
    """The ``configs/`` folder: $UNIPRUNING_CONFIG_DIR, else the one beside the package (editable install)."""
    env = os.environ.get("UNIPRUNING_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "prune.yaml").exists():
        raise UserError(f"config folder {path} not found; install the package editable (pip install -e .) "
                        f"or set UNIPRUNING_CONFIG_DIR")
    return str(path)


#: Fields a run may predate, and what their absence meant where that is not today's default (a run made before the
#: per-matrix cap existed was cut with none).
PREDATED = {"pattern": {"max_matrix_sparsity": 1.0}}


def complete_run_config(saved: DictConfig) -> DictConfig:
    """A run's saved ``config.yaml`` with every field it predates filled in: :data:`PREDATED` where its absence meant
    something else, else today's default (``configs/prune.yaml``'s values, the schemas' defaults), so a run made by
    an older version opens for ``eval`` and ``export`` and the code reads every field directly. Keys the schema no
    longer knows are kept as they were."""
    base = OmegaConf.structured(PruneConfig)
    OmegaConf.set_struct(base, False)
    today = OmegaConf.load(Path(config_dir()) / "prune.yaml")
    for key in ("defaults", "hydra"):
        today.pop(key, None)
    predated = OmegaConf.create({group: {k: v for k, v in fields.items() if k not in saved.get(group, {})}
                                 for group, fields in PREDATED.items()})
    if isinstance(saved.get("method"), str):  # before methods had settings: ``method: <name>``
        saved = OmegaConf.create({**OmegaConf.to_container(saved), "method": {"name": saved.method}})
    return OmegaConf.merge(base, today, predated, saved)


def compose_prune(overrides: list[str]) -> DictConfig:
    """The prune config that ``unipruning prune <overrides>`` runs, for scripts and tests (not validated).

    Hydra's compose API on the same config folder and schema as the CLI, so a benchmark or a test
    measures exactly what a user would run.
    """
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("prune", overrides=overrides)


# ----------------------------------------------------------------------------------------------
# Semantic validation: everything that can be checked without loading a model.


def one_of(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    check(value in allowed, f"{field_name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def plain(node: Any) -> Any:
    """A config node as plain, resolved Python containers (for fingerprints and JSON); other values as they are."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_values(model_cfg: DictConfig) -> dict:
    """``model`` as it enters fingerprints: without where the weights are placed, which changes no result."""
    return {k: v for k, v in plain(model_cfg).items() if k not in ("placement", "max_memory", "allow_long_context")}


def validate_values(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for a value that is out of range or inconsistent with another.

    Only what the config alone can tell: no registry, model, corpus or task is looked up here (that is
    :func:`unipruning_cli.stages.preflight.validate`, which calls this first).
    """
    from ..pruning.channels import validate_channels
    from ..pruning.swaps import validate_refine

    validate_pattern(cfg)
    one_of("reconstruct", cfg.reconstruct, ("none", "obs", "admm", "ls", "bias"))
    if cfg.reconstruct_percdamp is not None and not 0 < cfg.reconstruct_percdamp < float("inf"):
        raise UserError(f"reconstruct_percdamp={cfg.reconstruct_percdamp}: expected a fraction > 0 of H's mean diagonal")
    validate_refine(cfg)
    validate_channels(cfg)
    one_of("existing_run", cfg.existing_run, ("refuse", "beside"))
    one_of("model.source", cfg.model.source, MODEL_SOURCES)
    one_of("model.dtype", cfg.model.dtype, DTYPES)
    validate_placement(cfg)
    validate_calibration(cfg.calibration)
    validate_eval_values(cfg.eval)
    validate_search(cfg)
    validate_export(cfg)


def validate_pattern(cfg: DictConfig) -> None:
    p = cfg.pattern
    one_of("pattern.kind", p.kind, ("unstructured", "nm", "channels", "heads", "experts"))
    if p.kind == "experts":
        from ..pruning.experts import validate_experts

        validate_experts(cfg)
    check(p.kind not in ("channels", "heads", "experts") or p.allocation is None, f"pattern.allocation={p.allocation}: pattern=channels removes "
          "the same share of channels from every MLP (the exported config stays standard); drop pattern.allocation")
    if p.allocation is not None:
        one_of("pattern.allocation", p.allocation, (*ALLOCATIONS, "auto"))
    one_of("model.add_bos", str(cfg.model.add_bos).lower(), ("auto", "true", "false"))
    check(0.0 < p.max_matrix_sparsity <= 1.0, f"pattern.max_matrix_sparsity={p.max_matrix_sparsity} is out of range: "
          f"it must satisfy 0 < max_matrix_sparsity <= 1 (1: no cap)")
    check(cfg.sparsity is None or p.allocation not in SHARED_BUDGET or cfg.sparsity <= p.max_matrix_sparsity,
          f"sparsity={cfg.sparsity} with pattern.allocation={p.allocation} is more than pattern.max_matrix_sparsity="
          f"{p.max_matrix_sparsity} lets any matrix lose: raise the cap or lower the sparsity")
    s = cfg.sparsity
    check(s is None or 0.0 <= s < 1.0, f"sparsity={s} is out of range: it must satisfy 0 <= sparsity < 1")
    if p.kind == "nm":
        check(0 < p.n < p.m, f"pattern={p.n}:{p.m} is not a valid N:M pattern: it needs 0 < N < M (N weights kept "
              "in every group of M), e.g. pattern=2:4 or pattern=4:8")
        implied = 1.0 - p.n / p.m
        check(s is None or abs(s - implied) < 1e-9, f"sparsity={s} conflicts with pattern={p.n}:{p.m}, whose "
              f"sparsity is {implied:g}; drop the sparsity override or use pattern=unstructured")


def validate_placement(cfg: DictConfig) -> None:
    """``model.placement`` against ``device_map`` (against the method: :meth:`..pruning.method.Method.check`)."""
    m = cfg.model
    one_of("model.placement", m.placement, PLACEMENTS)
    if m.placement == "onload":
        check(not m.device_map, "model.placement=onload and model.device_map are two ways to place the model: "
                                "choose one")
    check(not m.max_memory or bool(m.device_map), "model.max_memory caps what model.device_map places: set both")


def validate_calibration(c: DictConfig) -> None:
    check(c.nsamples > 0, f"calibration.nsamples={c.nsamples} must be a positive integer")
    check(c.seqlen > 1, f"calibration.seqlen={c.seqlen} must be at least 2 tokens")
    one_of("calibration.mode", c.mode, CALIBRATION_MODES)
    one_of("calibration.sampling", c.sampling, CALIBRATION_SAMPLINGS)
    check(c.min_expert_tokens >= 1, f"calibration.min_expert_tokens={c.min_expert_tokens} must be at least 1 (an "
                                    "expert with no routed token has no statistics of its own)")


def validate_eval_values(e: DictConfig) -> None:
    """The ``eval`` group's ranges (its baselines and tasks are looked up in :mod:`unipruning_cli.stages.preflight`)."""
    check(e.seqlen > 1, f"eval.seqlen={e.seqlen} must be at least 2 tokens")
    check(e.task_limit is None or e.task_limit > 0, f"eval.task_limit={e.task_limit} must be positive or null")
    check(e.batch_size > 0, f"eval.batch_size={e.batch_size} must be positive")
    check(e.max_windows is None or e.max_windows > 0, f"eval.max_windows={e.max_windows} must be positive or null")
    check(e.random_windows is None or e.random_windows > 0,
          f"eval.random_windows={e.random_windows} must be positive or null")


def validate_search(cfg: DictConfig) -> None:
    """The regularizer and schedule checks alone: what a config that differs only there needs."""
    r, s = cfg.regularizer, cfg.schedule
    one_of("regularizer.threshold_mode", r.threshold_mode, THRESHOLD_MODES)
    check(r.lam >= 0, f"regularizer.lam={r.lam} must be >= 0")
    if r.threshold_mode == "quantile":
        check(r.lam < 1, f"regularizer.lam={r.lam} is a quantile level here and must be < 1")
    one_of("schedule.weight_mode", s.weight_mode, WEIGHT_MODES)
    check(s.steps > 0, f"schedule.steps={s.steps} must be positive")
    check(0 < s.dual_step <= 1, f"schedule.dual_step={s.dual_step} must be in (0, 1]")
    check(s.rho >= 0, f"schedule.rho={s.rho} must be >= 0")
    check(s.lr >= 0, f"schedule.lr={s.lr} must be >= 0")
    check(s.lr > 0 or s.weight_mode != "drift", "schedule.lr=0 leaves W where it is: that is "
                                                "schedule.weight_mode=frozen, which costs no backward pass")
    check(0 <= s.warmup_ratio < 1, f"schedule.warmup_ratio={s.warmup_ratio} must be in [0, 1)")
    one_of("schedule.decay", s.decay, tuple(LR_SCHEDULES))
    check(s.grad_clip is None or s.grad_clip > 0,
          f"schedule.grad_clip={s.grad_clip} must be > 0 (the largest global gradient norm), or null for no "
          f"clipping; 0 would zero every gradient, so W would never drift")
    one_of("schedule.grad_clip_scope", s.grad_clip_scope, ("model", "prunable"))
    check(len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas),
          f"schedule.betas={list(s.betas)} must be two of AdamW's decay rates, each in [0, 1), e.g. [0.9,0.999]")
    check(s.eps > 0, f"schedule.eps={s.eps} must be > 0")
    check(s.weight_decay >= 0, f"schedule.weight_decay={s.weight_decay} must be >= 0")
    check(s.grad_accumulation >= 1, f"schedule.grad_accumulation={s.grad_accumulation} must be >= 1")
    check(s.checkpoint_every >= 1, f"schedule.checkpoint_every={s.checkpoint_every} must be >= 1")
    one_of("schedule.search_state", s.search_state, ("auto", "device", "host"))
    one_of("schedule.fsdp_offload", str(s.fsdp_offload).lower(), ("auto", "true", "false"))
    one_of("schedule.drift_dtype", s.drift_dtype, ("weights", "float32"))


def validate_export(cfg: DictConfig) -> None:
    """``export.patterns`` / ``export.sparsities``, and the one cross-field rule of ``pattern.allocation=global``."""
    for pat in cfg.export.patterns or []:
        n, _, m = str(pat).partition(":")
        check(n.isdigit() and m.isdigit() and 0 < int(n) < int(m),
              f"export.patterns contains {pat!r}: each must be N:M with 0 < N < M, e.g. 2:4")
    for s in cfg.export.sparsities or []:
        check(0.0 <= s < 1.0, f"export.sparsities contains {s}: every sparsity must satisfy 0 <= s < 1")
    if cfg.pattern.allocation in SHARED_BUDGET:
        check(cfg.calibration.mode in ("auto", "one_shot"),
              f"pattern.allocation={cfg.pattern.allocation} needs every score at once: use calibration.mode=one_shot and a "
              "score-based method (local, unipruning)")
