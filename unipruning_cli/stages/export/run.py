"""Reading a finished run for export: is it complete, which cuts it holds, which cut is asked, and its masks.

A run directory stores masks, not weights (see docs/run-directory.md): the pruned model is the
original model times a mask. A UniPruning run keeps its saliency Γ (``gamma.safetensors``), so any
sparsity or N:M pattern can be cut from it at export time, without a forward pass; the new masks are
saved into the run's ``masks/`` folder too. Runs of the other score-based methods can export only the
cuts they hold. SparseGPT reconstructs the kept weights in memory and the run does not store them, so
its runs are refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from ...core.errors import UserError
from ...pruning.mask_files import load_masks, save_masks
from ...core.config import ALLOCATIONS, complete_run_config
from ...pruning.method import METHODS, method_name
from ...pruning.targets import (CHANNELS, EXPERTS, HEADS, NM_TAG as _NM_TAG, Target, is_experts_tag, is_sliced_tag,
                                make_target)
from ...core.rundir import load_tensors
from ..prune import reconstruct_info
from .folder import DTYPES

log = logging.getLogger(__name__)

_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclass
class RunInfo:
    """A finished run: its folder, resolved config and metrics."""

    path: Path
    cfg: Any  # DictConfig
    metrics: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return method_name(self.cfg)

    @property
    def searches(self) -> bool:
        """Whether the run's method learned a Γ that new cuts can be made from (UniPruning)."""
        return _method_class(self.method, self.path).searches

    @property
    def gamma_path(self) -> Path:
        return self.path / "gamma.safetensors"

    def mask_path(self, tag: str) -> Path:
        return self.path / "masks" / f"{tag}.safetensors"


def _method_class(method: str, run: Path):
    """The class of a run's method; :class:`UserError` where it is not registered here (a plugin's, say)."""
    try:
        return METHODS.get(method)
    except Exception as err:  # noqa: BLE001 - unknown, or its module failed to load
        raise UserError(f"run {run} used method={method}, which this installation cannot load ({err}); a method of "
                        f"your own is found through UNIPRUNING_PLUGINS=<its folder>") from None


def _stage_of(method: str, run: Path) -> str:
    return _method_class(method, run).stage


def open_run(path: str | Path) -> RunInfo:
    """Check that ``path`` is a complete run directory and read it; :class:`UserError` otherwise.

    Complete means ``config.yaml``, ``metrics.json`` (written last by a run) and the completion marker
    of the method's stage (``stages/search.json`` for UniPruning, ``stages/prune.json`` otherwise).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"run directory {path} does not exist")
    if not p.is_dir():
        raise UserError(f"{path} is not a run directory (a folder with config.yaml, metrics.json, stages/, masks/)")
    cfg = None
    if (p / "config.yaml").is_file():
        try:
            cfg = complete_run_config(OmegaConf.load(p / "config.yaml"))  # a run of an older version too
            str(cfg.method), cfg.model.path  # noqa: B018  (the keys an export needs)
        except Exception as err:  # noqa: BLE001  (any parse error means the same to the user)
            raise UserError(f"{p / 'config.yaml'} is not a unipruning run config: {err}") from None
    if cfg is not None and _method_class(method_name(cfg), p).updates_weights:
        raise UserError(
            f"run {p} used method={method_name(cfg)}: it reconstructs the kept weights in memory and the run does not "
            f"store them, so the pruned model cannot be rebuilt from the run directory (its masks alone give a "
            f"different model than the one measured). Export a method=local or method=unipruning run, or apply "
            f"the masks to the original weights knowingly with `unipruning apply <masks> --model {p} --out DIR`")
    missing = [f for f in ("config.yaml", "metrics.json") if not (p / f).is_file()]
    if cfg is not None:
        marker = f"stages/{_stage_of(method_name(cfg), p)}.json"
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
    allocation = metrics.get("allocation")
    if cfg.pattern.allocation is None and allocation and not _method_class(method_name(cfg), p).updates_weights:
        # the run's own cut as it resolved it: a null allocation's default has changed before (per matrix -> owl)
        cfg.pattern.allocation = allocation
    return RunInfo(p, cfg, metrics)


def resolve_dtype_for_run(run: RunInfo):
    """A copy of the run's config whose ``model.dtype=auto`` is the dtype the run measured in."""
    cfg = run.cfg.copy()
    recorded = str((run.metrics.get("model") or {}).get("dtype", "")).replace("torch.", "")
    if cfg.model.dtype == "auto" and recorded in DTYPES:
        cfg.model.dtype = recorded  # the dtype the run measured in, whatever this machine would pick
    return cfg


# ==============================================================================================
# cut tags


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
    if is_sliced_tag(tag) or is_experts_tag(tag):  # a structural cut: its pattern, share and score
        kind = tag.split("_", 1)[1].split("-")[0]
        return f"{tag} (pattern={kind}{', ' + tag.split('-', 1)[1] if '-' in tag else ''})"
    if m:
        return f"{tag} (sparsity={float(m.group(1)):g} allocation={m.group(2)})"
    return tag


# ==============================================================================================
# which cut, and its masks


def resolve_target(run: RunInfo, sparsity: Optional[float] = None, pattern: Optional[str] = None,
                   allocation: Optional[str] = None) -> Target:
    """The cut asked for: the run's own one when nothing is given, else built like the run builds its extras.

    ``pattern=N:M`` gives an N:M cut (its sparsity is 1 - N/M); ``pattern=channels`` (or only ``sparsity`` after
    a channels run) a cut of that share of every MLP's channels; otherwise an unstructured cut at ``sparsity``
    (default: the run's) with ``allocation`` (default: the run's, or per_matrix after an N:M or channels run).
    """
    primary = make_target(run.cfg)
    if pattern == EXPERTS or (pattern is None and allocation is None and primary.is_experts):  # whole experts
        if allocation is not None or not primary.is_experts:
            raise UserError("pattern=experts exports a cut the run made (it ranks experts on the run's routing): "
                            f"run {run.path} is a {primary.tag} run; prune with pattern=experts")
        if sparsity is None:
            return primary
        return Target(sparsity=_stored_share(float(sparsity), EXPERTS), allocation=EXPERTS, score=primary.score)
    if pattern == HEADS or (pattern is None and allocation is None and primary.is_heads):  # whole KV groups
        if allocation is not None or (sparsity is not None and not primary.is_heads):
            raise UserError("pattern=heads exports a heads cut the run made: prune with pattern=heads")
        share = primary.sparsity if sparsity is None else float(sparsity)
        return Target(sparsity=_stored_share(share, HEADS), allocation=HEADS, score=primary.score)
    if pattern == CHANNELS or (pattern is None and allocation is None and primary.is_channels):  # whole MLP channels
        if allocation is not None:
            raise UserError(f"allocation={allocation} applies to unstructured cuts, not pattern=channels")
        share = primary.sparsity if sparsity is None else float(sparsity)
        if share == 0:
            raise UserError("sparsity=0: pattern=channels takes a share of channels in (0, 1)")
        return Target(sparsity=_stored_share(share, CHANNELS), allocation=CHANNELS,
                      score=primary.score if primary.is_channels else "")
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
    if allocation is None:
        allocation = primary.allocation if not (primary.is_nm or primary.is_structural) else "per_matrix"
    return primary.unstructured(_stored_share(sparsity, allocation), allocation)


def _stored_share(sparsity: float, allocation: str) -> float:
    """``sparsity`` as a cut's tag stores it (``s<0.xx>_<allocation>``): in [0, 1) with at most two decimals, else
    :class:`UserError` (two values that round alike would share a masks file)."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity={sparsity:g} is out of range: it must satisfy 0 <= sparsity < 1")
    if abs(round(sparsity, 2) - sparsity) > 1e-9:
        raise UserError(f"sparsity={sparsity:g}: use at most two decimals (masks are stored as "
                        f"s{round(sparsity, 2):.2f}_{allocation}, so {sparsity:g} and {round(sparsity, 2):g} would "
                        f"share a file)")
    return round(float(sparsity), 2)


def _unavailable(run: RunInfo, target: Target) -> UserError:
    held = held_tags(run)
    holds = ", ".join(_describe_tag(t) for t in held) if held else "no mask files"
    if run.searches:
        why = f"and its {run.gamma_path.name} is missing, so no new cut can be made"
    else:
        why = (f"and a method={run.method} run keeps no saliency Γ to cut other sparsities from (only "
               f"method=unipruning runs do); prune again with the cut you want")
    return UserError(f"run {run.path} has no {target.tag} cut: it holds {holds}, {why}")


def masks_source(run: RunInfo, target: Target, can_choose: bool = False) -> str:
    """'file' when the run holds the cut, 'gamma' when Γ can cut it; UserError otherwise. ``can_choose``: the caller
    (``unipruning eval``, with the model loaded) picks an ``allocation=auto`` cut's allocation on held-out calibration
    windows (:func:`..allocation.choose_allocations`); export cannot."""
    if run.mask_path(target.tag).is_file():
        return "file"
    if target.allocation == "auto" and not can_choose:
        raise UserError(f"run {run.path} has no {target.tag} cut: allocation=auto is chosen on held-out calibration "
                        f"windows with the model loaded. Evaluate that cut first (unipruning eval {run.path} "
                        f"sparsity={target.sparsity:g}), which chooses and saves it, or export "
                        "allocation=<per_row, owl, ...>")
    if (target.is_sliced and target.score == "flap") or target.is_heads:
        raise UserError(f"run {run.path} has no {target.tag} cut: it holds "
                        f"{', '.join(_describe_tag(t) for t in held_tags(run)) or 'no mask files'}. FLAP's and heads "
                        "cuts are made in the run (from its statistics, the model's head counts): prune with "
                        "export.sparsities=[...]")
    if target.is_experts:
        raise UserError(f"run {run.path} has no {target.tag} cut: it holds "
                        f"{', '.join(_describe_tag(t) for t in held_tags(run)) or 'no mask files'}. Experts are ranked "
                        "on the routing the run measured, so their cuts are made in the run: prune with "
                        f"export.sparsities=[{target.sparsity:g}] (or pattern.experts_removed)")
    if run.searches and run.gamma_path.is_file():
        return "gamma"
    raise _unavailable(run, target)


def load_or_cut(run: RunInfo, target: Target, source: str) -> dict[str, torch.Tensor]:
    """The masks of ``target``: read from the run's file, or cut from Γ and saved into the run's ``masks/``."""
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
                                                  "cut_by": "unipruning export",
                                                  **({"allocation": target.picked} if target.picked else {}),
                                                  **reconstruct_info(run.cfg.reconstruct, target)})
    log.info("cut %s from %s, saved to %s", target.tag, run.gamma_path.name, run.mask_path(target.tag))
    return masks
