"""Sweeps: what a job knows of its sweep (its folder, its λ values), and ``unipruning report <sweep_dir>``.

The report is one table of every job of a sweep and a picture of the grid.

A sweep directory (``unipruning prune -m ...``) holds one subdirectory per job with
``.hydra/overrides.yaml`` and either ``metrics.json`` (done) or ``error.json`` (failed). The report
lists every job with its overrides and metrics (markdown + CSV), marks the best, and draws a heatmap
of perplexity over two swept keys (a line plot for one).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .rundir import atomic_write_text


@dataclass(frozen=True)
class SweepContext:
    """What one job knows of its sweep: the sweep's folder and the λ values its jobs take."""

    dir: Path
    lams: tuple[float, ...] = ()


def sweep_values(sweep: Path, key: str) -> list[str]:
    """The values the sweep in ``sweep`` gives ``key`` (from its ``multirun.yaml``, which Hydra's
    sweeper writes before launching any job); [] when the key is not swept or cannot be enumerated."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    saved = sweep / "multirun.yaml"
    if not saved.exists():
        return []
    task = ((yaml.safe_load(saved.read_text()) or {}).get("hydra", {}).get("overrides", {}) or {}).get("task") or []
    for o in OverridesParser.create().parse_overrides(task):
        if o.key_or_group == key and o.is_sweep_override():
            try:
                return [str(v) for v in o.sweep_iterator()]
            except HydraException:  # e.g. interval(): only a search sweeper can enumerate it
                return []
    return []


def sweep_context(sweep: Path) -> SweepContext:
    lams = []
    for v in sweep_values(sweep, "regularizer.lam"):
        try:
            lams.append(float(v))
        except ValueError:
            continue
    return SweepContext(dir=sweep, lams=tuple(lams))


def collect_jobs(sweep: Path) -> list[dict]:
    jobs = []
    for ov in sorted(sweep.glob("*/.hydra/overrides.yaml"), key=lambda p: _num(p.parent.parent.name)):
        job = ov.parent.parent
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(ov.read_text()) or [])
        entry = {"job": job.name, "dir": str(job), "overrides": overrides}
        if (job / "metrics.json").exists():
            m = json.loads((job / "metrics.json").read_text())
            corpus = next(iter(m["perplexity"]))
            entry |= {"status": "ok", "corpus": corpus, "ppl": m["perplexity"][corpus]["pruned"]["ppl"],
                      "cuts": {t: r["ppl"][corpus] for t, r in m.get("results", {}).items()},
                      "zero_shot": (m.get("zero_shot", {}).get("pruned") or {}).get("mean"),
                      "seconds": m["seconds"]["total"],
                      "search_reused": bool((m.get("calibration") or {}).get("reused_from"))}
        elif (job / "error.json").exists():
            err = json.loads((job / "error.json").read_text())
            entry |= {"status": "failed", "error": f"{err['type']}: {err['error']}"}
        else:
            entry |= {"status": "incomplete", "error": "no metrics.json or error.json (interrupted?)"}
        jobs.append(entry)
    return jobs


def _num(name: str) -> float:
    try:
        return float(name.split("_")[0])
    except ValueError:
        return math.inf


def swept_keys(jobs: list[dict]) -> list[str]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def tables(jobs: list[dict]) -> tuple[str, str]:
    keys = swept_keys(jobs)
    ok = [j for j in jobs if j["status"] == "ok"]
    best = min(ok, key=lambda j: j["ppl"])["job"] if ok else None
    cuts = list(dict.fromkeys(t for j in ok for t in j["cuts"]))
    head = ["job", *keys, "status", *[f"PPL {c}" for c in cuts], "zero-shot mean", "seconds", "error"]
    rows = []
    for j in jobs:
        rows.append([j["job"] + (" (best)" if j["job"] == best else ""), *[j["overrides"].get(k, "") for k in keys],
                     j["status"], *[_fmt(j.get("cuts", {}).get(c)) for c in cuts], _fmt(j.get("zero_shot")),
                     _fmt(j.get("seconds"), 1), j.get("error", "")])
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    md += ["", timing_line(jobs)]
    buf = io.StringIO()
    csv.writer(buf).writerows([head, *rows])
    return "\n".join(md) + "\n", buf.getvalue()


def timing_line(jobs: list[dict]) -> str:
    """What the sweep's caching saved: the jobs' total time against n times the first job (which did the
    uncached work: model load, dense evaluation, calibration statistics)."""
    secs = [j["seconds"] for j in jobs if j["status"] == "ok"]
    if not secs:
        return "no finished job"
    ratio = sum(secs) / (len(secs) * secs[0])
    line = (f"time: {sum(secs):.0f} s for {len(secs)} finished jobs; first job {secs[0]:.0f} s; "
            f"total / ({len(secs)} x first) = {ratio:.3f}")
    reused = sum(bool(j.get("search_reused")) for j in jobs if j["status"] == "ok")
    return line + (f"; {reused} of {len(secs)} jobs reused another job's search" if reused else "")


def _fmt(v, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def plot(jobs: list[dict], png: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = swept_keys(jobs)
    ok = [j for j in jobs if j["status"] == "ok"]
    if not ok or not 1 <= len(keys) <= 2:
        return False
    corpus = ok[0]["corpus"]
    best = min(ok, key=lambda j: j["ppl"])
    if len(keys) == 1:
        k = keys[0]
        pts = sorted((float(j["overrides"][k]), j["ppl"]) for j in ok)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.plot([float(best["overrides"][k])], [best["ppl"]], "r*", markersize=14, label="best")
        ax.set_xlabel(k)
        ax.set_ylabel(f"pruned perplexity ({Path(corpus).name})")
        ax.legend()
    else:
        kx, ky = keys
        xs = sorted({j["overrides"][kx] for j in jobs}, key=float)
        ys = sorted({j["overrides"][ky] for j in jobs}, key=float)
        grid = np.full((len(ys), len(xs)), np.nan)
        for j in ok:
            grid[ys.index(j["overrides"][ky]), xs.index(j["overrides"][kx])] = j["ppl"]
        fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 3, 1.2 * len(ys) + 2.5))
        im = ax.imshow(np.log10(grid), cmap="viridis_r", aspect="auto")
        bar = fig.colorbar(im, ax=ax, label=f"log10 pruned PPL ({Path(corpus).name})")
        bar.formatter.set_useOffset(False)
        bar.update_ticks()
        for yi in range(len(ys)):
            for xi in range(len(xs)):
                text = "failed" if np.isnan(grid[yi, xi]) else f"{grid[yi, xi]:.2f}"
                ax.text(xi, yi, text, ha="center", va="center", color="black" if text != "failed" else "red",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        bx, by = xs.index(best["overrides"][kx]), ys.index(best["overrides"][ky])
        ax.add_patch(plt.Rectangle((bx - 0.5, by - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set_xlabel(kx)
        ax.set_ylabel(ky)
    ax.set_title(f"sweep: pruned perplexity (best: job {best['job']}, {best['ppl']:.2f})")
    fig.tight_layout()
    from .report import save_png

    save_png(fig, png)
    plt.close(fig)
    return True


def report(sweep: Path) -> dict:
    if not sweep.is_dir():
        raise UserError(f"sweep directory {sweep} does not exist")
    jobs = collect_jobs(sweep)
    if not jobs:
        raise UserError(f"{sweep} holds no sweep jobs (no */.hydra/overrides.yaml); is it a `unipruning prune -m` dir?")
    md, csv_text = tables(jobs)
    atomic_write_text(sweep / "report.md", md)
    atomic_write_text(sweep / "report.csv", csv_text)
    has_plot = plot(jobs, sweep / "report.png")
    return {"jobs": jobs, "markdown": md, "plot": has_plot}


def report_command(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="unipruning report", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ns = ap.parse_args(args)
    res = report(ns.sweep_dir)
    print(res["markdown"])
    print(f"wrote {ns.sweep_dir / 'report.md'}, report.csv" + (", report.png" if res["plot"] else ""))
