"""Shipping a pruned model: ``unipruning export`` (a run -> an HF folder) and ``unipruning apply`` (masks -> a folder).

A run directory stores masks, not weights (see README, "The run directory"): the pruned model is the
original model times a mask, so exporting means loading the original model again, applying the masks of
the asked cut and saving an ordinary Hugging Face folder (``save_pretrained``, safetensors) with the
tokenizer and a model card. A UniPruning run keeps its saliency Γ (``gamma.safetensors``), so any sparsity
or N:M pattern can be cut from it at export time, without a forward pass; the new masks are saved into the
run's ``masks/`` folder too. Runs of the other score-based methods can export only the cuts they hold.
SparseGPT reconstructs the kept weights in memory and the run does not store them, so its runs are refused.

Everything that can be checked without a model is checked first (run directory complete, cut available,
output folder free), so a bad request fails in about two seconds. The output folder is written to a
temporary sibling and renamed into place; an existing folder is replaced only with ``--force``.

N:M models can also be stored compressed (``--compressed``): per prunable layer the N kept values of every
group of M inputs, ``[out, in*N/M]`` in the weight dtype, and their in-group positions bit-packed
(``ceil(log2 M)`` bits each: 2 for 2:4, 3 for 4:8), next to the dense non-prunable tensors. At 2:4 the
prunable tensors take 0.5 + 1/16 = 0.5625 of their dense fp16/bf16 bytes (0.53 in fp32); the file as a
whole is larger than that fraction of the dense file by the share of embeddings, norms and ``lm_head``.
:func:`load_compressed` rebuilds the dense model exactly (pruned zeros come back as +0.0).

Unstructured zeros stored dense give no speed-up. 2:4 can run on the sparse tensor cores of NVIDIA Ampere
and newer GPUs through ``torch.sparse.to_sparse_semi_structured``: :func:`to_semi_structured` converts a
model's 2:4 layers, and ``scripts/bench_semi_structured.py`` times it against the dense model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from .errors import UserError
from .methods import Target

log = logging.getLogger(__name__)

__all__ = [
    "COMPRESSED_FILE",
    "RunInfo",
    "apply_command",
    "apply_masks_file",
    "check_mask_shapes",
    "compress_nm",
    "decompress_nm",
    "export_command",
    "export_run",
    "held_tags",
    "is_nm_sparse",
    "load_compressed",
    "open_run",
    "pack_indices",
    "resolve_target",
    "speed_note",
    "staging_folder",
    "to_semi_structured",
    "unpack_indices",
    "write_compressed",
]

COMPRESSED_FILE = "compressed.safetensors"
COMPRESSED_FORMAT = "unipruning-nm-v1"
EXPORT_KEYS = ("sparsity", "pattern", "allocation", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALLOCATIONS = ("per_row", "per_matrix", "global")
_NM_TAG = re.compile(r"^(\d+)of(\d+)$")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


# ==============================================================================================
# the run directory


@dataclass
class RunInfo:
    """A finished run: its folder, resolved config and metrics."""

    path: Path
    cfg: Any  # DictConfig
    metrics: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.cfg.method)

    @property
    def gamma_path(self) -> Path:
        return self.path / "gamma.safetensors"

    def mask_path(self, tag: str) -> Path:
        return self.path / "masks" / f"{tag}.safetensors"


def _stage_of(method: str) -> str:
    return "search" if method == "unipruning" else "prune"


def open_run(path: str | Path) -> RunInfo:
    """Check that ``path`` is a complete run directory and read it; :class:`UserError` otherwise.

    Complete means ``config.yaml``, ``metrics.json`` (written last by a run) and the completion marker
    of the method's stage (``stages/search.json`` for UniPruning, ``stages/prune.json`` otherwise).
    """
    from omegaconf import OmegaConf

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"run directory {path} does not exist")
    if not p.is_dir():
        raise UserError(f"{path} is not a run directory (a folder with config.yaml, metrics.json, stages/, masks/)")
    cfg = None
    if (p / "config.yaml").is_file():
        try:
            cfg = OmegaConf.load(p / "config.yaml")
            str(cfg.method), cfg.model.path  # noqa: B018  (the keys an export needs)
        except Exception as err:  # noqa: BLE001  (any parse error means the same to the user)
            raise UserError(f"{p / 'config.yaml'} is not a unipruning run config: {err}") from None
    if cfg is not None and cfg.method == "sparsegpt":
        raise UserError(
            f"run {p} used method=sparsegpt: SparseGPT reconstructs the kept weights in memory and the run does not "
            f"store them, so the pruned model cannot be rebuilt from the run directory (its masks alone give a "
            f"different model than the one measured). Export a method=local or method=unipruning run, or apply "
            f"the masks to the original weights knowingly with `unipruning apply <masks> --model {p} --out DIR`")
    missing = [f for f in ("config.yaml", "metrics.json") if not (p / f).is_file()]
    if cfg is not None:
        marker = f"stages/{_stage_of(cfg.method)}.json"
        if not (p / marker).is_file():
            missing.append(marker)
    elif not (p / "stages").is_dir() or not list((p / "stages").glob("*.json")):
        missing.append("stages/<stage>.json")
    if len(missing) == 3:
        jobs = sorted(c.name for c in p.iterdir() if (c / "config.yaml").is_file())
        hint = f" (a multirun sweep? pass one of its job folders: {', '.join(jobs[:5])})" if jobs else ""
        raise UserError(f"{p} is not a run directory: it has no config.yaml, metrics.json or stages/{hint}")
    if missing:
        raise UserError(
            f"run directory {p} is incomplete: missing {', '.join(missing)}. A run writes metrics.json last, so "
            f"this one was interrupted (or is still running); finish it by rerunning `unipruning prune` with the "
            f"same overrides and hydra.run.dir={p} (finished stages are skipped)")
    try:
        metrics = json.loads((p / "metrics.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{p / 'metrics.json'} is not valid JSON ({err}): the run directory is damaged") from None
    return RunInfo(p, cfg, metrics)


def held_tags(run: RunInfo) -> list[str]:
    """The cuts the run holds as mask files, in the order of its metrics, then any others."""
    on_disk = {f.name[: -len(".safetensors")] for f in (run.path / "masks").glob("*.safetensors")}
    ordered = [t for t in run.metrics.get("results", {}) if t in on_disk]
    return ordered + sorted(on_disk - set(ordered))


def _describe_tag(tag: str) -> str:
    m = _NM_TAG.match(tag)
    if m:
        return f"{tag} (pattern={m.group(1)}:{m.group(2)})"
    m = re.match(r"^s(\d\.\d+)_(\w+)$", tag)
    if m:
        return f"{tag} (sparsity={float(m.group(1)):g} allocation={m.group(2)})"
    return tag


def _nm_of_tag(tag: str) -> tuple[int, int] | None:
    m = _NM_TAG.match(tag or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


# ==============================================================================================
# which cut


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{key}={value!r} is not a number") from None


def resolve_target(run: RunInfo, sparsity: Optional[float] = None, pattern: Optional[str] = None,
                   allocation: Optional[str] = None) -> Target:
    """The cut asked for: the run's own one when nothing is given, else built like the run builds its extras.

    ``pattern=N:M`` gives an N:M cut (its sparsity is 1 - N/M); otherwise an unstructured cut at
    ``sparsity`` (default: the run's) with ``allocation`` (default: the run's, or per_matrix after an N:M run).
    """
    from .methods import make_target

    primary = make_target(run.cfg)
    if pattern is not None and pattern != "unstructured":
        m = _NM_PATTERN.match(str(pattern))
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise UserError(f"pattern={pattern!r} is not valid: use unstructured or N:M with 0 < N < M, e.g. pattern=2:4")
        n, mm = int(m.group(1)), int(m.group(2))
        implied = 1.0 - n / mm
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserError(f"sparsity={sparsity:g} conflicts with pattern={n}:{mm}, whose sparsity is {implied:g}; "
                            f"drop one of them")
        if allocation not in (None, "per_row"):
            raise UserError(f"allocation={allocation} applies to unstructured cuts only, not pattern={n}:{mm}")
        return Target(sparsity=implied, allocation="per_row", n=n, m=mm)
    if sparsity is None and allocation is None and pattern is None:
        return primary
    if allocation is not None and allocation not in ALLOCATIONS:
        raise UserError(f"allocation={allocation!r} is not allowed; choose one of: {', '.join(ALLOCATIONS)}")
    if sparsity is None:
        sparsity = primary.sparsity if not primary.is_nm else 0.5
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity={sparsity:g} is out of range: it must satisfy 0 <= sparsity < 1")
    if abs(round(sparsity, 2) - sparsity) > 1e-9:
        raise UserError(f"sparsity={sparsity:g}: use at most two decimals (masks are stored as "
                        f"s{round(sparsity, 2):.2f}_<allocation>, so {sparsity:g} and {round(sparsity, 2):g} would "
                        f"share a file)")
    if allocation is None:
        allocation = primary.allocation if not primary.is_nm else "per_matrix"
    return Target(sparsity=round(float(sparsity), 2), allocation=allocation)


def _unavailable(run: RunInfo, target: Target) -> UserError:
    held = held_tags(run)
    holds = ", ".join(_describe_tag(t) for t in held) if held else "no mask files"
    if run.method == "unipruning":
        why = f"and its {run.gamma_path.name} is missing, so no new cut can be made"
    else:
        why = (f"and a method={run.method} run keeps no saliency Γ to cut other sparsities from (only "
               f"method=unipruning runs do); prune again with the cut you want")
    return UserError(f"run {run.path} has no {target.tag} cut: it holds {holds}, {why}")


def _masks_source(run: RunInfo, target: Target) -> str:
    """'file' when the run holds the cut, 'gamma' when Γ can cut it; UserError otherwise."""
    if run.mask_path(target.tag).is_file():
        return "file"
    if run.method == "unipruning" and run.gamma_path.is_file():
        return "gamma"
    raise _unavailable(run, target)


def _load_or_cut(run: RunInfo, target: Target, source: str) -> dict[str, torch.Tensor]:
    from .rundir import load_tensors
    from .mask_files import load_masks, save_masks

    if source == "file":
        try:
            return load_masks(run.mask_path(target.tag))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{run.mask_path(target.tag)} cannot be read as a masks file: {err}") from None
    gamma = load_tensors(run.gamma_path)
    try:
        masks = target.cut({n: g.abs() for n, g in gamma.items()})
    except ValueError as err:
        raise UserError(f"cannot cut {target.tag} from {run.gamma_path}: {err}") from None
    save_masks(run.mask_path(target.tag), masks, {"target": target.tag, "method": "unipruning",
                                                  "cut_by": "unipruning export"})
    log.info("cut %s from %s, saved to %s", target.tag, run.gamma_path.name, run.mask_path(target.tag))
    return masks


# ==============================================================================================
# output folders: checked early, written to a temporary sibling, renamed into place


def _check_out(out: Path, force: bool, protect: list[Path]) -> None:
    out = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise UserError(f"--out {out} would hold {p}; choose an output folder outside it")
    if out.exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it (nothing was written)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")


@contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it becomes ``out`` in one rename."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            if not force:
                raise UserError(f"output folder {out} appeared while exporting; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; a shipped folder gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# ==============================================================================================
# masks and models


def check_mask_shapes(layers: Mapping[str, nn.Linear], masks: Mapping[str, torch.Tensor], where: str) -> None:
    """UserError naming every mask whose layer is missing or whose shape differs from the weight's."""
    bad = []
    for name, mask in masks.items():
        if name not in layers:
            bad.append(f"{name} (no such prunable layer)")
        elif tuple(mask.shape) != tuple(layers[name].weight.shape):
            bad.append(f"{name} (mask {tuple(mask.shape)}, weight {tuple(layers[name].weight.shape)})")
    if bad:
        raise UserError(f"the masks of {where} do not fit this model: {len(bad)} mismatched layer(s): {', '.join(bad)}")


def _shapes_on_disk(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers of an HF folder (nothing is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name == COMPRESSED_FILE:
            continue
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception:  # noqa: BLE001  (an unreadable header is for the loader to report)
            continue
    return shapes


def _precheck_shapes(folder: Path, masks_shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    on_disk = _shapes_on_disk(folder)
    bad = [f"{n} (mask {tuple(s)}, weight {on_disk[n + '.weight']})" for n, s in masks_shapes.items()
           if n + ".weight" in on_disk and tuple(on_disk[n + ".weight"]) != tuple(s)]
    if bad:
        raise UserError(f"the masks of {where} do not fit this model: {len(bad)} mismatched layer(s): {', '.join(bad)}")


def _read_masks_file(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"masks file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path} is not a safetensors file: {err}") from None
    if "shapes" not in meta:
        raise UserError(f"{path} is not a masks file written by unipruning (no 'shapes' in its metadata)")
    info = json.loads(meta.get("info", "{}"))
    return {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}, info


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _kept_counts(model: nn.Module) -> dict:
    """Zeros counted in the weights as they will be saved (prunable layers, and every parameter)."""
    from .models import prunable_layers

    per_layer, zeros, total = {}, 0, 0
    for name, lin in prunable_layers(model).items():
        z = int((lin.weight == 0).sum())
        per_layer[name] = z / lin.weight.numel()
        zeros += z
        total += lin.weight.numel()
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {"measured_sparsity": zeros / total if total else 0.0, "prunable_params": total,
            "prunable_kept": total - zeros, "all_params": all_params, "all_kept": all_params - all_zeros,
            "per_layer": per_layer}


def _save_hf(model: nn.Module, tok, folder: Path) -> None:
    import inspect

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(folder, **kwargs)
    if tok is not None:
        tok.save_pretrained(folder)
    if not list(Path(folder).glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {folder}")


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors") if f.name != COMPRESSED_FILE)


# ==============================================================================================
# compressed N:M storage


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def pack_indices(idx: torch.Tensor, m: int) -> torch.Tensor:
    """In-group positions (0 <= i < m) as a uint8 bit stream, ``ceil(log2 m)`` bits each, LSB first."""
    from .masks import pack_mask

    bits = _index_bits(m)
    flat = idx.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= m):
        raise ValueError(f"indices must lie in [0, {m})")
    planes = ((flat[:, None] >> torch.arange(bits, device=flat.device)) & 1).bool()
    return pack_mask(planes.reshape(-1))


def unpack_indices(packed: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``count`` int64 positions."""
    from .masks import unpack_mask

    bits = _index_bits(m)
    planes = unpack_mask(packed, (count * bits,)).reshape(count, bits).to(torch.int64)
    return (planes << torch.arange(bits, device=planes.device)).sum(dim=1)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    return bool(((weight != 0).reshape(out_f, in_f // m, m).sum(-1) <= n).all())


def compress_nm(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``[out, in*n/m]`` in the weight dtype, packed positions) of an N:M-sparse weight.

    Each group of m inputs keeps its non-zero entries, padded with its first zero positions when it
    has fewer than n; positions are stored ascending. A group with more than n non-zeros is an error.
    """
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"{name}: in_features={in_f} is not divisible by {m}")
    groups = weight.detach().reshape(out_f, in_f // m, m)
    nonzero = (groups != 0).to(torch.uint8)
    if (nonzero.sum(-1) > n).any():
        bad = int((nonzero.sum(-1) > n).sum())
        raise ValueError(f"{name} is not {n}:{m} sparse: {bad} group(s) of {m} inputs have more than {n} non-zeros")
    pos = torch.sort(nonzero, dim=-1, descending=True, stable=True).indices[..., :n]
    pos = torch.sort(pos, dim=-1).values
    values = torch.gather(groups, -1, pos).reshape(out_f, (in_f // m) * n).contiguous()
    return values, pack_indices(pos, m)


def decompress_nm(values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], n: int, m: int) -> torch.Tensor:
    """The dense ``shape`` weight of :func:`compress_nm`'s output (zeros elsewhere)."""
    out_f, in_f = shape
    g = in_f // m
    pos = unpack_indices(packed, out_f * g * n, m).reshape(out_f, g, n).to(values.device)
    dense = torch.zeros(out_f, g, m, dtype=values.dtype, device=values.device)
    return dense.scatter_(-1, pos, values.reshape(out_f, g, n)).reshape(out_f, in_f)


def write_compressed(model: nn.Module, folder: Path, n: int, m: int) -> dict:
    """Write ``<folder>/compressed.safetensors`` for an N:M-sparse model; returns byte counts.

    Keys: ``nm.<layer>.values`` / ``nm.<layer>.indices`` per prunable layer, ``dense.<state key>`` for
    everything else (a tensor shared by several keys, e.g. tied embeddings, is stored once; the others
    are listed as aliases). The metadata holds the format, N, M, index bits, shapes and dtypes as JSON.
    """
    from .models import prunable_layers
    from .rundir import atomic_save_tensors

    layers = prunable_layers(model)
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, dict] = {}
    dense_bytes = compressed_bytes = 0
    for name, lin in layers.items():
        w = lin.weight.detach()
        try:
            values, packed = compress_nm(w, n, m, name)
        except ValueError as err:
            raise UserError(f"--compressed: {err}") from None
        tensors[f"nm.{name}.values"] = values
        tensors[f"nm.{name}.indices"] = packed
        layer_meta[name] = {"shape": list(w.shape), "dtype": _dtype_name(w.dtype)}
        dense_bytes += w.numel() * w.element_size()
        compressed_bytes += values.numel() * values.element_size() + packed.numel()
    prunable_keys = {f"{name}.weight" for name in layers}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    other_bytes = 0
    for key, t in state.items():
        if key in prunable_keys:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[f"dense.{key}"] = t.detach()
        other_bytes += t.numel() * t.element_size()
    meta = {"format": COMPRESSED_FORMAT, "n": str(n), "m": str(m), "index_bits": str(_index_bits(m)),
            "layers": json.dumps(layer_meta), "aliases": json.dumps(aliases),
            "dtype": _dtype_name(next(model.parameters()).dtype)}
    path = Path(folder) / COMPRESSED_FILE
    atomic_save_tensors(path, tensors, meta)
    return {"file_bytes": path.stat().st_size, "prunable_dense_bytes": dense_bytes,
            "prunable_compressed_bytes": compressed_bytes, "other_bytes": other_bytes,
            "prunable_ratio": compressed_bytes / dense_bytes if dense_bytes else float("nan")}


def load_compressed(folder: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> nn.Module:
    """Rebuild the dense model from ``<folder>/config.json`` + ``compressed.safetensors`` (exactly)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    path = folder / COMPRESSED_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {COMPRESSED_FILE} (export with --compressed)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != COMPRESSED_FORMAT:
        raise UserError(f"{path} is not a {COMPRESSED_FORMAT} file (format={meta.get('format')!r})")
    from .rundir import load_tensors

    data = load_tensors(path)
    n, m = int(meta["n"]), int(meta["m"])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[meta["dtype"]], trust_remote_code=trust_remote_code)
    state: dict[str, torch.Tensor] = {k[len("dense."):]: v for k, v in data.items() if k.startswith("dense.")}
    for name, lm in json.loads(meta["layers"]).items():
        state[f"{name}.weight"] = decompress_nm(data[f"nm.{name}.values"], data[f"nm.{name}.indices"],
                                                tuple(lm["shape"]), n, m)
    for alias, src in json.loads(meta.get("aliases", "{}")).items():
        state[alias] = state[src]
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# ==============================================================================================
# semi-structured 2:4 kernels (NVIDIA Ampere and newer)


def to_semi_structured(model: nn.Module) -> dict:
    """Swap every 2:4-sparse prunable Linear weight for a ``torch.sparse`` semi-structured tensor, in place.

    Needs the model on an NVIDIA GPU with compute capability >= 8.0, in float16 or bfloat16. Layers that
    are not 2:4 sparse or whose shape the kernels do not take are left dense and listed under ``skipped``.
    """
    from .models import prunable_layers

    need = "semi-structured 2:4 sparse kernels need an NVIDIA GPU with compute capability >= 8.0 (Ampere or newer)"
    if not torch.cuda.is_available() or torch.version.hip is not None:
        raise UserError(f"{need}; no such device is available here")
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        raise UserError(f"{need}; this GPU ({torch.cuda.get_device_name()}) has compute capability {cap[0]}.{cap[1]}")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if not torch.backends.cusparselt.is_available():
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    converted, skipped = [], {}
    for name, lin in prunable_layers(model).items():
        w = lin.weight.detach()
        if w.device.type != "cuda":
            skipped[name] = f"on {w.device}, not CUDA"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            skipped[name] = f"{_dtype_name(w.dtype)}: the kernels take float16 / bfloat16"
        elif not is_nm_sparse(w, 2, 4):
            skipped[name] = "not 2:4 sparse"
        else:
            try:
                sparse = to_sparse_semi_structured(w.contiguous())
            except RuntimeError as err:
                skipped[name] = str(err).splitlines()[0]
                continue
            lin.weight = nn.Parameter(sparse, requires_grad=False)
            converted.append(name)
    return {"converted": converted, "skipped": skipped,
            "backend": "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"}


# ==============================================================================================
# the model card


def speed_note(n: int = 0, m: int = 0) -> str:
    """One plain sentence on what the zeros buy at inference time."""
    if n == 2 and m == 4:
        return ("Stored dense, this model runs at the dense speed; its 2:4 pattern can be accelerated on NVIDIA "
                "Ampere or newer GPUs (compute capability >= 8.0) with semi-structured sparse kernels "
                "(torch.sparse.to_sparse_semi_structured, see unipruning_cli.export.to_semi_structured and "
                "scripts/bench_semi_structured.py): the pruned matmuls do half the work, so up to about 2x on "
                "those layers in theory and less end to end.")
    if n:
        return (f"Stored dense, this model runs at the dense speed; the {n}:{m} pattern has no hardware kernel here "
                f"(NVIDIA sparse tensor cores accelerate 2:4 only), though --compressed shrinks the file.")
    return ("Unstructured zeros give no speed-up when stored dense: the file and the matmuls are as large as the "
            "dense model's; they need sparse kernels or a sparse format to pay off.")


def _short_speed(n: int, m: int) -> str:
    if n == 2 and m == 4:
        return ("none as stored (dense); up to ~2x on the pruned matmuls with 2:4 semi-structured kernels "
                "on NVIDIA Ampere+ (to_semi_structured, scripts/bench_semi_structured.py)")
    if n:
        return f"none: stored dense, and only 2:4 has sparse kernels ({n}:{m} does not)"
    return "none: unstructured zeros stored dense run at the dense speed"


def _fmt_ppl(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _card(title: str, rows: list[tuple[str, str]], ppl_lines: list[str], kept: dict, sizes: list[tuple[str, int]],
          speed: str, extra: list[str]) -> str:
    lines = ["---", "tags:", "- pruned", "- sparse", "- unipruning", "---", "", f"# {title}", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Perplexity", ""] + (ppl_lines or ["Not measured."]) + ["", "## Sparsity and size", ""]
    lines += [f"- measured sparsity of the prunable weights: {kept['measured_sparsity']:.4f}",
              f"- parameters kept (non-zero): {kept['prunable_kept']:,} of {kept['prunable_params']:,} prunable "
              f"weights; {kept['all_kept']:,} of {kept['all_params']:,} parameters in all"]
    lines += [f"- {name}: {n:,} bytes ({_mib(n)})" for name, n in sizes]
    lines += ["", "## Speed", "", speed, ""] + extra
    return "\n".join(lines).rstrip() + "\n"


def _run_card(run: RunInfo, target: Target, source: str, kept: dict, sizes: list[tuple[str, int]],
              dtype: torch.dtype, compressed: Optional[dict]) -> str:
    mt = run.metrics
    calib = mt.get("calibration", {}) or {}
    metric = mt.get("local_metric") or {}
    metric_name = metric.get("name", "?") if isinstance(metric, dict) else str(metric)
    knobs = {k: v for k, v in metric.items() if k != "name"} if isinstance(metric, dict) else {}
    model = mt.get("model", {})
    rows = [("base model", f"{model.get('name', run.cfg.model.name)} ({model.get('location', run.cfg.model.path)})"),
            ("method", run.method),
            ("anchor metric" if run.method == "unipruning" else "metric",
             metric_name + (f" {json.dumps(knobs)}" if knobs else "")),
            ("sparsity", f"{target.sparsity:g}"),
            ("pattern", f"{target.n}:{target.m}" if target.is_nm else "unstructured"),
            ("allocation", "N:M groups along the input dimension" if target.is_nm else target.allocation),
            ("calibration", f"{calib.get('source', '?')}: {calib.get('nsamples', '?')} windows x "
                            f"{calib.get('seqlen', '?')} tokens = {calib.get('tokens', '?')} tokens"
                            + (f", {calib['mode']}" if calib.get("mode") else "")),
            ("masks", f"{target.tag} from {'the run' if source == 'file' else 'Γ (gamma.safetensors), cut at export'}"),
            ("weights dtype", _dtype_name(dtype)),
            ("run", str(run.path))]
    if run.method == "unipruning":
        sch = (mt.get("search") or {}).get("schedule") or {}
        if sch:
            rows.insert(3, ("search", f"{sch.get('steps', '?')} steps, weight_mode={sch.get('weight_mode', '?')}"))
    ppl_lines = []
    result = (mt.get("results") or {}).get(target.tag)
    for corpus, r in (mt.get("perplexity") or {}).items():
        pruned_proto = r.get("pruned") or {}
        dense = r.get("dense") or {}
        proto = f"seqlen {pruned_proto.get('seqlen', dense.get('seqlen', '?'))}, " \
                f"{pruned_proto.get('windows', dense.get('windows', '?'))} windows"
        pruned = (result or {}).get("ppl", {}).get(corpus)
        pruned_txt = _fmt_ppl(pruned) if result else "not measured by the run (this cut was made at export)"
        ppl_lines.append(f"- {corpus} ({proto}): dense {_fmt_ppl(dense.get('ppl'))}, pruned {pruned_txt}")
    if ppl_lines:
        ppl_lines.append("")
        ppl_lines.append("Perplexity as the run measured it: non-overlapping windows, PPL = exp(mean of the "
                         "per-window mean NLL), in the run's dtype "
                         f"({model.get('dtype', '?').replace('torch.', '')}).")
    extra = []
    if compressed:
        extra = ["## Compressed file", "",
                 f"`{COMPRESSED_FILE}` stores the {target.n}:{target.m} model compactly: the kept values and their "
                 f"in-group positions ({_index_bits(target.m)} bits each) per prunable layer, the other tensors "
                 f"dense. Prunable tensors: {compressed['prunable_compressed_bytes']:,} bytes instead of "
                 f"{compressed['prunable_dense_bytes']:,} ({compressed['prunable_ratio']:.3f}x). Load it with "
                 "`unipruning_cli.export.load_compressed(folder)` (needs config.json from this folder).", ""]
    return _card(f"{model.get('name', 'model')} pruned to {target.tag} by {run.method}", rows, ppl_lines, kept,
                 sizes, speed_note(target.n, target.m), extra)


# ==============================================================================================
# export


def _publish(model: nn.Module, tok, out: Path, force: bool, nm: Optional[tuple[int, int]], card) -> dict:
    """Save the HF folder (+ compressed file) into a staging folder, write the card, rename into place."""
    with staging_folder(out, force) as tmp:
        _save_hf(model, tok, tmp)
        compressed = write_compressed(model, tmp, *nm) if nm else None
        sizes = [("dense weights (model*.safetensors)", _weights_bytes(tmp))]
        if compressed:
            sizes.append((COMPRESSED_FILE, compressed["file_bytes"]))
        text, record = card(sizes, compressed)
        (tmp / "README.md").write_text(text, encoding="utf-8")
        (tmp / "unipruning_export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        folder_bytes = _folder_bytes(tmp)
    return {"folder_bytes": folder_bytes, "sizes": sizes, "compressed": compressed}


def _resolve_dtype_for_run(run: RunInfo):
    cfg = run.cfg.copy()
    recorded = str((run.metrics.get("model") or {}).get("dtype", "")).replace("torch.", "")
    if cfg.model.dtype == "auto" and recorded in DTYPES:
        cfg.model.dtype = recorded  # the dtype the run measured in, whatever this machine would pick
    return cfg


def export_run(run_dir: str | Path, *, sparsity: Optional[float] = None, pattern: Optional[str] = None,
               allocation: Optional[str] = None, dtype: Optional[str] = None, out: Optional[str | Path] = None,
               compressed: bool = False, force: bool = False) -> dict:
    """Export one cut of a run as an HF folder; returns what was written (see ``export_command``)."""
    from .models import check_model_reachable, load_model, prunable_layers
    from .methods import apply_masks

    run = open_run(run_dir)
    target = resolve_target(run, sparsity, pattern, allocation)
    if compressed and not target.is_nm:
        raise UserError(f"--compressed needs an N:M pattern (e.g. pattern=2:4); {target.tag} is unstructured, whose "
                        f"positions cost more to store than the zeros save")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    source = _masks_source(run, target)
    out_path = Path(out).expanduser() if out is not None else run.path / "export" / target.tag
    _check_out(out_path, force, protect=[run.path])
    cfg = _resolve_dtype_for_run(run)
    check_model_reachable(cfg.model)
    masks = _load_or_cut(run, target, source)

    model, tok = load_model(cfg.model)
    layers = prunable_layers(model)
    check_mask_shapes(layers, masks, f"{run.mask_path(target.tag)}")
    apply_masks(layers, masks)
    kept = _kept_counts(model)
    expected = (run.metrics.get("results") or {}).get(target.tag, {}).get("measured_sparsity")
    if expected is not None and abs(expected - kept["measured_sparsity"]) > 1e-9:
        log.warning("measured sparsity %.6f differs from the run's %.6f: did the model at %s change since the run?",
                    kept["measured_sparsity"], expected, cfg.model.path)
    if dtype is not None and DTYPES[dtype] != next(model.parameters()).dtype:
        model.to(DTYPES[dtype])
        kept = _kept_counts(model)  # what is saved (float16 may flush tiny weights to zero)
    model_dtype = next(model.parameters()).dtype
    nm = (target.n, target.m) if compressed else None

    def card(sizes, comp):
        record = {"run": str(run.path), "tag": target.tag, "masks": "file" if source == "file" else "cut from gamma",
                  "method": run.method, "sparsity": target.sparsity, "allocation": target.allocation,
                  "pattern": f"{target.n}:{target.m}" if target.is_nm else "unstructured",
                  "dtype": _dtype_name(model_dtype), "sizes": dict(sizes), "compressed": comp,
                  **{k: v for k, v in kept.items() if k != "per_layer"}}
        return _run_card(run, target, source, kept, sizes, model_dtype, comp), record

    written = _publish(model, tok, out_path, force, nm, card)
    return {"out": out_path.resolve(), "tag": target.tag, "target": target, "source": source, "kept": kept,
            "dtype": model_dtype, **written}


def _print_summary(title: str, res: dict, n: int, m: int) -> None:
    k = res["kept"]
    print(title)
    print(f"  parameters kept: {k['prunable_kept']:,} of {k['prunable_params']:,} prunable weights "
          f"(measured sparsity {k['measured_sparsity']:.4f}); {k['all_kept']:,} of {k['all_params']:,} in all")
    sizes = ", ".join(f"{name} {_mib(b)}" for name, b in res["sizes"])
    print(f"  folder size: {_mib(res['folder_bytes'])} ({sizes})")
    if res.get("compressed"):
        c = res["compressed"]
        print(f"  compressed prunable tensors: {c['prunable_ratio']:.3f}x their dense bytes")
    print(f"  expected speed-up: {_short_speed(n, m)}")


def _split_tokens(tokens: list[str], keys: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    positional, opts = [], {}
    for tok in tokens:
        key, eq, value = tok.partition("=")
        if eq and key in keys:
            if key in opts:
                raise UserError(f"{key} is given twice")
            opts[key] = value
        elif eq and not Path(tok).exists():
            raise UserError(f"unknown option {tok!r}; known: {', '.join(f'{k}=...' for k in keys)}")
        else:
            positional.append(tok)
    return positional, opts


def export_command(args: list[str]) -> None:
    """``unipruning export <run_dir> [sparsity=0.6] [pattern=2:4] [allocation=per_matrix] [dtype=bfloat16]
    [--out DIR] [--compressed] [--force]``"""
    parser = argparse.ArgumentParser(
        prog="unipruning export",
        description="Write a pruned HF model folder (safetensors + tokenizer + README.md card) from a finished run. "
                    "Without options: the run's own cut. key=value options: sparsity=<0..1> and allocation="
                    "per_row|per_matrix|global for an unstructured cut, pattern=N:M for an N:M cut, dtype=float32|"
                    "bfloat16|float16 for the saved weights (default: the run's). A method=unipruning run can export "
                    "any cut its Γ allows; other runs only the cuts in their masks/ folder.",
        usage="unipruning export <run_dir> [sparsity=S] [pattern=N:M] [allocation=A] [dtype=D] [--out DIR] "
              "[--compressed] [--force]")
    parser.add_argument("items", nargs="*", help="the run directory, then key=value options")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/export/<tag>)")
    parser.add_argument("--compressed", action="store_true",
                        help=f"N:M only: also write {COMPRESSED_FILE} (kept values + bit-packed positions)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    ns = parser.parse_args(args)
    positional, opts = _split_tokens(ns.items, EXPORT_KEYS)
    if len(positional) != 1:
        raise UserError(f"export takes exactly one run directory, got {len(positional)}: {' '.join(positional) or '-'}"
                        f"\n{parser.format_usage().strip()}")
    sparsity = _parse_float("sparsity", opts["sparsity"]) if "sparsity" in opts else None
    _logging()
    res = export_run(positional[0], sparsity=sparsity, pattern=opts.get("pattern"), allocation=opts.get("allocation"),
                     dtype=opts.get("dtype"), out=ns.out, compressed=ns.compressed, force=ns.force)
    t = res["target"]
    how = "from the run's masks" if res["source"] == "file" else "cut from Γ (masks saved into the run)"
    _print_summary(f"exported {res['tag']} ({how}) to {res['out']}", res, t.n, t.m)


# ==============================================================================================
# apply


def _model_cfg_for(model_arg: str):
    """(model config, what it is) for a run directory or an HF folder."""
    from omegaconf import OmegaConf

    from .config import ModelConfig

    p = Path(model_arg).expanduser()
    if (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        try:
            cfg = OmegaConf.load(p / "config.yaml")
            model_cfg = cfg.model
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{p / 'config.yaml'} is not a unipruning run config: {err}") from None
        metrics_path = p / "metrics.json"
        if model_cfg.dtype == "auto" and metrics_path.is_file():
            try:
                recorded = str(json.loads(metrics_path.read_text())["model"]["dtype"]).replace("torch.", "")
            except (KeyError, ValueError, TypeError):
                recorded = ""
            if recorded in DTYPES:
                model_cfg.dtype = recorded
        return model_cfg, f"the original model of run {p}"
    if (p / "config.json").is_file():
        cfg = OmegaConf.structured(ModelConfig(name=p.name, source="local", path=str(p.resolve())))
        return cfg, f"the HF folder {p}"
    if not p.exists():
        raise UserError(f"--model {model_arg}: no such folder")
    raise UserError(f"--model {model_arg}: neither a run directory (config.yaml) nor an HF model folder (config.json)")


def apply_masks_file(masks_path: str | Path, model_arg: str | Path, out: str | Path, *, force: bool = False,
                     dtype: Optional[str] = None, compressed: bool = False) -> dict:
    """Apply a masks file to an original model and save the result as an HF folder (``apply_command``)."""
    from .models import check_model_reachable, load_model, prunable_layers
    from .methods import apply_masks
    from .mask_files import load_masks

    masks_path = Path(masks_path).expanduser()
    shapes, info = _read_masks_file(masks_path)
    model_cfg, what = _model_cfg_for(str(model_arg))
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    nm = _nm_of_tag(info.get("target", ""))
    if compressed and nm is None:
        raise UserError(f"--compressed needs N:M masks; {masks_path.name} holds {info.get('target', 'unknown')!r}")
    out_path = Path(out).expanduser()
    protect = [masks_path] + ([Path(model_arg)] if Path(model_arg).exists() else [])
    if model_cfg.source == "local":
        protect.append(Path(model_cfg.path).expanduser())
    _check_out(out_path, force, protect=protect)
    check_model_reachable(model_cfg)
    if model_cfg.source == "local":
        _precheck_shapes(Path(model_cfg.path).expanduser(), shapes, str(masks_path))
    masks = load_masks(masks_path)

    model, tok = load_model(model_cfg)
    layers = prunable_layers(model)
    check_mask_shapes(layers, masks, str(masks_path))
    apply_masks(layers, masks)
    if dtype is not None and DTYPES[dtype] != next(model.parameters()).dtype:
        model.to(DTYPES[dtype])
    kept = _kept_counts(model)
    model_dtype = next(model.parameters()).dtype
    n, m = nm or (0, 0)

    def card(sizes, comp):
        rows = [("base model", what), ("masks", f"{masks_path} ({info.get('target', '?')}, "
                                                f"method={info.get('method', '?')})"),
                ("pattern", f"{n}:{m}" if nm else "unstructured"), ("weights dtype", _dtype_name(model_dtype))]
        extra = []
        if info.get("method") == "sparsegpt":
            extra = ["Note: these masks come from a SparseGPT run, which also reconstructed the kept weights; here "
                     "they are applied to the original weights, which is a different model than the one the run "
                     "measured.", ""]
        record = {"masks": str(masks_path), "model": what, "target": info.get("target"),
                  "dtype": _dtype_name(model_dtype), "sizes": dict(sizes), "compressed": comp,
                  **{k: v for k, v in kept.items() if k != "per_layer"}}
        text = _card(f"{Path(str(model_cfg.path)).name} with masks {info.get('target', masks_path.stem)}", rows, [],
                     kept, sizes, speed_note(n, m), extra)
        return text, record

    written = _publish(model, tok, out_path, force, nm if compressed else None, card)
    return {"out": out_path.resolve(), "kept": kept, "dtype": model_dtype, "nm": nm, **written}


def apply_command(args: list[str]) -> None:
    """``unipruning apply <masks.safetensors> --model <HF folder or run_dir> --out DIR [--force]``"""
    parser = argparse.ArgumentParser(
        prog="unipruning apply",
        description="Apply a masks file (masks/<tag>.safetensors of a run) to the original model and save an HF "
                    "folder (safetensors + tokenizer + README.md card). --model is an HF model folder or a run "
                    "directory (then the model of its config.yaml).")
    parser.add_argument("masks", type=Path, help="a masks file written by unipruning (masks/<tag>.safetensors)")
    parser.add_argument("--model", required=True, help="HF model folder, or a run directory")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="dtype of the saved weights")
    parser.add_argument("--compressed", action="store_true", help=f"N:M masks only: also write {COMPRESSED_FILE}")
    ns = parser.parse_args(args)
    _logging()
    res = apply_masks_file(ns.masks, ns.model, ns.out, force=ns.force, dtype=ns.dtype, compressed=ns.compressed)
    n, m = res["nm"] or (0, 0)
    _print_summary(f"applied {ns.masks} to {ns.model}: {res['out']}", res, n, m)


def _logging() -> None:
    if logging.getLogger().handlers:
        return
    try:
        from .cli import _console_logging

        _console_logging()
    except Exception:  # noqa: BLE001  (plain logging is fine too)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
