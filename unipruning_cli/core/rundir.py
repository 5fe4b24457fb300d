"""The run directory: atomic writes, stage completion markers, resume.

Every artifact is written to a temporary sibling and moved into place with ``os.replace``, so a
crash leaves either the old file or the new one, never half of one. A stage is complete only when
its marker ``stages/<stage>.json`` exists and records the same fingerprint (the config values the
stage depends on); a rerun in the same directory skips complete stages and redoes the rest.
"""

from __future__ import annotations

import fcntl
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from .errors import UserError

log = logging.getLogger(__name__)


class RunDirRefused(UserError):
    """A run directory that holds another run (another config, other inputs): nothing may be written into it, not
    even the refused launch's ``error.json``."""


class StorageError(UserError, OSError):
    """A write that the storage refused (read-only, full, no permission), naming the path, what was being written and
    how many bytes it needed; raised from the ``OSError`` it replaces."""


def storage_error(err: OSError, path: Path, what: str, nbytes: int | None = None) -> StorageError:
    """:class:`StorageError` for ``err`` raised while writing ``what`` (``nbytes`` bytes where known) to ``path``:
    with the free space of its file system where the disk is full."""
    import shutil

    from .paths import nearest_existing

    need = f" ({nbytes / 2**20:,.1f} MiB)" if nbytes is not None else ""
    msg = f"cannot write {what}{need} to {path}: {err.strerror or err}"
    if err.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(nearest_existing(path)).free
            msg += f"; {free / 2**20:,.1f} MiB are free there. Free some space or point the run elsewhere"
        except (OSError, StopIteration):
            pass
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg += "; choose a writable folder (hydra.run.dir, --out, or UNIPRUNING_CACHE for the cache)"
    out = StorageError(msg)
    out.errno = err.errno
    return out


def _atomic_write(path: Path, write: "callable[[Path], None]", nbytes: int | None = None) -> None:
    """``write`` a temporary sibling of ``path``, then rename it into place; an ``OSError`` becomes a
    :class:`StorageError` naming ``path`` and the ``nbytes`` it needed (where known), and leaves nothing behind."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, StorageError) and err.errno is not None:
            raise storage_error(err, path, path.name, nbytes) from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    _atomic_write(path, lambda p: p.write_bytes(data), len(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(data, str(p), metadata=dict(metadata or {})),
                  sum(t.numel() * t.element_size() for t in data.values()))


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` atomically: a hard link where possible, else a copy.

    Artifacts are only ever replaced (``os.replace``), never rewritten in place, so two runs can
    share one file through a link without one run's later write reaching the other.
    """
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@contextmanager
def file_locks(paths: Iterable[Path]) -> Iterator[None]:
    """Hold exclusive ``flock`` locks on ``paths`` (created if missing) for the block.

    Taken in sorted order, so two processes wanting overlapping sets cannot deadlock. The kernel
    drops a lock when its process dies, so a crashed job never leaves a stale one behind. Used so
    that parallel sweep jobs wanting the same search wait for one of them instead of all searching.
    """
    with ExitStack() as stack:
        for path in sorted({Path(p) for p in paths}):
            path.parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(path, "a"))
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            stack.callback(fcntl.flock, f.fileno(), fcntl.LOCK_UN)
        yield


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-able value: what a stage's result depends on."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunDir:
    """One run's folder. Knows where each artifact goes and which stages are complete."""

    def __init__(self, path: Path, create: bool = True) -> None:
        """``create=False`` only reads: e.g. checking another run's stages must not recreate a deleted run."""
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def _marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def is_complete(self, stage: str, fp: str) -> bool:
        marker = self._marker(stage)
        if not marker.exists():
            return False
        info = json.loads(marker.read_text())
        return info.get("fingerprint") == fp and all((self.path / a).exists() for a in info.get("artifacts", []))

    def mark_complete(self, stage: str, fp: str, artifacts: list[str], seconds: float, **extra: Any) -> None:
        atomic_write_json(
            self._marker(stage),
            {"stage": stage, "fingerprint": fp, "artifacts": artifacts, "seconds": seconds,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra},
        )

    def stage_info(self, stage: str) -> dict:
        return json.loads(self._marker(stage).read_text())

    def invalidate(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)


# ==============================================================================================
# one run per directory

#: Config keys that change how a run gets its results, not what they are: they may differ when a run resumes (the
#: stage fingerprints leave them out too), and the resumed run's config.yaml then records the new values.
RESUME_NEUTRAL = ("plan_check", "reuse_search", "share_lam_search", "existing_run",
                  # where the work runs and in what pieces: what the plan's advice changes when a run does not fit
                  "model.placement", "model.max_memory", "model.device_map", "calibration.offload", "eval.batch_size",
                  "schedule.checkpoint_every", "schedule.activation_checkpointing", "schedule.search_state",
                  "schedule.fsdp_offload")


def config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that both configs hold and that differs (keys of :data:`RESUME_NEUTRAL`
    aside). A key only one side holds (added or dropped by another unipruning version) is not a difference, nor is a
    bare name on one side against a node of that ``name`` on the other (a group that gained settings: ``method``)."""
    out = []
    for key in sorted(set(old) & set(new), key=str):
        path = f"{prefix}{key}"
        if path in RESUME_NEUTRAL:
            continue
        a, b = old[key], new[key]
        if isinstance(a, str) and isinstance(b, Mapping):
            a = {"name": a}
        elif isinstance(b, str) and isinstance(a, Mapping):
            b = {"name": b}
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, f"{path}.")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def claim_run_dir(path: Path, config: Mapping, existing: str = "refuse") -> Path:
    """The directory a prune run of ``config`` (the resolved config, plain) writes into, given the one asked for.

    ``path`` itself when it holds no run yet (no ``config.yaml``) or a run of the same config (it resumes: finished
    stages are skipped). A run of another config there is refused with a :class:`UserError` naming the differences
    (``existing="refuse"``), or left alone for a fresh ``<path>-1`` (``-2``, ...) beside it (``existing="beside"``;
    one of those holding the same config resumes). One directory, one run: its masks, metrics and card never mix two
    configs (lm-eval#1918)."""
    import yaml

    def differences(folder: Path) -> list[str] | None:
        saved = folder / "config.yaml"
        if not saved.is_file():
            return None
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{saved} is not readable YAML ({err}): the run directory {folder} is damaged; choose "
                            "another hydra.run.dir") from None
        return config_differences(old, config)

    path = Path(path)
    diff = differences(path)
    if not diff:
        return path
    if existing != "beside":
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise RunDirRefused(f"run directory {path} holds a run of another config ({shown}). One directory holds one run: "
                        "choose another hydra.run.dir, rerun with that run's own config to resume it, or pass "
                        "existing_run=beside to start a fresh directory next to it")
    for k in range(1, 1000):
        fresh = path.with_name(f"{path.name}-{k}")
        if not differences(fresh):
            log.warning("run directory %s holds a run of another config: this run goes to %s (existing_run=beside)",
                        path, fresh)
            return fresh
    raise UserError(f"run directory {path}: no free <dir>-k beside it for existing_run=beside")


@contextmanager
def run_lock(path: Path, command: str) -> Iterator[None]:
    """Hold the run directory's lock (``<path>/.lock``, ``flock``) for the block: one process writes a run at a time.

    Taken without waiting: a second process (``unipruning prune``, ``eval`` or ``export`` on the same run) gets a
    :class:`UserError` naming the holder's command and pid. The kernel drops the lock when its process dies, so a
    crashed run never leaves it behind."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        f = open(path / ".lock", "a+")
    except OSError as err:
        raise storage_error(err, path / ".lock", f"the lock of run directory {path} (`unipruning {command}` writes "
                            "into the run)") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunDirRefused(f"run directory {path} is being written by {holder}; wait for it to finish (or stop "
                                "it) before running another command on this run") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("run directory %s: this file system takes no locks (%s); nothing stops a second process from "
                        "writing this run at the same time", path, err.strerror)
        f.seek(0)
        f.truncate()
        f.write(f"`unipruning {command}` (pid {os.getpid()})\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()
