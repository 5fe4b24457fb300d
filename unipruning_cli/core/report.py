"""Human-facing output of a run: the final rich table and ``summary.md``."""

from __future__ import annotations

import itertools

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .progress import console
from .rundir import atomic_write_text



def method_label(metrics: dict) -> str:
    """A run's method as its summaries title it: the method's own label (``sparsegpt``, ``local (wanda)``,
    ``unipruning (stochria)``), or for a run made before labels, its name and local metric."""
    return metrics.get("method_label") or f"{metrics['method']} ({(metrics.get('local_metric') or {}).get('name')})"


def _calibration_tokens(metrics: dict) -> str:
    tokens = (metrics.get("calibration") or {}).get("tokens")
    return "none" if tokens is None else f"{tokens:,} tokens"


def _calibration_md(c: dict) -> str:
    """The calibration line of ``summary.md`` (``none`` for a method that read no calibration data)."""
    if not c or "nsamples" not in c:
        return "none"
    return f"{c['nsamples']} x {c['seqlen']} tokens from {c['source']} ({c.get('mode', 'search')})"

def _rows(metrics: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for corpus, r in metrics["perplexity"].items():
        dense = r["dense"]["ppl"] if r["dense"] else float("nan")
        p = r["pruned"]
        rows.append((corpus, str(p["seqlen"]), str(p["windows"]), f"{dense:.3f}", f"{p['ppl']:.3f}"))
    return rows


def print_summary(metrics: dict, run_dir: Path) -> None:
    s = metrics["sparsity"]
    table = Table(title=escape(f"{metrics['model']['name']} | {method_label(metrics)} | {metrics['pattern']}"))
    for col in ("corpus", "seqlen", "windows", "dense PPL", "pruned PPL"):
        table.add_column(col, justify="right" if col != "corpus" else "left")
    for row in _rows(metrics):
        table.add_row(*map(escape, row))
    console.print(table)
    if len(metrics.get("results", {})) > 1:
        more = Table(title="every cut of this run")
        for col in ("masks", "measured sparsity", *[f"PPL {c}" for c in metrics["perplexity"]]):
            more.add_column(col)
        for tag, r in metrics["results"].items():
            more.add_row(tag, f"{r['measured_sparsity']:.4f}", *[f"{v:.3f}" for v in r["ppl"].values()])
        console.print(more)
    console.print(f"measured sparsity: {s['overall']:.4f} of {s['prunable_params']:,} prunable weights "
                  f"({s['overall_all_params']:.4f} of all {s['all_params']:,} parameters); "
                  f"calibration {_calibration_tokens(metrics)}; total {metrics['seconds']['total']:.0f} s; "
                  f"peak RSS {metrics['memory']['peak_rss_mib']:.0f} MiB", markup=False)
    console.print(f"run directory: {run_dir}", markup=False)


def _results_md(metrics: dict) -> list[str]:
    """One row per set of masks cut in this run (UniPruning cuts several from one Γ)."""
    results = metrics.get("results", {})
    if len(results) <= 1:
        return []
    corpora = list(metrics["perplexity"])
    lines = ["| masks | measured sparsity | " + " | ".join(f"PPL {c}" for c in corpora) + " |",
             "|---|---|" + "---|" * len(corpora)]
    for tag, r in results.items():
        lines.append(f"| {tag} | {r['measured_sparsity']:.4f} | " + " | ".join(f"{r['ppl'][c]:.3f}" for c in corpora) + " |")
    return lines + [""]


def _best_md(metrics: dict) -> list[str]:
    """Per target, the lowest perplexity (first corpus) of a model that keeps the original weights times a mask and of
    one whose kept weights were updated (``reconstruct``, or a method such as SparseGPT), each with the cut it
    comes from: a cut with ``reconstruct=obs`` counts in both, by its ``weights_kept`` evaluation."""
    results = metrics.get("results", {})
    if not metrics["perplexity"] or not any("reconstruction" in r or r.get("weights") for r in results.values()):
        return []
    corpus = next(iter(metrics["perplexity"]))
    best: dict[str, dict[str, tuple[float, str]]] = {}
    for tag, r in results.items():
        _, kind, sp = _parse_tag(tag)
        row = best.setdefault(f"{sp:.0%}" if kind == "unstructured" else kind, {})
        updated = "reconstruction" in r or r.get("weights") == "updated"
        found = [("updated" if updated else "kept", r["ppl"][corpus])]
        if "weights_kept" in r:
            found.append(("kept", r["weights_kept"]["ppl"][corpus]))
        for how, ppl in found:
            row[how] = min(row.get(how, (ppl, tag)), (ppl, tag))
    cell = (lambda got: f"{got[0]:.3f} (`{got[1]}`)" if got else "")
    return [f"Best PPL on {corpus} per target, original weights times a mask and with the kept weights updated:", "",
            "| target | weights kept | weights updated |", "|---|---|---|",
            *[f"| {t} | {cell(row.get('kept'))} | {cell(row.get('updated'))} |" for t, row in best.items()], ""]


def _comparison_md(metrics: dict) -> list[str]:
    """A UniPruning run with ``eval.baselines``: one row per target, the run's cut beside each baseline's, the lowest
    perplexity in bold (on the first corpus), and how far the run's is from the best baseline's."""
    results = metrics.get("results", {})
    sources = list(dict.fromkeys(_parse_tag(t)[0] for t in results if ":" in t))
    if not sources or not metrics["perplexity"]:
        return []
    corpus = next(iter(metrics["perplexity"]))
    targets: dict[str, dict[str, float]] = {}
    for tag, r in results.items():
        source, kind, sp = _parse_tag(tag)
        key = (f"{sp:.0%}" if kind == "unstructured" else f"{sp:.0%} of {kind}" if kind.startswith(("channels", "heads"))
               else (f"{sp:.0%}" if sp < 1 else f"{sp:g}") + f" of experts ({kind.split(' ', 1)[1]})"
               if kind.startswith("experts") else kind)
        targets.setdefault(key, {})[source or metrics["method"]] = r["ppl"][corpus]
    cols = [metrics["method"], *sources]
    lines = [f"PPL on {corpus}, every method at the same targets from the same calibration samples:", "",
             "| target | " + " | ".join(cols) + " | vs best baseline |", "|---|" + "---|" * (len(cols) + 1)]
    for key, row in targets.items():
        best = min(row.values())
        cells = [("" if c not in row else f"**{row[c]:.3f}**" if row[c] == best else f"{row[c]:.3f}") for c in cols]
        others = [row[c] for c in sources if c in row]
        diff = f"{row[cols[0]] / min(others) - 1:+.1%}" if cols[0] in row and others else ""
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {diff} |")
    return lines + [""]


def _parse_tag(tag: str) -> tuple[str | None, str, float]:
    """'wanda:s0.60_per_row' -> ('wanda', 'unstructured', 0.6); '2of4' -> (None, '2:4', 0.5); 's0.20_channels' ->
    (None, 'channels', 0.2), 0.2 being the share of MLP channels removed."""
    from ..pruning.targets import EXPERTS_TAG, is_sliced_tag, nm_of_tag

    source, _, cut = tag.rpartition(":")
    nm = nm_of_tag(cut)
    if nm:
        return source or None, f"{nm[0]}:{nm[1]}", 1 - nm[0] / nm[1]
    experts = EXPERTS_TAG.match(cut)
    if experts:  # 's0.25_experts-reap' -> ('experts reap', 0.25); a count 'k2_...' -> (.., 2.0)
        share, count, score, floor = experts.groups()
        score += f", floor {floor}" if floor else ""
        return source or None, f"experts {score}", float(share) if share else float(count)
    if is_sliced_tag(cut):  # 's0.20_channels' -> 'channels', 's0.33_heads-flap' -> 'heads (FLAP)'
        what = cut.split("_", 1)[1]
        return source or None, what.replace("-flap", " (FLAP)"), float(cut[1:].split("_")[0])
    return source or None, "unstructured", float(cut[1:].split("_")[0])


def save_png(fig, png: Path) -> None:
    """Write ``fig`` to ``png`` atomically (a temporary sibling, then a rename). Raises
    :class:`.rundir.StorageError` naming the file when the storage refuses it: a full disk surfaces in PIL as an
    unrelated ``AttributeError`` raised while it handles the ``OSError``, which is the cause reported here."""
    from .rundir import storage_error

    tmp = png.with_name("." + png.name + ".tmp.png")
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110)
        tmp.replace(png)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        cause = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None or cause.errno is None:
            raise
        raise storage_error(cause, png, f"the plot {png.name}") from err


def ppl_figure(metrics: dict):
    """Perplexity against sparsity, one panel per corpus: one colour per method (the run's, each baseline), its
    unstructured cuts joined by a line and its N:M cuts as other markers at their sparsity; plain numbers on a log
    axis, the cuts' sparsities as percent ticks."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, PercentFormatter, ScalarFormatter

    results, corpora = metrics["results"], list(metrics["perplexity"])
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for tag, r in results.items():
            source, kind, sp = _parse_tag(tag)
            structural = kind.startswith(("channels", "heads", "experts"))  # a channel, head or expert share is no
            at = r.get("measured_sparsity", sp) if structural else sp  # share of the weights
            series.setdefault((source or metrics["method"], kind), []).append((at, r["ppl"][corpus]))
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(dict.fromkeys(m for m, _ in series))}
        markers = {k: mk for k, mk in zip(dict.fromkeys(k for _, k in series if k != "unstructured"),
                                          itertools.cycle("sD^v<>P"))}
        for (method, kind), pts in series.items():
            pts.sort()
            style = ("o-" if len(pts) > 1 else "o") if kind == "unstructured" else markers[kind] + (
                "--" if kind != "unstructured" and ":" not in kind and len(pts) > 1 else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[method], markersize=7,
                    label=method if kind == "unstructured" else f"{method} {kind}")
        dense = metrics["perplexity"][corpus].get("dense")
        if dense:
            ax.axhline(dense["ppl"], color="grey", linestyle="--", label=f"dense {dense['ppl']:.2f}")
        seqlen = metrics["perplexity"][corpus]["pruned"]["seqlen"]
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("sparsity (share of the prunable weights removed)")
        ax.set_ylabel(f"perplexity on {corpus} (seqlen {seqlen}, log scale)")
        ax.set_title(f"{metrics['model']['name']}: perplexity vs sparsity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plots(run_dir: Path, metrics: dict) -> list[str]:
    """PNG pictures of the run; returns their paths relative to the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    results = metrics.get("results", {})
    corpora = list(metrics["perplexity"])
    if results and corpora:
        fig = ppl_figure(metrics)
        save_png(fig, run_dir / "plots" / "ppl_vs_sparsity.png")
        plt.close(fig)
        out.append("plots/ppl_vs_sparsity.png")
    per_layer = metrics.get("sparsity", {}).get("per_layer", {})
    if per_layer:
        names = list(per_layer)
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
        fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.05), 4))
        ax.bar(range(len(names)), [per_layer[n] for n in names], width=1.0,
               color=[colors[n.rsplit(".", 1)[-1]] for n in names])
        for k in kinds:
            ax.bar([0], [0], color=colors[k], label=k)
        ax.axhline(metrics["sparsity"]["overall"], color="black", linestyle="--",
                   label=f"overall {metrics['sparsity']['overall']:.3f}")
        ax.set_xlabel("prunable layer (model order: block by block)")
        ax.set_ylabel("fraction of weights pruned")
        ax.set_ylim(0, 1)
        ax.set_title(f"sparsity per layer: {metrics['pattern']}")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        save_png(fig, run_dir / "plots" / "layer_sparsity.png")
        plt.close(fig)
        out.append("plots/layer_sparsity.png")
    return out


def _zero_shot_md(metrics: dict) -> list[str]:
    zs = metrics.get("zero_shot", {})
    dense, pruned = zs.get("dense") or {}, zs.get("pruned") or {}
    if not pruned:
        return []
    lines = [f"Zero-shot (lm-eval, 0-shot, limit {pruned.get('limit')}, max_length {pruned.get('max_length')}, "
             f"batch size {pruned.get('batch_size', 'not recorded')}):", "",
             "| task | metric | dense | pruned |", "|---|---|---|---|"]
    for task, r in pruned["tasks"].items():
        d = dense.get("tasks", {}).get(task, {}).get(r["metric"])
        lines.append(f"| {task} | {r['metric']} | {'' if d is None else f'{d:.4f}'} | {r[r['metric']]:.4f} |")
    lines.append(f"| mean | | {dense.get('mean', float('nan')):.4f} | {pruned['mean']:.4f} |")
    return lines + [""]


def write_summary_md(path: Path, metrics: dict, plots: list[str] | None = None) -> None:
    s = metrics["sparsity"]
    lines = [
        f"# {metrics['model']['name']}: {method_label(metrics)}, {metrics['pattern']}",
        "",
        "| corpus | seqlen | windows | dense PPL | pruned PPL |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in _rows(metrics)],
        "",
        *_comparison_md(metrics),
        *_best_md(metrics),
        *_results_md(metrics),
        *_zero_shot_md(metrics),
        *[f"![{Path(p).stem}]({p})" for p in (plots or [])],
        "",
        f"- measured sparsity (prunable layers): {s['overall']:.4f} ({s['zeros']:,} of {s['prunable_params']:,})",
        f"- sparsity over all parameters: {s['overall_all_params']:.4f}",
        f"- calibration: {_calibration_md(metrics['calibration'])}, seed {metrics['seed']}",
        f"- seconds per stage: {metrics['seconds']}",
        f"- memory: {metrics['memory']}",
        *_speed_md(metrics),
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _speed_md(metrics: dict) -> list[str]:
    """What the cuts buy at inference time: a structural cut's smaller model, or nothing for zeros stored dense."""
    structure = ((metrics.get("results") or {}).get(metrics["pattern"]) or {}).get("structure")
    if structure and "-floor" in metrics["pattern"]:  # one budget over the layers: their own expert counts
        return ["- size: the layers keep different expert counts (one budget over the layers), which no standard "
                "config holds: this cut is measured here and not exported."]
    if structure:
        before, after = structure["parameters"]
        pattern = "experts" if "experts" in structure else metrics["pattern"].split("_", 1)[1].split("-")[0]
        dtype = str((metrics.get("model") or {}).get("dtype", "torch.float32")).replace("torch.", "")
        size = after * {"float32": 4, "float64": 8}.get(dtype, 2) / 2**20  # the weights, on disk and once loaded
        return [f"- size: `unipruning export <run_dir> pattern={pattern}` writes a standard model of {after:,} "
                f"parameters instead of {before:,} ({1 - after / before:.1%} fewer; about {size:,.1f} MiB of weights "
                f"in {dtype}, on disk and in memory once loaded), which any engine loads; "
                "scripts/bench_structured.py measures its speed and memory against the dense model."]
    return [
        "- speed: none. The zeros are stored dense and the model runs at the dense speed; no mainstream serving "
        "engine runs 2:4 or unstructured sparsity in 2026 (vLLM removed its 2:4 kernels, #36799; TensorRT-LLM the "
        "backend of --weight_sparsity, #15918), so read these numbers as quality at this sparsity. PyTorch's 2:4 "
        "semi-structured kernels remain a research path: scripts/bench_semi_structured.py measures them on a GPU."]


def plot_search(jsonl: Path, png: Path) -> None:
    """Search curves: LM loss and lr (drift mode), mean |Γ| and the fraction of Γ at zero, per step."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig = search_figure(rows)
    save_png(fig, png)
    plt.close(fig)


def search_figure(rows: list[dict]):
    """The figure of :func:`plot_search` from ``search.jsonl``'s rows. Every axis reads at a glance: no offset
    ("1e-8 + 1.00058e-3"), the share of Γ at zero in percent from 0."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    losses = [r["loss"] for r in rows]
    if any(v is not None for v in losses):
        axes[0].plot(steps, losses, label="LM loss")
        ax2 = axes[0].twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", label="lr")
        ax2.set_ylabel("learning rate")
        axes[0].set_ylabel("loss (nats/token)")
        axes[0].set_title("weight drift")
    else:
        axes[0].text(0.5, 0.5, "frozen W: no loss", ha="center", va="center")
        axes[0].set_title("weight mode: frozen")
    for q, style in (("gamma_abs_q10", ":"), ("gamma_abs_q50", "--"), ("gamma_abs_q90", "-.")):
        axes[1].plot(steps, [r[q] for r in rows], style, label=q.replace("gamma_abs_", "|Γ| "))
    axes[1].plot(steps, [r["gamma_abs_mean"] for r in rows], label="mean |Γ|")
    axes[1].set_title("saliency |Γ|")
    axes[1].set_ylabel("|Γ|")
    axes[1].legend(fontsize=8)
    zero = [r["gamma_zero_frac"] for r in rows]
    axes[2].plot(steps, zero)
    axes[2].set_title("share of Γ at zero")
    axes[2].set_ylabel("share of the prunable weights")
    axes[2].set_ylim(0, max(max(zero) * 1.15, 1e-4))
    axes[2].yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    twin = [ax2] if any(v is not None for v in losses) else []
    for ax in axes:
        ax.set_xlabel("step")
    for ax in (axes[0], axes[1], *twin):
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.tight_layout()
    return fig
