"""What a run read, by content: the model's files, its tokenizer's files and the corpora, and the check that a later
command (``eval``, ``export``, ``apply``) reads the same.

A run records :func:`run_inputs` in ``metrics.json["inputs"]`` and, through :func:`recording`, in the header of every
masks file it writes (``info["inputs"]``). Each file is named with its size in bytes and the SHA-256 of its content.
Hashing reads each file once (sha256 streams at about 1-2 GB/s on one core, so a 15 GB 7B folder costs seconds,
several files in parallel); the digest is memoised in ``<cache>/digests.json`` under the file's path, size, mtime and
inode, so an unchanged file is never read twice, and a file replaced by another of the same size (a new mtime or
inode) is hashed again. Files of the HF hub cache are symlinks to blobs named by their hash: that name is used as is.

:func:`compare_inputs` says what changed between two records; :func:`check_same_inputs` turns a change into a
:class:`UserError` before any weight is read (locuslab/wanda#56: a "pruned" model that evaluates like the original).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .paths import cache_dir

log = logging.getLogger(__name__)

#: Files of a model folder that decide the weights and the architecture.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".py")
MODEL_NAMES = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Files of a model folder that decide the tokenizer.
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "spiece.model", "sentencepiece.bpe.model")
_HASH_NAME = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20

_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unipruning_inputs", default=None)


def _digest_cache() -> Path:
    return cache_dir() / "digests.json"


def _load_memo() -> dict:
    try:
        return json.loads(_digest_cache().read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict) -> None:
    from .rundir import atomic_write_json

    try:
        atomic_write_json(_digest_cache(), memo)
    except OSError as err:  # a read-only cache costs a re-hash next time, nothing else
        log.debug("digest cache not written (%s)", err)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: list[Path]) -> dict[str, dict]:
    """``{str(path): {"bytes": size, "sha256": hex}}`` for each file of ``paths`` (resolved through symlinks).

    A symlink into a hub cache's ``blobs/`` folder whose target is named by a 64-hex SHA-256 takes that name (the
    hub computed it from the content). Other digests are memoised by (path, size, mtime_ns, inode). Raises
    :class:`UserError` naming a file that cannot be read."""
    memo = _load_memo()
    out: dict[str, dict] = {}
    todo: list[tuple[str, Path, list]] = []
    for p in paths:
        real = Path(p).resolve()
        try:
            st = real.stat()
        except OSError as err:
            raise UserError(f"{p}: cannot be read ({err.strerror})") from None
        if real.parent.name == "blobs" and _HASH_NAME.match(real.name):
            out[str(p)] = {"bytes": st.st_size, "sha256": real.name}
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = memo.get(str(real))
        if hit and hit[:3] == key:
            out[str(p)] = {"bytes": st.st_size, "sha256": hit[3]}
        else:
            todo.append((str(p), real, key))
    if todo:
        # hashlib releases the GIL on large buffers: the shards of a large model hash side by side
        with ThreadPoolExecutor(max_workers=min(8, len(todo), os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda t: _sha256(t[1]), todo))
        for (name, real, key), digest in zip(todo, digests):
            memo[str(real)] = [*key, digest]
            out[name] = {"bytes": key[0], "sha256": digest}
        _save_memo(memo)
    return out


def _folder_files(folder: Path, names: tuple[str, ...], suffixes: tuple[str, ...] = ()) -> dict[str, dict]:
    found = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                   and (f.name in names or (suffixes and f.suffix in suffixes)))
    digests = file_digests(found)
    return {f.name: digests[str(f)] for f in found}


def model_folder(model_cfg) -> Path | None:
    """The folder ``from_pretrained`` reads for ``model_cfg`` (a local, embedded or converted GGUF folder, or the
    hub cache's snapshot of ``model.path`` at ``model.revision``); None for a hub model not in the local cache."""
    from ..models.loading import model_location

    location = Path(model_location(model_cfg))
    if model_cfg.source != "hub":
        return location if location.is_dir() else None
    try:  # the snapshot folder of that revision, as far as it is downloaded (a commit's folder holds its files)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_cfg.path, "config.json", revision=model_cfg.get("revision"))
    except Exception:  # noqa: BLE001 - not cached (yet): nothing to hash
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_inputs(model_cfg) -> dict:
    """The identity of a model: ``{"location", "revision", "model": {file: {bytes, sha256}}, "tokenizer": {...}}``
    (weights, configs and remote code under ``model``; the tokenizer's files under ``tokenizer``). ``model`` and
    ``tokenizer`` are None where the folder cannot be found (a hub model not cached); a hub model's record also holds
    the ``commit`` of its snapshot and only the files downloaded so far (complete after the load)."""
    from ..models.loading import model_location

    folder = model_folder(model_cfg)
    out = {"location": model_location(model_cfg), "revision": model_cfg.get("revision"), "model": None,
           "tokenizer": None}
    if folder is not None and model_cfg.source == "hub":
        out["commit"] = folder.name  # the hub cache names a snapshot by its commit
    if folder is not None:
        out["model"] = _folder_files(folder, MODEL_NAMES, MODEL_SUFFIXES)
        out["tokenizer"] = _folder_files(folder, TOKENIZER_NAMES)
    return out


def corpus_inputs(source: str) -> dict:
    """The identity of a corpus: a file's (or an offline corpus's cache file's) path, bytes and SHA-256; a hub corpus
    by its name only (``datasets`` keeps its own revision)."""
    from ..data.corpora import CORPORA, corpus_identity

    if "path" in (ident := corpus_identity(source)):
        path = Path(ident["path"])
        return {"path": str(path), **file_digests([path])[str(path)]}
    corpus = CORPORA.get(source)
    if corpus.cache_file:
        from ..data.assets import offline_file

        path = offline_file(corpus.cache_file)
        return {"name": source, **file_digests([path])[str(path)]}
    return {"name": source}


def run_inputs(cfg) -> dict:
    """Everything a prune run reads, by content (``metrics.json["inputs"]``): the model and tokenizer
    (:func:`model_inputs`) and the calibration and evaluation corpora (:func:`corpus_inputs`)."""
    return {**model_inputs(cfg.model), "corpora": {
        "calibration": corpus_inputs(cfg.calibration.source),
        "eval": {c: corpus_inputs(c) for c in cfg.eval.corpora}}}


def _files(record: dict, part: str) -> dict[str, dict] | None:
    """The ``{name: {bytes, sha256}}`` of one part of a record: ``model``, ``tokenizer``, or ``corpora`` (the
    calibration corpus and each evaluation corpus that has a content hash; hub corpora have none)."""
    if part != "corpora":
        return record.get(part)
    corpora = record.get("corpora")
    if corpora is None:
        return None
    named = {"calibration": corpora.get("calibration"), **{f"eval {k}": v for k, v in (corpora.get("eval") or {}).items()}}
    return {k: v for k, v in named.items() if v and "sha256" in v}


def compare_inputs(recorded: dict, current: dict, parts: tuple[str, ...] = ("model", "tokenizer")) -> list[str]:
    """What differs between two records (:func:`model_inputs`, :func:`run_inputs`), one line per file of ``parts``
    (``model``, ``tokenizer``, ``corpora``): changed content, added, removed. [] when the same (or when either side
    could not be read: nothing to compare)."""
    changes = []
    for part in parts:
        old, new = _files(recorded, part), _files(current, part)
        if old is None or new is None:
            continue
        for name in sorted(set(old) | set(new)):
            if name not in new:
                changes.append(f"{part} file {name} is gone")
            elif name not in old:
                changes.append(f"{part} file {name} is new")
            elif old[name]["sha256"] != new[name]["sha256"]:
                changes.append(f"{part} file {name} changed (sha256 {old[name]['sha256'][:12]}.. -> "
                               f"{new[name]['sha256'][:12]}.., {old[name]['bytes']:,} -> {new[name]['bytes']:,} bytes)")
    return changes


def check_same_inputs(recorded: dict | None, model_cfg, what: str, allow_changed: bool, loaded: bool) -> list[str]:
    """Compare the model and tokenizer ``recorded`` by a run (or a masks file) with those ``model_cfg`` points at now.
    Call it twice, before the load (``loaded=False``) and after it (``loaded=True``): a model on disk is compared
    before any weight is read, a hub model after the load, when its snapshot holds every file the load needed (before
    it, the cache may hold none or some of them); the other call returns []. Either way before any mask is applied.

    Raises :class:`UserError` listing the changes unless ``allow_changed`` (``--allow-changed-model``), which warns
    and returns them for the caller to record. A record made before runs recorded their inputs is warned about (once,
    before the load) and passes."""
    if (model_cfg.source == "hub") != loaded:
        return []
    if not recorded or not (recorded.get("model") or recorded.get("tokenizer")):
        log.warning("%s records no content hashes of its model (made before unipruning recorded them, or a hub model "
                    "not in the cache): that the model at %s is the one it pruned cannot be checked", what,
                    recorded.get("location") if recorded else "?")
        return []
    current = model_inputs(model_cfg)
    changes = compare_inputs(recorded, current)
    if not changes:
        return []
    listed = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    if not allow_changed:
        raise UserError(f"the model at {current['location']} is not the one {what} pruned: {listed}. Its masks on "
                        "other weights would give another model than the one measured. Put the original files back "
                        "there (or, for `unipruning apply`, give the original with --model), or pass "
                        "--allow-changed-model if you mean to use these weights (recorded in the output)")
    log.warning("--allow-changed-model: the model is not the one %s pruned (%s)", what, listed)
    return changes


@contextlib.contextmanager
def recording(inputs: dict | None) -> Iterator[None]:
    """Inside the block, every masks file written (:func:`..pruning.mask_files.save_packed_masks`) records ``inputs``' model
    and tokenizer in its header (``info["inputs"]``), so ``unipruning apply`` can check the model it is given."""
    token = _RECORDING.set(None if inputs is None else {k: inputs.get(k) for k in
                                                        ("location", "revision", "model", "tokenizer")})
    try:
        yield
    finally:
        _RECORDING.reset(token)


def recorded_now() -> dict | None:
    """The inputs :func:`recording` set for this block, or None."""
    return _RECORDING.get()
