"""N:M-sparse weights stored compactly (``--compressed``, a file format), and 2:4 semi-structured kernels to measure.

N:M models can be stored compressed: per prunable layer the N kept values of every group of M inputs,
``[out, in*N/M]`` in the weight dtype, and their in-group positions bit-packed (``ceil(log2 M)`` bits
each: 2 for 2:4, 3 for 4:8), next to the dense non-prunable tensors. At 2:4 the prunable tensors take
0.5 + 1/16 = 0.5625 of their dense fp16/bf16 bytes (0.53 in fp32); the file as a whole is larger than
that fraction of the dense file by the share of embeddings, norms and ``lm_head``. :func:`load_compressed`
rebuilds the dense model exactly (pruned zeros come back as +0.0).

The compressed file saves disk, not inference time: no mainstream serving engine of 2026 runs 2:4 or
unstructured sparsity (vLLM removed its 2:4 kernels, #36799, and refuses any ``sparsity_config``, #51188;
TensorRT-LLM removed the backend of ``--weight_sparsity``, #15918), and zeros stored dense run at the dense speed.
PyTorch's ``torch.sparse.to_sparse_semi_structured`` remains a research path on NVIDIA GPUs of compute capability
>= 8.0: :func:`to_semi_structured` converts a model's 2:4 layers, and ``scripts/bench_semi_structured.py`` times it
against the dense model; any speed figure must come from that measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...core.errors import UserError
from ...models.layouts import as_linears, restore_layouts
from ...pruning.mask_files import pack_mask, unpack_mask
from ...models.loading import prunable_layers
from ...core.rundir import atomic_save_tensors, load_tensors
from .folder import COMPRESSED_FILE, DTYPES, dtype_name

COMPRESSED_FORMAT = "unipruning-nm-v1"


def index_bits(m: int) -> int:
    """Bits per stored in-group position: ``ceil(log2 m)``, at least 1."""
    return max(1, (m - 1).bit_length())


def pack_indices(idx: torch.Tensor, m: int) -> torch.Tensor:
    """In-group positions (0 <= i < m) as a uint8 bit stream, ``ceil(log2 m)`` bits each, LSB first."""
    bits = index_bits(m)
    flat = idx.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= m):
        raise ValueError(f"indices must lie in [0, {m})")
    planes = ((flat[:, None] >> torch.arange(bits, device=flat.device)) & 1).bool()
    return pack_mask(planes.reshape(-1))


def unpack_indices(packed: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``count`` int64 positions."""
    bits = index_bits(m)
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


# ==============================================================================================
# the compressed file


def write_compressed(model: nn.Module, folder: Path, n: int, m: int) -> dict:
    """Write ``<folder>/compressed.safetensors`` for an N:M-sparse model; returns byte counts.

    Keys: ``nm.<layer>.values`` / ``nm.<layer>.indices`` per prunable layer, ``dense.<state key>`` for
    everything else (a tensor shared by several keys, e.g. tied embeddings, is stored once; the others
    are listed as aliases). The metadata holds the format, N, M, index bits, shapes and dtypes as JSON.
    """
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
        layer_meta[name] = {"shape": list(w.shape), "dtype": dtype_name(w.dtype)}
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
    meta = {"format": COMPRESSED_FORMAT, "n": str(n), "m": str(m), "index_bits": str(index_bits(m)),
            "layers": json.dumps(layer_meta), "aliases": json.dumps(aliases),
            "dtype": dtype_name(next(model.parameters()).dtype)}
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
    data = load_tensors(path)
    n, m = int(meta["n"]), int(meta["m"])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[meta["dtype"]], trust_remote_code=trust_remote_code)
    as_linears(model)  # the compressed file names experts one Linear each, as the run did
    state: dict[str, torch.Tensor] = {k[len("dense."):]: v for k, v in data.items() if k.startswith("dense.")}
    for name, lm in json.loads(meta["layers"]).items():
        state[f"{name}.weight"] = decompress_nm(data[f"nm.{name}.values"], data[f"nm.{name}.indices"],
                                                tuple(lm["shape"]), n, m)
    for alias, src in json.loads(meta.get("aliases", "{}")).items():
        state[alias] = state[src]
    model.load_state_dict(state, strict=True)
    restore_layouts(model)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# ==============================================================================================
# semi-structured 2:4 kernels (PyTorch, NVIDIA compute capability >= 8.0): a research path, to be measured


def to_semi_structured(model: nn.Module) -> dict:
    """Swap every 2:4-sparse prunable Linear weight for a ``torch.sparse`` semi-structured tensor, in place.

    Needs the model on an NVIDIA GPU with compute capability >= 8.0, in float16 or bfloat16. Layers that
    are not 2:4 sparse or whose shape the kernels do not take are left dense and listed under ``skipped``.
    Returns ``{"converted": [names], "skipped": {name: why}, "backend": "cusparselt" | "cutlass"}``; raises
    :class:`UserError` without such a GPU. Whether the converted model is faster is for
    ``scripts/bench_semi_structured.py`` to measure: no serving engine runs these tensors.
    """
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
            skipped[name] = f"{dtype_name(w.dtype)}: the kernels take float16 / bfloat16"
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
