"""The dense model's results, cached: perplexity per corpus and zero-shot, computed once per model, data and protocol.

Cache: ``<cache>/dense/<key>.json``, the key a fingerprint of the model's identity (the files behind
it), its dtype, ``model.add_bos``, the library versions and the protocol (corpus identity, seqlen,
window count, C4's random windows; or tasks, limit, context length, task batch size). A dense result never
changes, so sweeps, benchmarks and later runs read it instead of measuring it again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..data.corpora import corpus_identity, eval_protocol
from ..models.loading import model_identity, resolve_add_bos
from ..core.paths import cache_dir
from ..core.context import RunContext
from ..core.provenance import versions
from ..core.rundir import atomic_write_json, fingerprint
from ..core.errors import UserError
from ..evaluation.perplexity import first_nonfinite_module, perplexity_of, window_nlls
from .evaluation import max_length, zero_shot_of

log = logging.getLogger(__name__)


def _dense_cache_key(cfg: DictConfig, model, what: dict, bos: bool) -> Path:
    key = fingerprint({"model": model_identity(cfg.model), "dtype": str(next(model.parameters()).dtype),
                       "add_bos": bos, "versions": versions(), **what})
    return cache_dir() / "dense" / f"{key}.json"


def _windows_from(cfg: DictConfig, corpus: str) -> dict:
    """The window protocol in the cache key: nothing for the joined-stream protocol (keys made before C4's random
    windows stay valid), else C4's random-window count and seed."""
    proto = eval_protocol(corpus, cfg.eval.random_windows)
    return {} if proto["windows_from"] == "stream" else {"protocol": proto}


def dense_evaluation(ctx: RunContext, windows: dict[str, torch.Tensor]) -> dict:
    """Dense PPL per corpus of ``ctx.model`` (``windows``: corpus -> int64 ``[windows, seqlen]``; each result with
    ``cached``: whether it came from the cache) and dense zero-shot.

    Returns ``{"perplexity": {corpus: Perplexity.to_dict() + cached}, "zero_shot": {...}}``; time spent
    measuring goes to ``ctx.timer``'s ``dense_eval`` stage. Raises :class:`UserError` where the dense model's loss
    is not finite (never cached).
    """
    cfg, model, tok, timer = ctx.cfg, ctx.model, ctx.tok, ctx.timer
    ppl = {}
    bos = resolve_add_bos(cfg.model, tok)
    for corpus, w in windows.items():
        cached = _dense_cache_key(cfg, model, {"corpus": corpus_identity(corpus), "seqlen": cfg.eval.seqlen,
                                               "max_windows": cfg.eval.max_windows,
                                               **_windows_from(cfg, corpus)}, bos)
        if cached.exists():
            ppl[corpus] = {**json.loads(cached.read_text()), "cached": True}
            log.info("dense perplexity on %s from cache: %.3f", corpus, ppl[corpus]["ppl"])
            continue
        with timer.stage("dense_eval"):
            nlls = window_nlls(model, w, cfg.eval.batch_size, f"dense ppl {corpus}")
            res = perplexity_of(nlls, w).to_dict()
        if not math.isfinite(res["mean_nll"]):
            _raise_nonfinite(model, w, nlls, corpus, res["ppl"])  # never cached
        atomic_write_json(cached, res)
        ppl[corpus] = {**res, "cached": False}
    zs = {}
    if cfg.eval.tasks:
        # the batch size is part of the protocol: padding and batched kernels move accuracy with it (lm-eval#1645)
        cached = _dense_cache_key(cfg, model, {"tasks": list(cfg.eval.tasks), "limit": cfg.eval.task_limit,
                                               "max_length": max_length(cfg),
                                               "task_batch_size": cfg.eval.task_batch_size}, bos)
        if cached.exists():
            zs = json.loads(cached.read_text())
        else:
            with timer.stage("dense_eval"):
                zs = zero_shot_of(cfg, model, tok)
            atomic_write_json(cached, zs)
    return {"perplexity": ppl, "zero_shot": zs}


def _raise_nonfinite(model, windows: torch.Tensor, nlls: torch.Tensor, corpus: str, ppl: float) -> None:
    """Stop the run where the dense model's numbers stop being numbers: the first window whose loss (``nlls``, per
    window) is not finite, the first module whose output is not there, and a dtype that holds it. Raises
    :class:`UserError`."""
    bad = int((~torch.isfinite(nlls)).nonzero()[0, 0])
    where = first_nonfinite_module(model, windows[bad:bad + 1])
    dtype = next(model.parameters()).dtype
    fix = ("model.dtype=bfloat16 (same range as float32) or model.dtype=float32" if dtype == torch.float16
           else "model.dtype=float32" if dtype != torch.float32 else "a finite model: its weights hold NaN or inf")
    raise UserError(f"the dense model's perplexity on {corpus} is {ppl} (not finite) in {str(dtype).removeprefix('torch.')}: "
                    f"window {bad} is the first with a non-finite loss, and {where or 'the loss itself'} the first "
                    f"module whose output is non-finite there; try {fix}. Nothing was cached.")
