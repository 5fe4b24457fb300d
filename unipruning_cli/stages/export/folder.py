"""Output folders: checked before any work, written to a temporary sibling, renamed into place, and measured.

The folder is written to a temporary sibling of ``--out`` and renamed into place, so a failed export
leaves nothing behind; an existing folder is replaced only with ``--force``. Also here: what goes into it
(the HF save: ``save_pretrained``, safetensors), the dtypes its weights may take, and the checks that a
masks file fits the weights it is applied to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ...core.errors import UserError
from ...models.layouts import hf_layout
from ...models.loading import TORCH_DTYPES

log = logging.getLogger(__name__)

COMPRESSED_FILE = "compressed.safetensors"
DTYPES = TORCH_DTYPES  # the dtypes a folder can be written in: those a model loads in


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def protected_sources(model_cfg=None) -> list[Path]:
    """Folders no export may write into, be, or hold, whatever ``--force`` says: the model's own folder (the one
    ``from_pretrained`` reads for ``model_cfg``; for ``model.source=gguf`` also the folder holding the ``.gguf``
    file), unipruning's cache and the Hugging Face cache."""
    from huggingface_hub import constants

    from ...core.inputs import model_folder
    from ...core.paths import cache_dir

    found = [cache_dir(), Path(constants.HF_HUB_CACHE), Path(constants.HF_HOME)]
    if model_cfg is not None and (folder := model_folder(model_cfg)) is not None:
        found.append(folder)
    if model_cfg is not None and model_cfg.source == "gguf":  # the user's folder that holds the .gguf file
        found.append(Path(model_cfg.path).expanduser().resolve().parent)
    return found


def check_out(out: Path, force: bool, protect: list[Path], sources: list[Path] = ()) -> None:
    """UserError unless ``out`` may be written: not any ``protect`` path nor holding one; not any of ``sources`` (model
    folders, caches: :func:`protected_sources`), holding one or inside one, even with ``force`` (replacing them would
    destroy what the user did not produce); free (or ``force``, which replaces only an earlier export: a folder holding
    ``unipruning_export.json``, or an empty one); and writable."""
    from ..storage import check_writable

    out = out.resolve()
    for p in sources:
        p = Path(p).expanduser().resolve()
        if p == out or out in p.parents or p in out.parents:
            raise UserError(f"--out {out} is, holds or sits inside {p}, a model source or a cache: an export there "
                            "would overwrite files unipruning did not produce (even with --force). Choose an output "
                            "folder outside it")
    for p in protect:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise UserError(f"--out {out} would hold {p}; choose an output folder outside it")
    check_writable(out, "--out")
    if out.exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it (nothing was written)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "unipruning_export.json").is_file():
        raise UserError(f"--out {out} holds files that no unipruning export wrote (no unipruning_export.json): --force "
                        "replaces an earlier export only. Choose another output folder, or empty this one yourself")


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


def save_hf(model: nn.Module, tok, folder: Path) -> None:
    """``save_pretrained`` the model (safetensors) and the tokenizer into ``folder``."""
    import inspect

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    with hf_layout(model):  # transformers' own layout, so plain from_pretrained reloads it
        model.save_pretrained(folder, **kwargs)
    drop_sparsity_metadata(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    if not list(Path(folder).glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {folder}")


def drop_sparsity_metadata(folder: Path) -> list[str]:
    """Remove every sparsity description from ``folder/config.json``: a top-level ``sparsity_config`` and one inside
    ``quantization_config`` or ``compression_config`` (compressed-tensors), which a source model's config carries
    into ``save_pretrained``. Returns the keys removed. The weights written are dense, and vLLM refuses any
    ``sparsity_config`` (vLLM #51188), so an export never holds one."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    removed = []
    for key, part in [("", config), *((f"{k}.", config.get(k)) for k in ("quantization_config", "compression_config"))]:
        if isinstance(part, dict) and "sparsity_config" in part:
            del part["sparsity_config"]
            removed.append(f"{key}sparsity_config")
    if removed:
        log.warning("config.json: %s of the source model dropped (the exported weights are dense, and vLLM refuses "
                    "any sparsity_config)", ", ".join(removed))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return removed


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def weights_bytes(folder: Path) -> int:
    """Bytes of the dense weight files (``model*.safetensors``), not of the compressed file."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors") if f.name != COMPRESSED_FILE)


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# ==============================================================================================
# do the masks fit the weights


def _misfit(where: str, bad: list[str]) -> UserError:
    return UserError(f"the masks of {where} do not fit this model: {len(bad)} mismatched layer(s): {', '.join(bad)}")


def check_mask_shapes(layers: Mapping[str, nn.Linear], masks: Mapping[str, torch.Tensor], where: str) -> None:
    """UserError naming every mask whose layer is missing or whose shape differs from the weight's."""
    bad = []
    for name, mask in masks.items():
        if name not in layers:
            bad.append(f"{name} (no such prunable layer; masks of an older run may cut a router or gate, which "
                       "unipruning never prunes now: prune again)")
        elif tuple(mask.shape) != tuple(layers[name].weight.shape):
            bad.append(f"{name} (mask {tuple(mask.shape)}, weight {tuple(layers[name].weight.shape)})")
    if bad:
        raise _misfit(where, bad)


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


def precheck_shapes(folder: Path, masks_shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """:func:`check_mask_shapes` against the headers of an HF folder, before the model is loaded."""
    on_disk = _shapes_on_disk(folder)
    bad = [f"{n} (mask {tuple(s)}, weight {on_disk[n + '.weight']})" for n, s in masks_shapes.items()
           if n + ".weight" in on_disk and tuple(on_disk[n + ".weight"]) != tuple(s)]
    if bad:
        raise _misfit(where, bad)
