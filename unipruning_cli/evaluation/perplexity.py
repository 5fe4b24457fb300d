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

from ..models import input_device
from ..progress import track


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    windows: int
    seqlen: int
    tokens: int  # scored (predicted) tokens

    def to_dict(self) -> dict:
        return asdict(self)


def with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Replace each window's first token by BOS: the window length (and the scored count) stays seqlen."""
    out = windows.clone()
    out[:, 0] = bos_id
    return out


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, label: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of every window (fp32, one value per window)."""
    device = input_device(model)
    nlls = []
    batches = list(torch.split(windows, batch_size))
    for batch in track(batches, label):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        nlls.append(loss.mean(dim=1).cpu())
    return torch.cat(nlls)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, label: str = "perplexity") -> PerplexityResult:
    nlls = window_nlls(model, windows, batch_size, label)
    mean = nlls.double().mean().item()
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean, windows=windows.shape[0], seqlen=windows.shape[1],
                            tokens=windows.shape[0] * (windows.shape[1] - 1))
