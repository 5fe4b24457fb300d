"""Mask files on disk: one bit-packed ``uint8`` tensor per prunable matrix, its shape and provenance in the metadata.

Format (docs/run-directory.md): a safetensors file whose tensors are :func:`pack_mask` of
each keep mask (1 bit per weight, row-major, little-endian within a byte), with two metadata keys:
``shapes`` (JSON: name -> [out, in]) and ``info`` (JSON: the target tag, the method, the ``inputs`` it was cut for, ...).
Written atomically (:func:`rundir.atomic_save_tensors`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..core.errors import UserError
from ..core.lazymap import LazyMap
from ..core.rundir import atomic_save_tensors, load_tensors

_BIT_WEIGHTS = tuple(1 << bit for bit in range(8))


def pack_mask(mask: Tensor) -> Tensor:
    """One bit per element, row-major, element i in bit ``i % 8`` of byte ``i // 8``.

    Masks of a 7B model are billions of booleans; at one byte each they would be as large as an
    int8 copy of the model, at one bit they are an eighth of that.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask expects a bool mask, got {mask.dtype}")
    flat = mask.reshape(-1)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=mask.device)
    return (flat.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`; ``shape`` is needed because padding hides the length."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_mask expects uint8 data, got {packed.dtype}")
    numel = math.prod(shape)
    expected = (numel + 7) // 8
    if packed.numel() != expected:
        raise ValueError(
            f"packed mask has {packed.numel()} bytes, shape {tuple(shape)} needs {expected}"
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=packed.device)
    bits = (packed.reshape(-1, 1).to(torch.int32) & weights) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def packed_masks(masks: Mapping[str, Tensor]) -> LazyMap:
    """``masks`` (name -> bool ``[out, in]``) held packed, 1 bit per weight, each unpacked (on the CPU) when asked
    for: the several cuts of one run (four of Γ and four of a baseline by default) cost P/8 bytes each, not P."""
    packed = {n: pack_mask(m.cpu()) for n, m in masks.items()}
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    return LazyMap(packed, lambda n: unpack_mask(packed[n], shapes[n]))


def save_masks(path: Path, masks: dict[str, torch.Tensor], info: dict) -> None:
    """Write ``masks`` (bool ``[out, in]`` per matrix, True = kept) to ``path`` with ``info`` in the metadata."""
    save_packed_masks(path, {n: pack_mask(m) for n, m in masks.items()}, {n: list(m.shape) for n, m in masks.items()},
                      info)


def save_packed_masks(path: Path, packed: dict[str, torch.Tensor], shapes: dict[str, list[int]], info: dict) -> None:
    """Write masks already packed by :func:`pack_mask` (``uint8``, 1 bit per weight) with their shapes. Inside
    :func:`..core.inputs.recording` the header's ``info["inputs"]`` names the model and tokenizer the masks were cut for
    (files, bytes, SHA-256), unless ``info`` already holds them."""
    from ..core.inputs import recorded_now

    if "inputs" not in info and (inputs := recorded_now()) is not None:
        info = {**info, "inputs": inputs}
    atomic_save_tensors(path, packed, {"shapes": json.dumps(shapes), "info": json.dumps(info)})


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    """The bool keep masks of a file written by :func:`save_masks`, on the CPU."""
    shapes, _ = read_masks_header(path)
    packed = load_tensors(path)
    return {n: unpack_mask(packed[n], shapes[n]) for n in shapes}


def read_masks_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """The shapes and the ``info`` of a masks file, without reading its tensors.

    Raises :class:`UserError` when ``path`` is missing, is not safetensors, or has no ``shapes`` metadata.
    """
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
    shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
    return shapes, json.loads(meta.get("info", "{}"))
