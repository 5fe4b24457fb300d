"""A run's calibration set: its samples from the configured corpus, and the dense model's statistics on them, cached.

Samples: ``calibration.nsamples`` token sequences of at most ``calibration.seqlen`` tokens (seed ``seed``) from
``calibration.source``, drawn as ``calibration.sampling`` says (:func:`data.calibration_samples`: windows inside one
document, truncated documents, or windows of the joined stream). Dense statistics: one one-shot pass of
:func:`calibration.calibrate_blockwise` with per-sample statistics kept (UniPruning's frozen search
needs them), cached under ``<cache>/calibration/<key>.safetensors``; the key covers the model's files,
the corpus's identity, the dtype, the calibration config (sampling included), the seed and the library
versions, and nothing else (not the metric, sparsity or pattern), so every run on the same model and data shares it.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from .calibration import calibrate_blockwise, stats_from_tensors, stats_to_tensors
from ..core.config import plain
from .corpora import calibration_samples, corpus_identity
from ..models.loading import model_identity, resolve_add_bos
from ..core.paths import cache_dir
from ..core.provenance import versions
from ..core.rundir import atomic_save_tensors, fingerprint, load_tensors
from .sampling import TokenSamples, with_bos
from .stats import ActivationStats

log = logging.getLogger(__name__)


def calibration_set(cfg: DictConfig, tok) -> tuple[TokenSamples, dict]:
    """The calibration samples of this config (1-D int64 token tensors, :class:`sampling.TokenSamples`) and what
    to record about them: source, nsamples, seqlen, mode, seed, ``sampling`` (the one used; ``requested`` when
    ``windows`` fell back to the joined stream), ``documents`` drawn from, ``tokens`` (the real count) and, for
    the stream, the corpus's token count.

    Raises :class:`UserError` (from :mod:`.corpora`) for a corpus shorter than one window, or with fewer
    documents than ``calibration.nsamples`` (``sampling=documents``)."""
    c = cfg.calibration
    samples = calibration_samples(tok, c.source, c.sampling, c.nsamples, c.seqlen, cfg.seed)
    bos = resolve_add_bos(cfg.model, tok)
    if bos:  # the model's convention, as in evaluation: BOS replaces each sample's first token (lengths unchanged)
        samples = TokenSamples([with_bos(r, tok.bos_token_id) for r in samples], samples.info)
    samples.info["bos"] = bos
    log.info("calibration: %d samples, %d tokens (at most %d each) from %s, sampling %s (%s)", len(samples),
             samples.numel(), c.seqlen, c.source, samples.info["sampling"], c.mode)
    return samples, {"source": c.source, "nsamples": c.nsamples, "seqlen": c.seqlen, "mode": c.mode,
                     "seed": cfg.seed, **samples.info, "tokens": int(samples.numel())}


#: Raised when the statistics of the same model and data change: 2, routers left out and Linear-list experts pooled;
#: 3, Σx kept (FLAP).
STATISTICS_REVISION = 3


def dense_statistics(cfg: DictConfig, model, windows: TokenSamples) -> tuple[dict[str, ActivationStats], bool]:
    """One-shot statistics of the dense model per prunable matrix, shared by every run on the same model and data.

    Returns (statistics, whether they came from the cache). Per-sample statistics are included. Raises
    :class:`..core.errors.UserError` (:func:`.calibration.calibrate_blockwise`) where an overflow made them non-finite:
    nothing is cached then.
    """
    key = fingerprint({"model": model_identity(cfg.model), "corpus": corpus_identity(cfg.calibration.source),
                       "dtype": str(next(model.parameters()).dtype),
                       "calibration": plain(cfg.calibration), **({"bos": True} if windows.info.get("bos") else {}),
                       "seed": cfg.seed, "versions": versions(), "revision": STATISTICS_REVISION})
    path = cache_dir() / "calibration" / f"{key}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        log.info("calibration statistics from cache %s", path)
        return stats_from_tensors(load_tensors(path), meta), True
    stats = calibrate_blockwise(model, windows, want_per_sample=True, offload=cfg.calibration.offload,
                                min_expert_tokens=cfg.calibration.min_expert_tokens)
    tensors, meta = stats_to_tensors(stats)
    atomic_save_tensors(path, tensors, meta)
    return stats, False
