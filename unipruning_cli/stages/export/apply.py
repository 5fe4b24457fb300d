"""Applying masks to the original model and publishing the result as an HF folder, from a run or a masks file.

Exporting a run means loading the original model again, applying the masks of the asked cut (held by
the run, or cut from its Γ) and saving an ordinary Hugging Face folder (``save_pretrained``, safetensors)
with the tokenizer and a model card; applying a masks file does the same with any masks file and model.

Everything that can be checked without a model is checked first (run directory complete, cut available,
output folder free), so a bad request fails in about two seconds. The output folder is written to a
temporary sibling and renamed into place; an existing folder is replaced only with ``--force``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from torch import nn

from ...core.config import ModelConfig, complete_run_config
from ...core.errors import UserError
from ...core.inputs import check_same_inputs, model_folder, recording
from ...pruning.mask_files import load_masks, read_masks_header
from ...pruning.mask_solvers import MASK_SOLVERS
from ...pruning.experts import experts_of_masks, moe_layers, remove_experts
from ...pruning.heads import slice_heads
from ...pruning.targets import is_channels_tag, is_experts_tag, is_heads_tag, nm_of_tag
from ...pruning.weights import apply_masks
from ...models.loading import check_model_reachable, load_model, prunable_layers
from ...core.context import RunContext
from ..reconstruction import compensate_cut, reconstruct_cut, refit_cut
from ...pruning.channels import give_mlp_bias, slice_channels
from .card import export_record, kept_counts, masks_card, run_card
from ...core.rundir import run_lock
from ..storage import check_free
from .folder import (COMPRESSED_FILE, DTYPES, check_mask_shapes, check_out, folder_bytes, precheck_shapes,
                     protected_sources, save_hf, staging_folder, weights_bytes)
from .nm import write_compressed
from .run import load_or_cut, masks_source, open_run, resolve_dtype_for_run, resolve_target

log = logging.getLogger(__name__)


def _publish(model: nn.Module, tok, out: Path, force: bool, nm: Optional[tuple[int, int]], card) -> dict:
    """Save the HF folder (+ compressed file) into a staging folder, write the card, rename into place."""
    with staging_folder(out, force) as tmp:
        save_hf(model, tok, tmp)
        compressed = write_compressed(model, tmp, *nm) if nm else None
        sizes = [("dense weights (model*.safetensors)", weights_bytes(tmp))]
        if compressed:
            sizes.append((COMPRESSED_FILE, compressed["file_bytes"]))
        text, record = card(sizes, compressed)
        (tmp / "README.md").write_text(text, encoding="utf-8")
        (tmp / "unipruning_export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        written_bytes = folder_bytes(tmp)
    return {"folder_bytes": written_bytes, "sizes": sizes, "compressed": compressed}


def export_run(run_dir: str | Path, *, sparsity: Optional[float] = None, pattern: Optional[str] = None,
               allocation: Optional[str] = None, dtype: Optional[str] = None, out: Optional[str | Path] = None,
               compressed: bool = False, force: bool = False, allow_changed_model: bool = False) -> dict:
    """Export one cut of a run as an HF folder; returns what was written (see ``export_command``).

    Before the model loads: the run is complete and holds (or its Γ can cut) the cut; ``out`` is free, writable, has
    room for the weights, and is no model source or cache (:func:`.folder.check_out`); the model's files are the ones
    the run read (:func:`...core.inputs.check_same_inputs`; ``allow_changed_model`` lets a changed model through, recorded
    in the card's record). Raises :class:`UserError` for each."""
    run = open_run(run_dir)
    target = resolve_target(run, sparsity, pattern, allocation)
    _check_standard(target.tag)
    if compressed and not target.is_nm:
        raise UserError(f"--compressed needs an N:M pattern (e.g. pattern=2:4); {target.tag} is unstructured, whose "
                        f"positions cost more to store than the zeros save")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    source = masks_source(run, target)
    if source == "gamma" and run.cfg.refine == "swap":
        raise UserError(f"run {run.path} refined its masks (refine=swap), and it holds no {target.tag} cut: one cut "
                        f"from Γ here would not be refined. Evaluate that cut first (unipruning eval {run.path} "
                        f"{'pattern=%d:%d' % (target.n, target.m) if target.is_nm else 'sparsity=%g' % target.sparsity}"
                        "), which refines and saves it, then export it")
    out_path = Path(out).expanduser() if out is not None else run.path / "export" / target.tag
    cfg = resolve_dtype_for_run(run)
    check_out(out_path, force, protect=[run.path], sources=protected_sources(cfg.model))
    check_model_reachable(cfg.model)
    changed = check_same_inputs(run.metrics.get("inputs"), cfg.model, f"run {run.path}", allow_changed_model, False)
    check_export_space(cfg.model, out_path, dtype)
    if source == "file":  # nothing is written into the run: a finished run on read-only storage exports too
        masks = load_or_cut(run, target, source)
    else:
        with run_lock(run.path, "export"), recording(run.metrics.get("inputs")):
            masks = load_or_cut(run, target, source)

    model, tok = load_model(cfg.model)
    changed += check_same_inputs(run.metrics.get("inputs"), cfg.model, f"run {run.path}", allow_changed_model, True)
    layers = prunable_layers(model)
    check_mask_shapes(layers, masks, f"{run.mask_path(target.tag)}")
    rebuilt = cfg.reconstruct in MASK_SOLVERS or (cfg.reconstruct == "ls" and target.is_sliced) or (
        cfg.reconstruct == "bias" and target.is_channels)
    if rebuilt:  # the run evaluated W updated on the mask, not W x mask: the same update, redone here
        log.info("the run updated the kept weights (reconstruct=%s): redoing it on %s's calibration samples",
                 cfg.reconstruct, target.tag)
        {"obs": reconstruct_cut, "admm": reconstruct_cut, "ls": refit_cut, "bias": compensate_cut}[cfg.reconstruct](
            RunContext(cfg).loaded(model, tok), masks)
    else:
        apply_masks(layers, masks)
    kept = kept_counts(model)
    expected = (run.metrics.get("results") or {}).get(target.tag, {}).get("measured_sparsity")
    if expected is not None and abs(expected - kept["measured_sparsity"]) > 1e-9:
        log.warning("measured sparsity %.6f differs from the run's %.6f: did the model at %s change since the run?",
                    kept["measured_sparsity"], expected, cfg.model.path)
    structure = slice_structure(model, masks, target.tag)
    if structure and cfg.reconstruct == "bias" and give_mlp_bias(model, masks):  # the compensation's biases
        log.info("reconstruct=bias: mlp_bias=true in the config, zero biases for the MLP matrices without one")
    if structure:
        kept = kept_counts(model)
    if dtype is not None and DTYPES[dtype] != next(model.parameters()).dtype:
        model.to(DTYPES[dtype])
        kept = kept_counts(model)  # what is saved (float16 may flush tiny weights to zero)
    model_dtype = next(model.parameters()).dtype
    nm = (target.n, target.m) if compressed else None

    def card(sizes, comp):
        record = export_record({"run": str(run.path), "tag": target.tag,
                                "masks": "file" if source == "file" else "cut from gamma",
                                "method": run.method, "sparsity": target.sparsity, "allocation": target.allocation,
                                "pattern": (f"{target.n}:{target.m}" if target.is_nm else
                                            target.allocation if target.is_structural else "unstructured"),
                                "weights": _weights_note(cfg.reconstruct if rebuilt else "none"),
                                **({"structure": structure} if structure else {}),
                                **({"changed_model": changed} if changed else {})},
                               kept, sizes, comp, model_dtype)
        return _changed_note(changed, run_card(run, target, source, kept, sizes, model_dtype, comp, structure)), record

    written = _publish(model, tok, out_path, force, nm, card)
    return {"out": out_path.resolve(), "tag": target.tag, "target": target, "source": source, "kept": kept,
            "dtype": model_dtype, **written}


def _check_standard(tag: str) -> None:
    """Refuse, before any weight is read, a cut no standard config can express: experts under one budget over the
    layers (``pattern.experts_floor``), whose layers keep different counts."""
    if is_experts_tag(tag) and "-floor" in tag:
        raise UserError(f"{tag}: one budget over the layers leaves them different expert counts, which no standard "
                        "config holds (one num_experts): it is measured by the run, not exported; prune without "
                        "pattern.experts_floor for an exportable cut")


def slice_structure(model: nn.Module, masks: dict, tag: str) -> Optional[dict]:
    """Slice a structural cut's removed parts out of ``model`` (masks applied): the channels of a channels cut
    (:func:`...pruning.channels.slice_channels`), the experts and their router rows of an experts cut
    (:func:`...pruning.experts.remove_experts`), the KV groups of a heads cut (:func:`...pruning.heads.slice_heads`);
    ``tag`` says which. Returns what was removed, None for a mask."""
    if is_channels_tag(tag):
        structure = slice_channels(model, masks)
        log.info("pattern=channels: %s %d -> %d, parameters %d -> %d", structure["field"], *structure["width"],
                 *structure["parameters"])
        return structure
    if is_heads_tag(tag):
        structure = slice_heads(model, masks)
        log.info("pattern=heads: num_key_value_heads %d -> %d, num_attention_heads %d -> %d, parameters %d -> %d",
                 *structure["kv_heads"], *structure["heads"], *structure["parameters"])
        return structure
    if is_experts_tag(tag):
        try:
            keeps = {layer.experts: experts_of_masks(masks, layer) for layer in moe_layers(model)}
        except (KeyError, ValueError) as err:
            raise UserError(f"{tag}: the masks are not whole experts of this model ({err})") from None
        structure = remove_experts(model, keeps).structure
        log.info("pattern=experts: %s %d -> %d, parameters %d -> %d", structure["field"], *structure["experts"],
                 *structure["parameters"])
        return structure
    return None


def _weights_note(reconstruct: str) -> str:
    return {"obs": "reconstructed (OBS on the fixed mask)", "admm": "reconstructed (ALPS's ADMM on the fixed mask)",
            "ls": "the projection after the channels refit by least squares on the kept ones",
            "bias": "FLAP's bias compensation of the projection after the channels"}.get(reconstruct,
                                                                                                  "original x mask")


def _changed_note(changed: list[str], card: str) -> str:
    """``card`` opening with a warning where ``--allow-changed-model`` let other weights through (no figure in it is
    theirs), after its YAML front matter, so the hub still reads the metadata."""
    if not changed:
        return card
    note = ("> **Warning: these weights are not the ones the masks were cut for and measured on** (exported with "
            "`--allow-changed-model`: " + "; ".join(changed) + "). The figures below describe the original run, not "
            "this model.\n\n")
    if card.startswith("---\n") and (end := card.find("\n---\n", 4)) != -1:
        head = card[: end + 5]
        return head + "\n" + note + card[end + 5:].lstrip("\n")
    return note + card


def check_export_space(model_cfg, out: Path, dtype: Optional[str]) -> None:
    """Room for the exported folder on ``out``'s file system: the model folder's weight files, scaled from the dtype its
    ``config.json`` names to the dtype the export saves (``dtype``, else the one the model loads in). A hub model not
    cached yet is not checked (its size is unknown before the download). Raises :class:`UserError`."""
    from ...models.loading import resolve_device, resolve_dtype

    folder = model_folder(model_cfg)
    if folder is None:
        return
    weights = weights_bytes(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        stored = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")))
    except (OSError, ValueError):
        stored = None
    saved = DTYPES[dtype] if dtype in DTYPES else resolve_dtype(model_cfg.dtype, resolve_device(model_cfg.device))
    if stored is not None:
        weights = weights * saved.itemsize // stored.itemsize
    check_free(out, weights + 2**24, "the exported folder")


# ==============================================================================================
# a masks file on any model


def _model_cfg_for(model_arg: str):
    """(model config, what it is) for a run directory or an HF folder."""
    p = Path(model_arg).expanduser()
    if (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        try:
            cfg = complete_run_config(OmegaConf.load(p / "config.yaml"))
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
                     dtype: Optional[str] = None, compressed: bool = False, allow_changed_model: bool = False) -> dict:
    """Apply a masks file to an original model and save the result as an HF folder (``apply_command``). The model must
    be the one the masks were cut for (their header's ``inputs``), unless ``allow_changed_model``; ``out`` is checked
    as for an export. Raises :class:`UserError`."""
    masks_path = Path(masks_path).expanduser()
    shapes, info = read_masks_header(masks_path)
    model_cfg, what = _model_cfg_for(str(model_arg))
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    nm = nm_of_tag(info.get("target", ""))
    _check_standard(info.get("target", ""))
    if info.get("reconstruct") in (*MASK_SOLVERS, "ls", "bias"):
        how = info["reconstruct"]
        raise UserError(f"{masks_path.name} comes from a run with reconstruct={how}: its model is the kept weights "
                        f"updated by {dict(obs='OBS reconstruction', admm='ADMM reconstruction', ls='a least-squares refit').get(how, 'a bias')}, "
                        "which the "
                        "masks alone do not hold (applying them would give W x mask, another model). Export that run "
                        "instead (unipruning export <run_dir>): it redoes the update on the run's calibration samples")
    if compressed and nm is None:
        raise UserError(f"--compressed needs N:M masks; {masks_path.name} holds {info.get('target', 'unknown')!r}")
    out_path = Path(out).expanduser()
    protect = [masks_path] + ([Path(model_arg)] if Path(model_arg).exists() else [])
    check_out(out_path, force, protect=protect, sources=protected_sources(model_cfg))
    check_model_reachable(model_cfg)
    changed = check_same_inputs(info.get("inputs"), model_cfg, f"the masks file {masks_path}", allow_changed_model,
                                False)
    check_export_space(model_cfg, out_path, dtype)
    if model_cfg.source == "local":
        precheck_shapes(Path(model_cfg.path).expanduser(), shapes, str(masks_path))
    masks = load_masks(masks_path)

    model, tok = load_model(model_cfg)
    changed += check_same_inputs(info.get("inputs"), model_cfg, f"the masks file {masks_path}", allow_changed_model,
                                 True)
    layers = prunable_layers(model)
    check_mask_shapes(layers, masks, str(masks_path))
    apply_masks(layers, masks)
    slice_structure(model, masks, info.get("target", ""))  # whole channels or experts: sliced out, as export does
    if dtype is not None and DTYPES[dtype] != next(model.parameters()).dtype:
        model.to(DTYPES[dtype])
    kept = kept_counts(model)
    model_dtype = next(model.parameters()).dtype

    def card(sizes, comp):
        record = export_record({"masks": str(masks_path), "model": what, "target": info.get("target"),
                                **({"changed_model": changed} if changed else {})},
                               kept, sizes, comp, model_dtype)
        text = masks_card(str(model_cfg.path), what, masks_path, info, nm, kept, sizes, model_dtype)
        return _changed_note(changed, text), record

    written = _publish(model, tok, out_path, force, nm if compressed else None, card)
    return {"out": out_path.resolve(), "kept": kept, "dtype": model_dtype, "nm": nm, **written}
