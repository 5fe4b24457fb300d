"""Text corpora by name, calibration windows and evaluation token streams.

A corpus is a function that returns documents for a role ("calibration" or "eval"). Hub corpora
(``wikitext2``, ``c4``) go through ``datasets.load_dataset`` as the papers do; offline corpora
(``wiki_offline``, ``owt_offline``) read real text that ``unipruning prepare`` put in the cache; any
path to a ``.txt`` (one document) or ``.jsonl`` file (one ``{"text": ...}`` document per line) is a corpus too.

Two ways to tokenise, both memoised per tokenizer: each document on its own, on first use
(:func:`document_tokens`: calibration windows inside one document, truncated documents, C4's random
evaluation windows; see :mod:`.sampling`), or the documents joined with "\\n\\n" and tokenised once
(:func:`token_stream`: WikiText-2's evaluation protocol, which crosses article boundaries by definition,
and the ``stream`` calibration sampling).
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

from ..core.errors import UserError
from ..core.registry import Registry, UnknownNameError
from .sampling import TokenSamples, count_long_documents, document_windows, truncated_documents

log = logging.getLogger(__name__)

Loader = Callable[[str], list[str]]
CORPORA: Registry["Corpus"] = Registry("corpus")


@dataclass(frozen=True)
class Corpus:
    name: str
    load: Loader  # role -> documents
    hub: bool
    cache_file: str | None = None
    # Its perplexity protocol: "stream" (joined, non-overlapping windows: WikiText-2's) or "random" (seeded
    # random windows inside one document each: C4's, GPTQ / SparseGPT datautils.py, 256 windows, seed 0).
    eval_windows: str = "stream"
    # Its documents are paragraphs (median about 150 tokens): calibration windows of 512 tokens come from the
    # joined stream, as docs/methods.md documents for the default run, so that is said as a note, not a warning.
    paragraphs: bool = False


def _register(name: str, hub: bool, cache_file: str | None = None, eval_windows: str = "stream",
              paragraphs: bool = False) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        CORPORA.register(name)(Corpus(name, fn, hub, cache_file, eval_windows=eval_windows, paragraphs=paragraphs))
        return fn

    return deco


@_register("wikitext2", hub=True)
def _wikitext2(role: str) -> list[str]:
    from datasets import load_dataset

    split = "test" if role == "eval" else "train"
    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


@_register("c4", hub=True, eval_windows="random")
def _c4(role: str) -> list[str]:
    from datasets import load_dataset

    files = {"eval": "en/c4-validation.00000-of-00008.json.gz", "calibration": "en/c4-train.00000-of-01024.json.gz"}
    return list(load_dataset("allenai/c4", data_files={"x": files[role]}, split="x")["text"])


_ONE_PER_LINE = 'each line of a .jsonl corpus is one {"text": "..."} object (blank lines are skipped)'


_FILES: dict[tuple, list[str]] = {}


def _read_text_file(path: Path) -> list[str]:
    """The documents of a ``.txt`` (the whole file, one document) or ``.jsonl`` file (the ``"text"`` of each
    non-blank line), line ends read as ``open()`` reads them. Read and checked once per process while the file's
    size and mtime stay the same (the preflight's read serves the run's), handed out as a new list each time.

    Raises :class:`UserError` naming the file and its line (1-based) for bytes that are not UTF-8 (with the
    byte in that line, 1-based), a line that is not JSON, not an object, has no ``"text"`` or a ``"text"``
    that is not a string; and for a file with no text at all (empty, blank lines, or only empty texts), which
    would otherwise fail much later in the tokenizer."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        if len(_FILES) >= _MAX_STREAMS:
            _FILES.pop(next(iter(_FILES)))
        _FILES[key] = _parse_text_file(path)
    return list(_FILES[key])


def _parse_text_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, line_start = raw.count(b"\n", 0, err.start) + 1, raw.rfind(b"\n", 0, err.start) + 1
        raise UserError(f"corpus file {path}, line {line}, byte {err.start - line_start + 1}: not UTF-8; save "
                        f"the file as UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # open()'s universal newlines, as before
    if path.suffix != ".jsonl":
        docs = [text]
    else:
        # Split on "\n" alone: str.splitlines would also cut at U+2028 and the like, which JSON allows in a
        # string, and the line numbers in the messages would no longer be the file's.
        docs = [_jsonl_text(path, no, line) for no, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not any(d.strip() for d in docs):
        raise UserError(f"corpus file {path} holds no text (it is empty, or every line is blank or an empty "
                        f"text): give it some text; {_ONE_PER_LINE}" if path.suffix == ".jsonl" else
                        f"corpus file {path} holds no text: give it some (a .txt file is one document)")
    return docs


def _jsonl_text(path: Path, no: int, line: str) -> str:
    where = f"corpus file {path}, line {no}"
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON ({err.msg} at column {err.colno}); {_ONE_PER_LINE}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: {json.dumps(doc)[:40]} is not a JSON object; {_ONE_PER_LINE}")
    if "text" not in doc:
        keys = ", ".join(map(repr, list(doc)[:5])) or "none"
        raise UserError(f"{where}: no \"text\" field (its keys: {keys}); {_ONE_PER_LINE}")
    if not isinstance(doc["text"], str):
        raise UserError(f"{where}: \"text\" is {json.dumps(doc['text'])[:40]}, not a string; {_ONE_PER_LINE}")
    return doc["text"]


@_register("wiki_offline", hub=False, cache_file="data/wiki_offline.jsonl", paragraphs=True)
def _wiki_offline(role: str) -> list[str]:
    from .assets import offline_file

    return _read_text_file(offline_file("data/wiki_offline.jsonl"))


@_register("owt_offline", hub=False, cache_file="data/owt_offline.jsonl", paragraphs=True)
def _owt_offline(role: str) -> list[str]:
    from .assets import offline_file

    return _read_text_file(offline_file("data/owt_offline.jsonl"))


def _is_path(source: str) -> bool:
    return "/" in source or source.endswith((".txt", ".jsonl"))


def needs_hub(source: str) -> bool:
    """Whether the corpus ``source`` is fetched from the HF hub (not a file, not an offline corpus)."""
    return not _is_path(source) and CORPORA.get(source).hub


def check_corpus_available(source: str) -> None:
    """Fail fast for a corpus that is unknown, missing, or needs a hub that is switched off; a file corpus is
    read here (files are small), so a malformed one is refused before any weight is read. Raises
    :class:`UserError` (for a file, naming its line: :func:`_read_text_file`)."""
    if _is_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"corpus file {source!r} does not exist")
        if path.suffix not in (".txt", ".jsonl"):
            raise UserError(f"corpus file {source!r}: only .txt and .jsonl (one {{\"text\": ...}} per line) are read")
        _read_text_file(path)
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


def check_calibration_documents(source: str, sampling: str, nsamples: int) -> None:
    """``calibration.sampling=documents`` on a file or offline corpus (read in a moment, unlike a hub one): fail
    before any weight is read when it has fewer than ``nsamples`` non-empty documents (a ``.txt`` is one)."""
    if sampling != "documents" or (not _is_path(source) and CORPORA.get(source).hub):
        return
    have = sum(bool(t.strip()) for t in load_documents(source, "calibration"))
    if have < nsamples:
        raise UserError(f"calibration.sampling=documents needs {nsamples} documents; {source} has {have} (a .txt "
                        f"file is one document, a .jsonl one per line): lower calibration.nsamples or use "
                        f"calibration.sampling=windows")


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


class DocumentTokens:
    """A corpus's documents, each tokenised alone on first use (``add_special_tokens=True``, as Wanda's and
    SparseGPT's loaders call the tokenizer: BOS per document where the tokenizer adds one). ``docs(i)`` is
    document i's 1-D int64 ids (shared: do not modify them)."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts = tokenizer, texts
        self._ids: dict[int, torch.Tensor] = {}
        self.said: set[tuple] = set()  # the fallbacks already logged for these documents (:func:`_long_enough`)

    def __len__(self) -> int:
        return len(self.texts)

    def __call__(self, i: int) -> torch.Tensor:
        ids = self._ids.get(i)
        if ids is None:
            ids = self._ids[i] = self.tokenizer(self.texts[i], return_tensors="pt", add_special_tokens=True).input_ids[0]
        return ids


_DOCS: dict[tuple, tuple[weakref.ref, DocumentTokens]] = {}


def document_tokens(tokenizer, source: str, role: str) -> DocumentTokens:
    """The corpus's documents for ``role``, tokenised one by one as they are read; memoised like :func:`token_stream`."""
    key = (id(tokenizer), source, role, json.dumps(corpus_identity(source), sort_keys=True))
    hit = _DOCS.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    docs = DocumentTokens(tokenizer, load_documents(source, role))
    if len(_DOCS) >= _MAX_STREAMS:
        _DOCS.pop(next(iter(_DOCS)))
    _DOCS[key] = (weakref.ref(tokenizer), docs)
    return docs


def _long_enough(docs: DocumentTokens, source: str, need: int, seqlen: int, what: str) -> bool:
    """Whether at least ``need`` documents are longer than ``seqlen`` (calibration asks one per window, else its
    windows would repeat a few documents); if not, the caller uses the joined stream, and that is said once per
    ``docs`` (per tokenizer and corpus: a run's search, baselines and cuts each draw the same samples): a
    warning, or a note for an offline corpus of paragraphs (``Corpus.paragraphs``), where docs/methods.md documents
    it. Nothing is marked said while the logger is silenced (the preflight's first pass)."""
    long = count_long_documents(docs, len(docs), seqlen, need)
    paragraphs = not _is_path(source) and CORPORA.get(source).paragraphs
    level = logging.INFO if paragraphs else logging.WARNING
    said = (what, need, seqlen)
    if long < need and said not in docs.said and log.isEnabledFor(level):
        docs.said.add(said)
        why = f"{need} needed" + ("; its documents are paragraphs: README, calibration.sampling" if paragraphs else "")
        log.log(level, "%s: only %d document(s) of %s have more than %d tokens (%s); the windows are drawn from "
                "the documents joined with blank lines instead (they cross document boundaries)",
                what, long, source, seqlen, why)
    return long >= need


def calibration_samples(tokenizer, source: str, sampling: str, nsamples: int, seqlen: int, seed: int) -> TokenSamples:
    """The calibration set of ``calibration.sampling`` (:mod:`.sampling`): ``windows`` (inside one document
    each, Wanda / SparseGPT; the joined stream, said once (:func:`_long_enough`), where fewer than ``nsamples``
    documents are longer than ``seqlen``), ``documents`` (truncated at ``seqlen``, the UniPruning reference) or
    ``stream``. ``info`` holds ``sampling`` (the one used), ``requested`` when it differs, and ``documents`` drawn from.

    Raises :class:`UserError` for a corpus shorter than one window, or with fewer than ``nsamples`` documents
    (``documents``)."""
    docs = document_tokens(tokenizer, source, "calibration") if sampling != "stream" else None
    if sampling == "documents":
        rows = truncated_documents(docs, len(docs), nsamples, seqlen, seed)
        return TokenSamples([r.clone() for r in rows], {"sampling": "documents", "documents": len(rows)})
    if sampling == "windows" and _long_enough(docs, source, nsamples, seqlen, "calibration.sampling=windows"):
        rows, used = document_windows(docs, len(docs), nsamples, seqlen, seed)
        return TokenSamples([r.clone() for r in rows], {"sampling": "windows", "documents": used})
    info = {"sampling": "stream"} if sampling == "stream" else {"sampling": "stream", "requested": sampling}
    stream = token_stream(tokenizer, source, "calibration")
    return TokenSamples.from_tensor(calibration_windows(stream, nsamples, seqlen, seed),
                                    {**info, "corpus_tokens": int(stream.numel())})


#: C4's customary perplexity protocol: 256 random windows (GPTQ / SparseGPT ``datautils.py``), seed 0.
RANDOM_EVAL_SEED = 0


def eval_protocol(source: str, random_windows: int | None) -> dict:
    """How :func:`eval_samples` cuts ``source``: ``{"windows_from": "stream"}`` or ``{"windows_from": "random",
    "random_windows": n, "seed": 0}`` (part of the dense perplexity cache key)."""
    random_ = not _is_path(source) and CORPORA.get(source).eval_windows == "random" and random_windows is not None
    return {"windows_from": "random", "random_windows": random_windows, "seed": RANDOM_EVAL_SEED} if random_ \
        else {"windows_from": "stream"}


def eval_samples(tokenizer, source: str, seqlen: int, max_windows: int | None, random_windows: int | None) -> torch.Tensor:
    """Evaluation windows ``int64 [n, seqlen]`` by the corpus's protocol: the first non-overlapping windows of the
    joined corpus (WikiText-2, offline corpora, files), or for C4 ``random_windows`` random windows inside one
    document each (seed 0; ``None``: every window of the joined shard); ``max_windows`` caps both (the first of
    the random draws). Raises :class:`UserError` for a corpus shorter than one window."""
    if eval_protocol(source, random_windows)["windows_from"] == "random":
        n = random_windows if max_windows is None else min(random_windows, max_windows)
        docs = document_tokens(tokenizer, source, "eval")
        if _long_enough(docs, source, 1, seqlen, f"evaluation windows of {source}"):  # drawn with replacement
            rows, _ = document_windows(docs, len(docs), n, seqlen, RANDOM_EVAL_SEED)
            return torch.stack(rows)
    return eval_windows(token_stream(tokenizer, source, "eval"), seqlen, max_windows)


def calibration_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens of the joined corpus at seeded random starts (``int64 [n, seqlen]``;
    they may cross document boundaries): ``calibration.sampling=stream``, and ``windows``' fallback."""
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
