"""Token samples drawn document by document: the calibration and evaluation protocols of the papers.

- windows inside one document (Wanda ``lib/data.py`` ``get_c4``, SparseGPT ``datautils.py``): a seeded
  ``random.Random(seed)`` picks a document index until it finds one with more than ``seqlen`` tokens, then a
  random offset in it; ``nsamples`` times. The draws are those loops' draws, so with the same corpus order and
  tokenizer the windows are theirs. GPTQ's C4 evaluation (256 windows, seed 0) draws the same way.
- documents truncated (the UniPruning reference, spec §4.1): ``datasets``' ``train_test_split(test_size=0.95,
  seed)`` order (a PCG64 permutation; the reference takes the first documents of the 5 % part), each document
  tokenised alone and cut at ``seqlen`` tokens, so the samples have different lengths.
- stream windows: the corpus joined and tokenised once, windows at seeded random starts (crossing document
  boundaries); :func:`unipruning_cli.data.corpora.calibration_windows`.

Every consumer reads a :class:`TokenSamples`.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..core.errors import UserError


class TokenSamples(Sequence):
    """A calibration set: 1-D int64 token tensors, each at most ``seqlen`` long (all equal for windows).

    Reads like the ``int64 [n, seqlen]`` tensor it replaces where a consumer indexes rows: ``s[i]`` is sample i
    (1-D), ``len(s)`` and ``s.shape[0]`` the sample count, iteration yields the samples, ``s.numel()`` the real
    token count. ``s.shape[1]`` is the longest sample. ``info`` says how the samples were drawn (JSON values).
    """

    def __init__(self, rows: Sequence[torch.Tensor], info: dict | None = None) -> None:
        self.rows = list(rows)
        self.info = dict(info or {})
        if any(r.dim() != 1 for r in self.rows):
            raise ValueError("TokenSamples rows are 1-D token tensors")

    @classmethod
    def from_tensor(cls, windows: torch.Tensor, info: dict | None = None) -> "TokenSamples":
        """Rows of an ``[n, seqlen]`` tensor (views: a row is bit for bit the tensor's row)."""
        return cls(list(windows), info)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenSamples(self.rows[i], self.info)
        return self.rows[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.rows)

    @property
    def lengths(self) -> list[int]:
        return [int(r.numel()) for r in self.rows]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), max(self.lengths, default=0))

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def numel(self) -> int:
        return sum(self.lengths)

    def as_tensor(self) -> torch.Tensor:
        """``int64 [n, seqlen]``; raises ``ValueError`` for samples of different lengths."""
        if not self.uniform:
            raise ValueError("samples of different lengths do not stack: iterate them")
        return torch.stack(self.rows)


Tokens = Callable[[int], torch.Tensor]  # document index -> its 1-D token ids (tokenised alone, on first use)


def count_long_documents(tokens: Tokens, n_docs: int, seqlen: int, enough: int) -> int:
    """Documents with more than ``seqlen`` tokens, counted in corpus order until ``enough`` are found."""
    found = 0
    for i in range(n_docs):
        found += tokens(i).numel() > seqlen
        if found >= enough:
            break
    return found


def document_windows(tokens: Tokens, n_docs: int, nsamples: int, seqlen: int, seed: int) -> tuple[list[torch.Tensor], int]:
    """``nsamples`` windows of ``seqlen`` tokens, each inside one document, drawn as Wanda's / SparseGPT's C4
    loaders draw them (``random.seed(seed)``; a document of more than ``seqlen`` tokens; an offset in
    ``[0, len - seqlen - 1]``). Returns (the windows, the number of distinct documents they come from).

    The caller must know that at least one document is long enough (:func:`count_long_documents`), else this
    never ends."""
    rng = random.Random(seed)
    rows, used = [], set()
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, n_docs - 1)
            ids = tokens(i)
            if ids.numel() > seqlen:
                break
        j = rng.randint(0, ids.numel() - seqlen - 1)
        rows.append(ids[j:j + seqlen])
        used.add(i)
    return rows, len(used)


def reference_order(n_docs: int, seed: int) -> np.ndarray:
    """Document indices in the order the UniPruning reference takes them: ``train_test_split(test_size=0.95,
    seed=seed)``'s train part (``permutation[n_test:]``, n_test = ceil(0.95 n)), then its test part."""
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_test = math.ceil(0.95 * n_docs)
    return np.concatenate([perm[n_test:], perm[:n_test]])


def truncated_documents(tokens: Tokens, n_docs: int, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """The first ``nsamples`` documents of :func:`reference_order` with at least 2 tokens, each cut at ``seqlen``.

    Raises :class:`UserError` when the corpus has fewer such documents."""
    rows = []
    for i in reference_order(n_docs, seed).tolist():
        ids = tokens(i)
        if ids.numel() >= 2:
            rows.append(ids[:seqlen])
            if len(rows) == nsamples:
                return rows
    raise UserError(f"calibration.sampling=documents needs {nsamples} documents of at least 2 tokens; the corpus "
                    f"has {len(rows)}: lower calibration.nsamples or use calibration.sampling=windows")


def with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Replace each window's first token by BOS (``[n, seqlen]``, or one 1-D sample): the length (and the scored
    count) stays the same."""
    out = windows.clone()
    out[..., 0] = bos_id
    return out
