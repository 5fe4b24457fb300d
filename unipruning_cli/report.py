"""Human-facing output of a run: the final rich table and ``summary.md``."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .progress import console
from .rundir import atomic_write_text


def _rows(metrics: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for corpus, r in metrics["perplexity"].items():
        dense = r["dense"]["ppl"] if r["dense"] else float("nan")
        p = r["pruned"]
        rows.append((corpus, str(p["seqlen"]), str(p["windows"]), f"{dense:.3f}", f"{p['ppl']:.3f}"))
    return rows


def print_summary(metrics: dict, run_dir: Path) -> None:
    s = metrics["sparsity"]
    table = Table(title=f"{metrics['model']['name']} | {metrics['method']} "
                        f"({metrics['local_metric'].get('name')}) | {metrics['pattern']}")
    for col in ("corpus", "seqlen", "windows", "dense PPL", "pruned PPL"):
        table.add_column(col, justify="right" if col != "corpus" else "left")
    for row in _rows(metrics):
        table.add_row(*row)
    console.print(table)
    console.print(f"measured sparsity: {s['overall']:.4f} of {s['prunable_params']:,} prunable weights "
                  f"({s['overall_all_params']:.4f} of all {s['all_params']:,} parameters); "
                  f"calibration {metrics['calibration']['tokens']:,} tokens; total {metrics['seconds']['total']:.0f} s; "
                  f"peak RSS {metrics['memory']['peak_rss_mib']:.0f} MiB")
    console.print(f"run directory: {run_dir}")


def write_summary_md(path: Path, metrics: dict) -> None:
    s = metrics["sparsity"]
    lines = [
        f"# {metrics['model']['name']}: {metrics['method']} ({metrics['local_metric'].get('name')}), {metrics['pattern']}",
        "",
        "| corpus | seqlen | windows | dense PPL | pruned PPL |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in _rows(metrics)],
        "",
        f"- measured sparsity (prunable layers): {s['overall']:.4f} ({s['zeros']:,} of {s['prunable_params']:,})",
        f"- sparsity over all parameters: {s['overall_all_params']:.4f}",
        f"- calibration: {metrics['calibration']['nsamples']} x {metrics['calibration']['seqlen']} tokens from "
        f"{metrics['calibration']['source']} ({metrics['calibration']['mode']}), seed {metrics['seed']}",
        f"- seconds per stage: {metrics['seconds']}",
        f"- memory: {metrics['memory']}",
        "- speed: unstructured zeros are stored dense and give no speed-up by themselves; 2:4 can be accelerated "
        "on NVIDIA Ampere or newer with semi-structured sparse kernels.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
