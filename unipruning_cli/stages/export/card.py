"""The model card (README.md) and record (unipruning_export.json) of an exported folder, and its speed notes.

The card says what the model is (base model, method, cut, calibration), the perplexity the run measured,
how many weights are kept as saved, how large the files are, and what the zeros buy at inference time: on the
serving engines of 2026, nothing (:func:`speed_note`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ...pruning.masks import count_zeros
from ...pruning.targets import Target, is_experts_tag, is_sliced_tag
from ...models.loading import prunable_layers
from .folder import COMPRESSED_FILE, dtype_name, mib
from .nm import index_bits
from .run import RunInfo


def kept_counts(model: nn.Module) -> dict:
    """Zeros counted in the weights as they will be saved (prunable layers, and every parameter)."""
    per_layer, zeros, total = {}, 0, 0
    for name, lin in prunable_layers(model).items():
        z = count_zeros(lin.weight)
        per_layer[name] = z / lin.weight.numel()
        zeros += z
        total += lin.weight.numel()
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(count_zeros(p) for p in model.parameters())
    return {"measured_sparsity": zeros / total if total else 0.0, "prunable_params": total,
            "prunable_kept": total - zeros, "all_params": all_params, "all_kept": all_params - all_zeros,
            "per_layer": per_layer}


#: Why no engine speed is promised (peers-2026: each is a public issue or PR); written into cards and summaries.
ENGINES_2026 = ("vLLM removed its 2:4 kernels (vLLM #36799) and refuses any sparsity_config (#51188), TensorRT-LLM "
                "removed the backend that held --weight_sparsity (#15918), and torchao deleted its sparsity code")


def speed_note(n: int = 0, m: int = 0) -> str:
    """One plain sentence on what the zeros buy at inference time: nothing on the serving engines of 2026
    (:data:`ENGINES_2026`); for 2:4, PyTorch's semi-structured kernels as a research path, with the project's own
    bench to measure them (no figure is claimed without that measurement)."""
    if n == 2 and m == 4:
        return ("Stored dense, this model runs at the dense speed, and no mainstream serving engine runs 2:4 "
                f"sparsity any more: {ENGINES_2026}. Read it as a quality result at 2:4. PyTorch's "
                "torch.sparse.to_sparse_semi_structured still runs 2:4 matmuls on NVIDIA GPUs of compute capability "
                ">= 8.0 as a research path (unipruning_cli.stages.export.to_semi_structured); "
                "scripts/bench_semi_structured.py times it against the dense forward on your GPU, and no speed is "
                "claimed here without that measurement.")
    if n:
        return (f"Stored dense, this model runs at the dense speed; no engine has {n}:{m} kernels. --compressed "
                "only shrinks the file (load_compressed rebuilds the dense model).")
    return ("Unstructured zeros give no speed-up when stored dense: the file and the matmuls are as large as the "
            f"dense model's, and no mainstream serving engine runs unstructured sparsity ({ENGINES_2026}).")


def short_speed(n: int, m: int) -> str:
    """:func:`speed_note` in a few words, for the command's summary."""
    if n == 2 and m == 4:
        return ("none: stored dense, and no mainstream serving engine runs 2:4 any more (PyTorch's semi-structured "
                "kernels remain a research path: measure them with scripts/bench_semi_structured.py)")
    if n:
        return f"none: stored dense, and no engine has {n}:{m} kernels (--compressed only shrinks the file)"
    return "none: unstructured zeros stored dense run at the dense speed"


def export_record(fields: dict, kept: dict, sizes: list[tuple[str, int]], compressed: Optional[dict],
                  dtype: torch.dtype) -> dict:
    """The ``unipruning_export.json`` record: ``fields``, the saved dtype, sizes, compressed bytes, kept counts."""
    return {**fields, "dtype": dtype_name(dtype), "sizes": dict(sizes), "compressed": compressed,
            **{k: v for k, v in kept.items() if k != "per_layer"}}


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
    lines += [f"- {name}: {n:,} bytes ({mib(n)})" for name, n in sizes]
    lines += ["", "## Speed", "", speed, ""] + extra
    return "\n".join(lines).rstrip() + "\n"


def run_card(run: RunInfo, target: Target, source: str, kept: dict, sizes: list[tuple[str, int]],
             dtype: torch.dtype, compressed: Optional[dict], structure: Optional[dict] = None) -> str:
    """The card of a cut exported from a run (``unipruning export``); ``structure``: what a channels cut removed
    (:func:`...pruning.channels.slice_channels`)."""
    mt = run.metrics
    calib = mt.get("calibration", {}) or {}
    metric = mt.get("local_metric") or {}
    metric_name = metric.get("name", "?") if isinstance(metric, dict) else str(metric)
    knobs = {k: v for k, v in metric.items() if k != "name"} if isinstance(metric, dict) else {}
    model = mt.get("model", {})
    rows = [("base model", f"{model.get('name', run.cfg.model.name)} ({model.get('location', run.cfg.model.path)})"),
            ("method", run.method),
            ("anchor metric" if run.searches else "metric",
             metric_name + (f" {json.dumps(knobs)}" if knobs else "")),
            ("sparsity", f"{target.sparsity:g}"),
            ("pattern", f"{target.n}:{target.m}" if target.is_nm else
             "channels (whole MLP channels removed)" if target.is_channels else
             "heads (whole KV groups of attention heads removed)" if target.is_heads else
             f"experts (whole experts removed, ranked by {target.score})" if target.is_experts else "unstructured"),
            ("allocation", "N:M groups along the input dimension" if target.is_nm else
             "the same share of every MLP's channels" if target.is_channels else
             "the same share of every attention layer's KV groups" if target.is_heads else
             "the same number of experts from every MoE layer" if target.is_experts else target.allocation),
            ("calibration", f"{calib.get('source', '?')}: {calib.get('nsamples', '?')} "
                            f"{'documents truncated at' if calib.get('sampling') == 'documents' else 'windows x'} "
                            f"{calib.get('seqlen', '?')} tokens = {calib.get('tokens', '?')} tokens"
                            + (f", sampling {calib['sampling']}" if calib.get("sampling") else "")
                            + (f", {calib['mode']}" if calib.get("mode") else "")),
            ("masks", f"{target.tag} from {'the run' if source == 'file' else 'Γ (gamma.safetensors), cut at export'}"),
            ("weights dtype", dtype_name(dtype)),
            ("run", str(run.path))]
    if run.searches:
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
                 f"in-group positions ({index_bits(target.m)} bits each) per prunable layer, the other tensors "
                 f"dense. Prunable tensors: {compressed['prunable_compressed_bytes']:,} bytes instead of "
                 f"{compressed['prunable_dense_bytes']:,} ({compressed['prunable_ratio']:.3f}x). It is a storage "
                 "format: it saves disk and download, not inference time. Load it with "
                 "`unipruning_cli.stages.export.load_compressed(folder)` (needs config.json from this folder), which "
                 "rebuilds the dense model.", ""]
    speed = speed_note(target.n, target.m)
    if structure:
        (width, new_width), (params, new_params) = (structure.get("width") or structure.get("kv_heads")
                                                    or structure["experts"]), structure["parameters"]
        what = "with fewer experts to hold" if "experts" in structure else "with smaller matmuls"
        speed = (f"A structural cut: the saved model is a standard {structure['field']}={new_width} model (was "
                 f"{width}), {new_params:,} parameters instead of {params:,} ({1 - new_params / params:.1%} fewer), "
                 f"which any engine loads with no special support and runs {what}. How much time that "
                 "saves depends on the engine and the hardware: scripts/bench_structured.py measures it against the "
                 "dense model.")
    return _card(f"{model.get('name', 'model')} pruned to {target.tag} by {run.method}", rows, ppl_lines, kept,
                 sizes, speed, extra)


def _updates_weights(method: str | None) -> bool:
    """Whether the masks' method also changed the kept weights (SparseGPT); False for a method not registered here."""
    from ...pruning.method import METHODS

    try:
        return bool(method) and METHODS.get(method).updates_weights
    except Exception:  # noqa: BLE001 - an unknown or unloadable method: the note cannot be said either way
        return False


def masks_card(model_path: str, what: str, masks_path: Path, info: dict, nm: Optional[tuple[int, int]], kept: dict,
               sizes: list[tuple[str, int]], dtype: torch.dtype) -> str:
    """The card of a masks file applied to a model (``unipruning apply``)."""
    n, m = nm or (0, 0)
    channels, experts = is_sliced_tag(info.get("target", "")), is_experts_tag(info.get("target", ""))
    rows = [("base model", what), ("masks", f"{masks_path} ({info.get('target', '?')}, "
                                            f"method={info.get('method', '?')})"),
            ("pattern", f"{n}:{m}" if nm else "channels or heads (whole rows and columns, sliced out)" if channels else
             "experts (whole experts and their router rows, sliced out)" if experts else "unstructured"),
            ("weights dtype", dtype_name(dtype))]
    extra = []
    if _updates_weights(info.get("method")):
        extra = [f"Note: these masks come from a {info.get('method')} run, which also reconstructed the kept weights; here "
                 "they are applied to the original weights, which is a different model than the one the run "
                 "measured.", ""]
    speed = ("A structural cut: the removed parts were sliced out, so the saved model is a standard, smaller one "
             "that any engine loads; scripts/bench_structured.py measures its speed." if channels or experts
             else speed_note(n, m))
    return _card(f"{Path(model_path).name} with masks {info.get('target', masks_path.stem)}", rows, [],
                 kept, sizes, speed, extra)
