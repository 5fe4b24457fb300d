"""A run's calibration set: its windows from the configured corpus, and the dense model's statistics on them, cached.

Windows: ``calibration.nsamples`` random windows of ``calibration.seqlen`` tokens (seed ``seed``) from
``calibration.source`` (:func:`data.calibration_windows`). Dense statistics: one one-shot pass of
:func:`calibration.calibrate_blockwise` with per-sample statistics kept (UniPruning's frozen search
needs them), cached under ``<cache>/calibration/<key>.safetensors``; the key covers the model's files,
the corpus's identity, the dtype, the calibration config, the seed and the library versions, and
nothing else (not the metric, sparsity or pattern), so every run on the same model and data shares it.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from .calibration import calibrate_blockwise, stats_from_tensors, stats_to_tensors
from .config import plain
from .data import calibration_windows, corpus_identity, token_stream
from .models import model_identity
from .paths import cache_dir
from .provenance import versions
from .rundir import atomic_save_tensors, fingerprint, load_tensors
from .stats import ActivationStats

log = logging.getLogger(__name__)


def calibration_set(cfg: DictConfig, tok) -> tuple[torch.Tensor, dict]:
    """The calibration windows of this config (``int64 [nsamples, seqlen]``) and what to record about them
    (source, counts, mode, seed, tokens used and the corpus's token count).

    Raises :class:`UserError` (from :mod:`.data`) for a corpus shorter than one window."""
    c = cfg.calibration
    stream = token_stream(tok, c.source, "calibration")
    windows = calibration_windows(stream, c.nsamples, c.seqlen, cfg.seed)
    log.info("calibration: %d windows x %d tokens = %d tokens from %s (%s)", c.nsamples, c.seqlen,
             windows.numel(), c.source, c.mode)
    return windows, {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "mode": c.mode,
                     "seed": cfg.seed, "tokens": int(windows.numel()), "corpus_tokens": int(stream.numel())}


def dense_statistics(cfg: DictConfig, model, windows: torch.Tensor) -> tuple[dict[str, ActivationStats], bool]:
    """One-shot statistics of the dense model per prunable matrix, shared by every run on the same model and data.

    Returns (statistics, whether they came from the cache). Per-sample statistics are included.
    """
    key = fingerprint({"model": model_identity(cfg.model), "corpus": corpus_identity(cfg.calibration.source),
                       "dtype": str(next(model.parameters()).dtype),
                       "calibration": plain(cfg.calibration),
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
