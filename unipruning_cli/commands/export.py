"""The ``unipruning export`` and ``unipruning apply`` commands: their arguments and what they print."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..core.errors import UserError
from ..core.progress import console_logging
from ..stages.export.apply import apply_masks_file, export_run
from ..stages.export.card import short_speed
from ..stages.export.folder import COMPRESSED_FILE, DTYPES, mib

EXPORT_KEYS = ("sparsity", "pattern", "allocation", "dtype")


def _logging() -> None:
    if logging.getLogger().handlers:
        return
    console_logging()


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{key}={value!r} is not a number") from None


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


def _print_summary(title: str, res: dict, n: int, m: int) -> None:
    k = res["kept"]
    print(title)
    print(f"  parameters kept: {k['prunable_kept']:,} of {k['prunable_params']:,} prunable weights "
          f"(measured sparsity {k['measured_sparsity']:.4f}); {k['all_kept']:,} of {k['all_params']:,} in all")
    sizes = ", ".join(f"{name} {mib(b)}" for name, b in res["sizes"])
    print(f"  folder size: {mib(res['folder_bytes'])} ({sizes})")
    if res.get("compressed"):
        c = res["compressed"]
        print(f"  compressed prunable tensors: {c['prunable_ratio']:.3f}x their dense bytes")
    print(f"  expected speed-up: {short_speed(n, m)}")


def export_command(args: list[str]) -> None:
    """``unipruning export <run_dir> [sparsity=0.6] [pattern=2:4] [allocation=per_matrix] [dtype=bfloat16]
    [--out DIR] [--compressed] [--force] [--allow-changed-model]``"""
    parser = argparse.ArgumentParser(
        prog="unipruning export",
        description="Write a pruned HF model folder (safetensors + tokenizer + README.md card) from a finished run. "
                    "Without options: the run's own cut. key=value options: sparsity=<0..1> and allocation="
                    "per_row|per_matrix|global|owl|gamma for an unstructured cut, pattern=N:M for an N:M cut, "
                    "pattern=channels sparsity=S for whole MLP channels (sliced out: a smaller standard model), dtype=float32|"
                    "bfloat16|float16 for the saved weights (default: the run's). A method=unipruning run can export "
                    "any cut its Γ allows; other runs only the cuts in their masks/ folder.",
        usage="unipruning export <run_dir> [sparsity=S] [pattern=N:M|channels] [allocation=A] [dtype=D] [--out DIR] "
              "[--compressed] [--force]")
    parser.add_argument("items", nargs="*", help="the run directory, then key=value options")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/export/<tag>)")
    parser.add_argument("--compressed", action="store_true",
                        help=f"N:M only: also write {COMPRESSED_FILE} (kept values + bit-packed positions)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--allow-changed-model", action="store_true",
                        help="export although the model's files differ from those the run pruned (recorded)")
    ns = parser.parse_args(args)
    positional, opts = _split_tokens(ns.items, EXPORT_KEYS)
    if len(positional) != 1:
        raise UserError(f"export takes exactly one run directory, got {len(positional)}: {' '.join(positional) or '-'}"
                        f"\n{parser.format_usage().strip()}")
    sparsity = _parse_float("sparsity", opts["sparsity"]) if "sparsity" in opts else None
    _logging()
    res = export_run(positional[0], sparsity=sparsity, pattern=opts.get("pattern"), allocation=opts.get("allocation"),
                     dtype=opts.get("dtype"), out=ns.out, compressed=ns.compressed, force=ns.force,
                     allow_changed_model=ns.allow_changed_model)
    t = res["target"]
    how = "from the run's masks" if res["source"] == "file" else "cut from Γ (masks saved into the run)"
    _print_summary(f"exported {res['tag']} ({how}) to {res['out']}", res, t.n, t.m)


def apply_command(args: list[str]) -> None:
    """``unipruning apply <masks.safetensors> --model <HF folder or run_dir> --out DIR [--force]
    [--allow-changed-model]``"""
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
    parser.add_argument("--allow-changed-model", action="store_true",
                        help="apply although --model is not the model the masks were cut for (recorded)")
    ns = parser.parse_args(args)
    _logging()
    res = apply_masks_file(ns.masks, ns.model, ns.out, force=ns.force, dtype=ns.dtype, compressed=ns.compressed,
                           allow_changed_model=ns.allow_changed_model)
    n, m = res["nm"] or (0, 0)
    _print_summary(f"applied {ns.masks} to {ns.model}: {res['out']}", res, n, m)
