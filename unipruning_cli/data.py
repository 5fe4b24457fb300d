"""Text corpora by name, calibration windows and evaluation token streams.

A corpus is a function that returns documents for a role ("calibration" or "eval"). Hub corpora
(``wikitext2``, ``c4``) go through ``datasets.load_dataset`` as the papers do; offline corpora
(``wiki_offline``, ``owt_offline``) read real text that ``unipruning prepare`` put in the cache; any
path to a ``.txt`` or ``.jsonl`` file (one ``{"text": ...}`` per line) is a corpus too. After that,
every source follows one code path: documents joined with "\\n\\n" and tokenised once.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .registry import Registry, UnknownNameError

log = logging.getLogger(__name__)

Loader = Callable[[str], list[str]]
CORPORA: Registry["Corpus"] = Registry("corpus")


@dataclass(frozen=True)
class Corpus:
    name: str
    load: Loader  # role -> documents
    hub: bool
    cache_file: str | None = None


def _register(name: str, hub: bool, cache_file: str | None = None) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        CORPORA.register(name)(Corpus(name, fn, hub, cache_file))
        return fn

    return deco


@_register("wikitext2", hub=True)
def _wikitext2(role: str) -> list[str]:
    from datasets import load_dataset

    split = "test" if role == "eval" else "train"
    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


@_register("c4", hub=True)
def _c4(role: str) -> list[str]:
    from datasets import load_dataset

    files = {"eval": "en/c4-validation.00000-of-00008.json.gz", "calibration": "en/c4-train.00000-of-01024.json.gz"}
    return list(load_dataset("allenai/c4", data_files={"x": files[role]}, split="x")["text"])


def _read_text_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [path.read_text(encoding="utf-8")]


@_register("wiki_offline", hub=False, cache_file="data/wiki_offline.jsonl")
def _wiki_offline(role: str) -> list[str]:
    from .assets import offline_file

    return _read_text_file(offline_file("data/wiki_offline.jsonl"))


@_register("owt_offline", hub=False, cache_file="data/owt_offline.jsonl")
def _owt_offline(role: str) -> list[str]:
    from .assets import offline_file

    return _read_text_file(offline_file("data/owt_offline.jsonl"))


def _is_path(source: str) -> bool:
    return "/" in source or source.endswith((".txt", ".jsonl"))


def check_corpus_available(source: str) -> None:
    """Fail fast for a corpus that is unknown, missing, or needs a hub that is switched off."""
    if _is_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"corpus file {source!r} does not exist")
        if path.suffix not in (".txt", ".jsonl"):
            raise UserError(f"corpus file {source!r}: only .txt and .jsonl (one {{\"text\": ...}} per line) are read")
        return
    try:
        corpus = CORPORA.get(source)
    except UnknownNameError as err:
        raise UserError(f"{err} (or give a path to a .txt / .jsonl file)") from None
    if corpus.hub and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(
            f"corpus {source!r} comes from the HF hub, but HF_DATASETS_OFFLINE=1; use an offline corpus "
            f"({', '.join(n for n in CORPORA if not CORPORA.get(n).hub)}) or a file path"
        )
    if corpus.cache_file:
        from .assets import offline_file

        offline_file(corpus.cache_file)


def corpus_identity(source: str) -> dict:
    """What a cached result computed from this corpus depends on: a file's size and mtime too."""
    if _is_path(source):
        st = Path(source).expanduser().stat()
        return {"path": str(Path(source).expanduser().resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    corpus = CORPORA.get(source)
    if corpus.cache_file:
        from .assets import offline_file

        st = offline_file(corpus.cache_file).stat()
        return {"name": source, "size": st.st_size}
    return {"name": source}


def load_documents(source: str, role: str) -> list[str]:
    if _is_path(source):
        return _read_text_file(Path(source).expanduser())
    return CORPORA.get(source).load(role)


_STREAMS: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
_MAX_STREAMS = 8


def token_stream(tokenizer, source: str, role: str) -> torch.Tensor:
    """The corpus as one 1-D token tensor: documents joined by a blank line, tokenised once.

    Memoised per tokenizer object for this process: the jobs of a sweep share one tokenizer (see
    ``models.load_model_reused``), so each corpus is read and tokenised once per sweep, not per job.
    A file corpus's size and mtime are in the key, so an edited file is read again. Callers get a
    copy, so a change to it cannot reach the next job.
    """
    key = (id(tokenizer), source, role, json.dumps(corpus_identity(source), sort_keys=True))
    hit = _STREAMS.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1].clone()
    text = "\n\n".join(load_documents(source, role))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    log.info("%s (%s): %d characters -> %d tokens", source, role, len(text), ids.numel())
    if len(_STREAMS) >= _MAX_STREAMS:
        _STREAMS.pop(next(iter(_STREAMS)))
    _STREAMS[key] = (weakref.ref(tokenizer), ids)
    return ids.clone()


def calibration_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, as Wanda/SparseGPT draw them, seeded."""
    if stream.numel() <= seqlen:
        raise UserError(f"calibration corpus has {stream.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start; the remainder is dropped."""
    n = stream.numel() // seqlen
    if n == 0:
        raise UserError(f"evaluation corpus has {stream.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].view(n, seqlen)
