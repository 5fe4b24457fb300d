"""The dense model's results, cached: perplexity per corpus and zero-shot, computed once per model, data and protocol.

Cache: ``<cache>/dense/<key>.json``, the key a fingerprint of the model's identity (the files behind
it), its dtype, ``model.add_bos``, the library versions and the protocol (corpus identity, seqlen,
window count, C4's random windows; or tasks, limit, context length). A dense result never changes, so sweeps, benchmarks
and later runs read it instead of measuring it again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..data import corpus_identity, eval_protocol
from ..models import model_identity
from ..paths import cache_dir
from ..progress import Timer
from ..provenance import versions
from ..rundir import atomic_write_json, fingerprint
from .perplexity import perplexity
from .protocol import max_length, zero_shot_of

log = logging.getLogger(__name__)


def _dense_cache_key(cfg: DictConfig, model, what: dict) -> Path:
    key = fingerprint({"model": model_identity(cfg.model), "dtype": str(next(model.parameters()).dtype),
                       "add_bos": cfg.model.add_bos, "versions": versions(), **what})
    return cache_dir() / "dense" / f"{key}.json"


def _windows_from(cfg: DictConfig, corpus: str) -> dict:
    """The window protocol in the cache key: nothing for the joined-stream protocol (keys made before C4's random
    windows stay valid), else C4's random-window count and seed."""
    proto = eval_protocol(corpus, cfg.eval.get("random_windows", 256))
    return {} if proto["windows_from"] == "stream" else {"protocol": proto}


def dense_evaluation(cfg: DictConfig, model, tok, windows: dict[str, torch.Tensor], timer: Timer) -> dict:
    """Dense PPL per corpus (each with ``cached``: whether it came from the cache) and dense zero-shot.

    Returns ``{"perplexity": {corpus: Perplexity.to_dict() + cached}, "zero_shot": {...}}``; time spent
    measuring goes to ``timer``'s ``dense_eval`` stage.
    """
    ppl = {}
    for corpus, w in windows.items():
        cached = _dense_cache_key(cfg, model, {"corpus": corpus_identity(corpus), "seqlen": cfg.eval.seqlen,
                                               "max_windows": cfg.eval.max_windows,
                                               **_windows_from(cfg, corpus)})
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
                                               "max_length": max_length(cfg)})
        if cached.exists():
            zs = json.loads(cached.read_text())
        else:
            with timer.stage("dense_eval"):
                zs = zero_shot_of(cfg, model, tok)
            atomic_write_json(cached, zs)
    return {"perplexity": ppl, "zero_shot": zs}
