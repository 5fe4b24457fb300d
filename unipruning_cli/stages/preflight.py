"""Every check of a prune config that can run before any weight is read: values, names, model, corpora, tasks.

:mod:`unipruning_cli.core.config` checks what the config alone can tell (ranges, cross-field rules); this
module adds what needs a lookup: the method, local metric and regulariser in their registries, the model folder or
hub id, each corpus, the lm-eval tasks and the baselines. It imports those modules; none of them
imports it, so there is no circle. The CLI calls :func:`validate` before it loads anything.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from omegaconf import DictConfig, OmegaConf

from .baselines import parse_baseline
from ..core.config import check, validate_eval_values, validate_values
from ..data.corpora import check_calibration_documents, check_corpus_available
from ..core.errors import UserError
from ..evaluation.zeroshot import check_tasks
from ..pruning.method import method_of
from ..metrics import build_metric
from ..models.loading import check_model_reachable
from ..search.regularizers import REGULARIZERS

log = logging.getLogger(__name__)

#: The config fields that hold a model's position limit, by family (Llama/Qwen/OPT, GPT-2, others).
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`UserError` for anything in ``cfg`` that would fail later, before a model is loaded.

    The message names the field and what is allowed (``Unknown local_metric 'wnda'; did you mean 'wanda'?``).
    """
    validate_values(cfg)
    check_model_reachable(cfg.model)
    method_of(cfg)  # an unknown name or bad settings: UserError, "did you mean"
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
    check_model_limits(cfg)
    check_bos(cfg)
    check_corpus_lengths(cfg)
    check_corpus_tokens(cfg)
    check_task_lengths(cfg)
    check_dtype_device(cfg.model)


def validate_eval(e: DictConfig) -> None:
    """The ``eval`` group: its ranges, its baselines (registered local metrics) and its lm-eval tasks."""
    validate_eval_values(e)
    for b in e.baselines or []:
        parse_baseline(b)
    check_tasks(e.tasks)


def validate_method_options(cfg: DictConfig) -> None:
    """Refuse an option the chosen method cannot do or would ignore, so no run reports a setting it did not use
    (:meth:`..pruning.method.Method.check`: the method's own rules)."""
    method_of(cfg).check()
    if cfg.pattern.kind == "experts":
        from ..pruning.targets import baselines_of

        sequential = [b for b in baselines_of(cfg) if parse_baseline(b).protocol == "sequential"]
        if sequential:
            raise UserError(f"eval.baselines={sequential}: a sequential baseline prunes block by block, but experts "
                            "are ranked on the dense model's routing: use <metric>@one_shot")


def check_corpus_lengths(cfg: DictConfig) -> None:
    """A file or offline corpus too small for one window is refused from its size alone (no tokenizer run, no
    weight read): a token covers at least one byte (byte-level BPE; SentencePiece adds at most a prefix), so a
    corpus of fewer bytes than a window has fewer tokens than one. Larger corpora are measured in tokens after
    the load, as before. Raises :class:`UserError`; hub corpora (no size before they are fetched) are skipped."""
    from ..data.corpora import corpus_identity

    needs = [("calibration.source", cfg.calibration.source, cfg.calibration.seqlen + 1),
             *[("eval.corpora", c, cfg.eval.seqlen) for c in cfg.eval.corpora]]
    for key, corpus, tokens in needs:
        size = corpus_identity(corpus).get("size")
        check(size is None or size + 1 >= tokens,
              f"{key}: {corpus} holds {size} bytes, fewer than the {tokens} tokens of one window (a token covers at "
              f"least one byte): use a longer corpus or a smaller model.seqlen")


def check_dtype_device(model_cfg: DictConfig) -> None:
    """``model.device`` present here, and ``model.dtype`` one it computes in: bfloat16 needs a GPU with bf16
    (compute capability 8.0, Ampere, or newer); float16 on the CPU gets a warning (slow, and it overflows where
    bf16 and fp32 do not). Raises :class:`UserError` naming the key."""
    import torch

    from ..models.loading import resolve_device

    if model_cfg.device_map:
        return  # accelerate places it; the dtype is checked on the devices it chooses
    device = resolve_device(model_cfg.device)
    if model_cfg.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"model.dtype=bfloat16, but {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic "
                        "(it needs compute capability 8.0 or newer): use model.dtype=float16 or float32")
    if model_cfg.dtype == "float16" and device.type == "cpu":
        log.warning("model.dtype=float16 on the CPU computes slowly and overflows where bfloat16 and float32 do not "
                    "(the dense evaluation stops at the first non-finite layer): model.dtype=float32 is the CPU's")


@functools.lru_cache(maxsize=2)
def _load_tokenizer(location: str, revision: str | None, remote: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=remote)


def _tokenizer(cfg: DictConfig, what: str):
    """The model's tokenizer (no weight is read; loaded once for all the checks), or None with a warning that
    ``what`` is checked after the load."""
    from ..models.loading import model_location

    try:
        return _load_tokenizer(model_location(cfg.model), cfg.model.revision, bool(cfg.model.trust_remote_code))
    except (OSError, ValueError) as err:
        log.warning("the tokenizer of %s cannot be read before loading (%s): %s is checked then", cfg.model.path, err,
                    what)
        return None


def check_corpus_tokens(cfg: DictConfig) -> None:
    """The calibration samples and evaluation windows cut with the model's tokenizer before any weight is read
    (files and offline corpora: seconds; hub corpora are cut after the load, when they are fetched): a corpus too
    short for them raises :class:`UserError` here. Warns when the calibration windows, drawn from the joined
    corpus, hold more tokens than it has (they overlap: the same text counted several times)."""
    from ..data.calibration_set import calibration_set
    from ..data.corpora import eval_samples, needs_hub

    c = cfg.calibration
    if any(needs_hub(s) for s in [c.source, *cfg.eval.corpora]) or \
            (tok := _tokenizer(cfg, "the corpus token counts")) is None:
        return
    with _quiet("unipruning_cli.data.corpora", "unipruning_cli.data.calibration_set"):  # said once, after the load
        samples, info = calibration_set(cfg, tok)
    drawn, corpus = c.nsamples * c.seqlen, info.get("corpus_tokens")
    if info["sampling"] == "stream" and corpus and drawn > corpus:
        log.warning("calibration: %d windows of %d tokens (%d) are drawn from a corpus of %d tokens: they overlap, each "
                    "token about %.1f times on average; use a larger calibration.source or fewer "
                    "calibration.nsamples", c.nsamples, c.seqlen, drawn, corpus, drawn / corpus)
    for source in cfg.eval.corpora:
        try:
            with _quiet("unipruning_cli.data.corpora"):
                eval_samples(tok, source, cfg.eval.seqlen, cfg.eval.max_windows, cfg.eval.random_windows)
        except UserError as err:
            raise UserError(f"eval.corpora: {err}") from None


@contextlib.contextmanager
def _quiet(*names: str):
    """The loggers ``names`` at ERROR inside the block: what they say here, they say again after the load."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_bos(cfg: DictConfig) -> None:
    """``model.add_bos=true`` with a tokenizer that has no BOS token is refused from the tokenizer alone (no weight
    is read). Raises :class:`UserError`; a tokenizer that cannot be had here is left to the load."""
    from ..models.loading import resolve_add_bos

    if str(cfg.model.add_bos).lower() == "true" and (tok := _tokenizer(cfg, "model.add_bos")) is not None:
        resolve_add_bos(cfg.model, tok)


def check_task_lengths(cfg: DictConfig) -> None:
    """Every lm-eval request (``eval.tasks``, ``eval.task_limit`` documents each) within ``eval.max_length`` (or
    ``eval.seqlen``), counted with the model's tokenizer before any weight is read. Raises :class:`UserError`."""
    from ..evaluation.zeroshot import check_request_lengths

    if cfg.eval.tasks and (tok := _tokenizer(cfg, "the length of the lm-eval requests")) is not None:
        key = "eval.max_length" if cfg.eval.max_length else "eval.seqlen"
        check_request_lengths(tok, cfg.eval.tasks, cfg.eval.task_limit, cfg.eval[key.split(".")[1]], key)


def check_model_limits(cfg: DictConfig) -> None:
    """What the model's architecture (its ``config.json``, built on the ``meta`` device: no weight is read) allows:

    - every window (``calibration.seqlen``, ``eval.seqlen``, lm-eval's ``eval.max_length``) within the model's
      position limit. A model with learned positions (a position table: OPT, GPT-2) cannot run past it at all; a
      RoPE model without RoPE scaling runs past it untrained, so that needs ``model.allow_long_context=true``;
    - every N:M target (``pattern``, ``export.patterns``) against every prunable matrix's input width.

    Raises :class:`UserError` naming the key and what is allowed. An architecture that cannot be read or built
    here (a hub model not cached, an unknown ``model_type``) is left to the load, with a warning."""
    import torch

    from ..pruning.targets import check_targets_fit, make_target, targets_of
    from ..models.loading import prunable_layers
    from .plan.architectures import meta_model

    try:
        model = meta_model(cfg.model, torch.float32)
    except Exception as err:  # noqa: BLE001 - any architecture the meta device cannot build: the load will tell
        log.warning("the architecture of %s cannot be read before loading (%s): its position limit goes unchecked "
                    "and the N:M fit is checked after the load", cfg.model.path, err)
        return
    _check_positions(cfg, model)
    primary = make_target(cfg)
    targets = targets_of(cfg, primary)
    check_targets_fit(prunable_layers(model), targets)
    if any(t.is_channels for t in targets):
        from ..pruning.channels import check_channels_fit

        check_channels_fit(model, prunable_layers(model))
        if cfg.reconstruct == "bias":
            from ..pruning.channels import check_bias_fit

            check_bias_fit(model, prunable_layers(model))
    for t in (t for t in targets if t.is_heads):
        from ..pruning.heads import check_heads_fit, head_counts
        from ..models.layouts import text_config

        kv = head_counts(text_config(model))[1]
        if round(t.sparsity * kv) == 0:
            raise UserError(f"pattern=heads: sparsity={t.sparsity:g} of {kv} KV heads removes none (1 of {kv} is "
                            f"{1 / kv:.2f})")
        check_heads_fit(model, prunable_layers(model), round(t.sparsity * kv))
    for t in (t for t in targets if t.is_experts):
        from ..pruning.experts import check_experts_fit

        # REAP beside another primary score is dropped after the load where the layout cannot give it (the runner)
        check_experts_fit(model, t.sparsity, t.removed, t.score if t == primary else "frequency", t.floor)
    _check_router_loss(cfg, model)


def _check_router_loss(cfg: DictConfig, model) -> None:
    from ..models.loading import text_config

    if method_of(cfg).backpropagates() and cfg.schedule.router_aux_loss:
        if getattr(text_config(model), "router_aux_loss_coef", None) is None:
            raise UserError(f"schedule.router_aux_loss=true, but {cfg.model.path} has no router load-balancing loss "
                            "(no router_aux_loss_coef in its config: not a mixture of experts): leave it false")


def _check_positions(cfg: DictConfig, model) -> None:
    import torch

    from ..models.loading import text_config

    config = text_config(model)
    limit = next((getattr(config, f) for f in POSITION_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if limit is None:
        return
    token_table = model.get_input_embeddings()
    learned = any(isinstance(m, torch.nn.Embedding) and m is not token_table for m in model.modules())
    windows = {"calibration.seqlen": cfg.calibration.seqlen, "eval.seqlen": cfg.eval.seqlen}
    if cfg.eval.tasks and cfg.eval.max_length:
        windows["eval.max_length"] = cfg.eval.max_length
    for key, length in windows.items():
        if length is None or length <= limit:
            continue
        where = f"{key}={length} is longer than the {limit} positions of {cfg.model.path} ({type(config).__name__})"
        if learned:
            raise UserError(f"{where}, whose position table is learned and has no entry past {limit}: set "
                            f"model.seqlen (or {key}) to at most {limit}")
        if _rope_scaled(config):
            continue  # RoPE scaling: the limit in the config is already the scaled one, and the model says it holds
        if not cfg.model.allow_long_context:
            raise UserError(f"{where}, past what its rotary positions were trained for (no RoPE scaling): set "
                            f"model.seqlen (or {key}) to at most {limit}, or model.allow_long_context=true to run "
                            f"it anyway")
        log.warning("%s; running past the trained length (model.allow_long_context=true)", where)


def _rope_scaled(config) -> bool:
    """Whether the config sets a RoPE scaling (``rope_parameters`` in transformers 5, ``rope_scaling`` before; a
    dict per attention type in some models) other than the plain ``default``."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = [rope] if not all(isinstance(v, dict) for v in rope.values()) or not rope else list(rope.values())
    return any(k.get("rope_type", k.get("type", "default")) not in ("default", None) for k in kinds)
