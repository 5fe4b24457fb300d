"""Perplexity by the protocol of the pruning papers (Wanda ``lib/eval.py``, SparseGPT ``llama.py``).

The corpus is tokenised once, cut into non-overlapping windows of ``seqlen`` tokens (remainder
dropped); each window's mean next-token cross-entropy is taken over its seqlen-1 shifted positions,
and PPL = exp(mean over windows). With ``add_bos`` every window starts with the model's BOS token
followed by seqlen-1 corpus tokens, for models that expect it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.loading import input_device
from ..core.progress import track


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    windows: int
    seqlen: int
    tokens: int  # scored (predicted) tokens

    def to_dict(self) -> dict:
        return asdict(self)


#: fp32 logits one chunk may hold (bytes); the loss of a longer batch is taken over chunks of positions.
LOGITS_CHUNK_BYTES = 2**30
#: Model types whose logits are exactly ``lm_head(base_model(x).last_hidden_state)`` (no soft-capping or
#: scaling after the head): the loss may be taken chunk by chunk. Others go through the model's own forward.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "opt", "gpt2",
                        "phi3", "gemma"})


def chunk_positions(batch: int, seqlen: int, vocab: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Positions per chunk so that ``batch x positions x vocab`` fp32 logits fit ``chunk_bytes`` (at least 1;
    ``seqlen`` when the whole batch fits, which keeps the one-pass computation)."""
    return max(1, min(seqlen, chunk_bytes // (4 * batch * vocab)))


def _batch_nll(model: nn.Module, batch: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """Per-position next-token NLL ``[B, T-1]`` (fp32) of one batch, never holding more than one chunk's logits."""
    head = model.get_output_embeddings()
    rows = chunk_positions(batch.shape[0], batch.shape[1], model.config.vocab_size, chunk_bytes)
    if rows >= batch.shape[1] or head is None or model.config.model_type not in PLAIN_HEAD:
        # The last position predicts nothing: slice before the fp32 cast, so bf16 logits are cast once, contiguous.
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="none").view(batch.shape[0], -1)
    hidden = model.base_model(batch, use_cache=False).last_hidden_state
    losses = []
    for start in range(0, batch.shape[1] - 1, rows):
        stop = min(start + rows, batch.shape[1] - 1)  # position t predicts token t + 1
        logits = head(hidden[:, start:stop]).float()
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, start + 1:stop + 1].reshape(-1),
                                      reduction="none").view(batch.shape[0], -1))
        del logits
    return torch.cat(losses, dim=1)


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, label: str = "perplexity",
                chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """Mean next-token NLL of every window (fp32 ``[windows]``), ``windows`` int64 ``[n, seqlen]``.

    The loss is taken over chunks of positions whose fp32 logits fit ``chunk_bytes``, for the model types of
    ``PLAIN_HEAD`` (the full ``batch x seqlen x vocab`` logits would take 12 bytes each with the loss's
    temporaries: 42 GiB for Qwen2.5-7B at batch 4, seqlen 4096); a batch that fits is one pass, as before.
    """
    device = input_device(model)
    nlls = []
    batches = list(torch.split(windows, batch_size))
    for batch in track(batches, label):
        nlls.append(_batch_nll(model, batch.to(device), chunk_bytes).mean(dim=1).cpu())
    return torch.cat(nlls)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, label: str = "perplexity") -> PerplexityResult:
    return perplexity_of(window_nlls(model, windows, batch_size, label), windows)


def perplexity_of(nlls: torch.Tensor, windows: torch.Tensor) -> PerplexityResult:
    """PPL = exp(mean of the windows' mean NLLs), ``nlls`` from :func:`window_nlls` of ``windows``."""
    mean = nlls.double().mean().item()
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean, windows=windows.shape[0], seqlen=windows.shape[1],
                            tokens=windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, batch: torch.Tensor) -> str | None:
    """The name of the first module, in the order the forward pass runs them, whose output holds NaN or inf on
    ``batch`` (int64 ``[B, T]``); a leaf module where one is to blame (e.g. ``model.layers.0.mlp.down_proj``),
    None when every output is finite. One forward pass with a hook on every module."""
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            if not found and torch.is_tensor(out) and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(batch.to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
