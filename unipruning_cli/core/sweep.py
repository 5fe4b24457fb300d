"""Sweeps: what a job knows of its sweep (its folder, its λ values), and ``unipruning report <sweep_dir>``.

The report is one table of every job of a sweep and a picture of the grid.

A sweep directory (``unipruning prune -m ...``) holds ``multirun.yaml`` (Hydra's record of the sweep, written
before any job starts) and one subdirectory per job that started, with ``.hydra/overrides.yaml`` and either
``metrics.json`` (done) or ``error.json`` (failed). The report lists every job the sweep asked for (its own list,
from ``multirun.yaml``), with its overrides and metrics (markdown + CSV): jobs that never started and jobs that
started but never ended are rows of their own. It marks the best only when every job ended; otherwise the report
opens with a warning and the row is marked "best of the finished N of M". A heatmap of perplexity over two swept
keys (a line plot for one) shows the same.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
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


def planned_jobs(sweep: Path) -> list[list[str]] | None:
    """The overrides of every job the sweep in ``sweep`` asked for, in launch order (job i is the i-th), as Hydra's
    basic sweeper expands them from the ``multirun.yaml`` it writes before launching any job: the same strings as
    each started job's ``.hydra/overrides.yaml``. None where that list cannot be known: no ``multirun.yaml``, another
    sweeper (a search sweeper chooses its jobs as it goes), or a sweep the basic sweeper cannot expand."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    saved = sweep / "multirun.yaml"
    if not saved.exists():
        return None
    hydra = (yaml.safe_load(saved.read_text()) or {}).get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    given = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]  # the sweeper's own order: params first
    given += (hydra.get("overrides") or {}).get("task") or []
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(given), None)
    except HydraException:  # e.g. a glob over a config group: expanding it needs the config loader
        return None
    return [list(job) for batch in batches for job in batch]


def collect_jobs(sweep: Path) -> list[dict]:
    """Every job of the sweep in ``sweep``: those :func:`planned_jobs` lists, in order (``planned``: True), each
    matched to the folder holding its overrides (status ``ok``, ``failed``, ``incomplete``: started and never ended,
    or ``not started``: no folder), then any folder the list does not hold. Without such a list, the folders alone."""
    started = _started_jobs(sweep)
    planned = planned_jobs(sweep)
    if planned is None:
        return started
    by_overrides: dict[tuple, list[dict]] = {}
    for job in started:
        by_overrides.setdefault(tuple(job["given"]), []).append(job)
    jobs = []
    for num, given in enumerate(planned):
        found = by_overrides.get(tuple(given))
        if found:
            jobs.append({**found.pop(0), "planned": True})
        else:
            jobs.append({"job": str(num), "dir": str(sweep / str(num)), "given": given, "planned": True,
                         "overrides": dict(o.split("=", 1) for o in given), "status": "not started",
                         "error": "no folder: never started (the sweep stopped before it), or its folder was removed"})
    return jobs + [j for rest in by_overrides.values() for j in rest]


def _started_jobs(sweep: Path) -> list[dict]:
    jobs = []
    for ov in sorted(sweep.glob("*/.hydra/overrides.yaml"), key=lambda p: _num(p.parent.parent.name)):
        job = ov.parent.parent
        if (job / "overrides.yaml").is_file():  # the run's own record: Hydra's .hydra/ is rewritten by every launch
            ov = job / "overrides.yaml"
        given = [str(o) for o in yaml.safe_load(ov.read_text()) or []]
        entry = {"job": job.name, "dir": str(job), "given": given, "overrides": dict(o.split("=", 1) for o in given)}
        if (job / "metrics.json").exists():
            m = json.loads((job / "metrics.json").read_text())
            corpus = next(iter(m["perplexity"]), None)  # eval.corpora=[]: a finished job without perplexity
            entry |= {"status": "ok", "corpus": corpus,
                      "ppl": m["perplexity"][corpus]["pruned"]["ppl"] if corpus else None,
                      "cuts": {t: r["ppl"][corpus] for t, r in m.get("results", {}).items()} if corpus else {},
                      "zero_shot": (m.get("zero_shot", {}).get("pruned") or {}).get("mean"),
                      "seconds": m["seconds"]["total"],
                      "search_reused": bool((m.get("calibration") or {}).get("reused_from"))}
        elif (job / "error.json").exists():
            err = json.loads((job / "error.json").read_text())
            entry |= {"status": "failed", "error": f"{err['type']}: {err['error']}"}
        else:
            entry |= {"status": "incomplete", "error": "no metrics.json or error.json (interrupted, or still running)"}
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


def standing(jobs: list[dict]) -> dict:
    """Where the sweep stands: the jobs per status, ``complete`` (its list of jobs is known and every one ended: ok or
    failed), ``best`` (the finished job of lowest perplexity, or None), ``mark`` (the label of that job's row: "(best)"
    only for a complete sweep, else "(best of the finished N of M)") and ``headline`` (what is missing, said first
    and loudly; "" for a complete sweep without failures)."""
    listed = any(j.get("planned") for j in jobs)
    # folders the sweep did not ask for (another launch into this folder, with other overrides) are never its results
    asked = [j for j in jobs if j.get("planned")] if listed else jobs
    others = [j["job"] for j in jobs if listed and not j.get("planned")]
    by = {s: [j["job"] for j in asked if j["status"] == s] for s in ("ok", "failed", "incomplete", "not started")}
    ranked = [j for j in asked if j["status"] == "ok" and j.get("ppl") is not None]
    best = min(ranked, key=lambda j: j["ppl"])["job"] if ranked else None
    n, m = len(by["ok"]), len(asked)
    complete = listed and not by["incomplete"] and not by["not started"]
    if complete:
        mark = "(best)"
        headline = ("" if not by["failed"] else f"**All {m} jobs failed (errors in the table): there is no best.**"
                    if best is None else f"{len(by['failed'])} of the {m} jobs failed (errors in the table): the best "
                    f"is the best of the {n} that finished with results.")
    elif not listed:
        mark = f"(best of the finished {n} of {m} started)"
        headline = (f"**UNKNOWN SWEEP SIZE: this folder has no list of the jobs its sweep asked for (multirun.yaml of "
                    f"Hydra's basic sweeper), so jobs that never started cannot be shown. {n} of the {m} jobs that "
                    "started finished with results; the marked job is only the best of those.**")
    else:
        parts = [f"{n} of the {m} jobs it asked for finished with results"]
        parts += [f"{len(by['failed'])} failed"] if by["failed"] else []
        parts += [f"{len(by['incomplete'])} started and did not end: interrupted, or still running "
                  f"({_jobs(by['incomplete'])})"] \
            if by["incomplete"] else []
        parts += [f"{len(by['not started'])} never started ({_jobs(by['not started'])})"] \
            if by["not started"] else []
        parts += [f"{len(others)} folder(s) hold runs of other overrides it did not ask for ({_jobs(others)}: "
                  "another launch into this folder), left out of the best"] if others else []
        mark = f"(best of the finished {n} of {m})"
        headline = (f"**INCOMPLETE SWEEP: {'; '.join(parts)}. It has no best yet"
                    + (f": the marked job is only the best of the finished {n} of {m}, and a job that never ran may "
                       "beat it." if best else ".")
                    + " Once none of its jobs runs, finish it with the same command and hydra.sweep.dir="
                    f"{Path(jobs[0]['dir']).parent} (finished jobs resume past their finished stages).**")
    return {**{k.replace(" ", "_"): v for k, v in by.items()}, "complete": complete, "best": best, "mark": mark,
            "headline": headline}


def _jobs(names: list[str]) -> str:
    return ("job " if len(names) == 1 else "jobs ") + ", ".join(names)


def tables(jobs: list[dict], where: dict) -> tuple[str, str]:
    """The report as markdown (the headline of ``where``, :func:`standing`, first; one row per job; the timing line)
    and as CSV (the same rows)."""
    keys = swept_keys(jobs)
    ok = [j for j in jobs if j["status"] == "ok"]
    cuts = list(dict.fromkeys(t for j in ok for t in j["cuts"]))
    head = ["job", *keys, "status", *[f"PPL {c}" for c in cuts], "zero-shot mean", "seconds", "error"]
    rows = []
    for j in jobs:
        rows.append([j["job"] + (f" {where['mark']}" if j["job"] == where["best"] else ""),
                     *[j["overrides"].get(k, "") for k in keys],
                     j["status"], *[_fmt(j.get("cuts", {}).get(c)) for c in cuts], _fmt(j.get("zero_shot")),
                     _fmt(j.get("seconds"), 1), j.get("error", "")])
    md = [where["headline"], ""] if where["headline"] else []
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
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


def plot(jobs: list[dict], png: Path, where: dict) -> bool:
    """The sweep's pruned perplexity over one swept key (a line) or two (a heatmap), the best of ``where``
    (:func:`standing`) marked, saved to ``png``; False (nothing drawn) for other key counts or without a best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = swept_keys(jobs)
    ok = [j for j in jobs if j["status"] == "ok" and j.get("ppl") is not None]
    best = next((j for j in ok if j["job"] == where["best"]), None)  # none: no job the sweep asked for finished
    if best is None or not 1 <= len(keys) <= 2:
        return False
    corpus = ok[0]["corpus"]
    if len(keys) == 1:
        k = keys[0]
        pts = sorted((float(j["overrides"][k]), j["ppl"]) for j in ok)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.plot([float(best["overrides"][k])], [best["ppl"]], "r*", markersize=14, label=where["mark"][1:-1])
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
        status = {(j["overrides"][kx], j["overrides"][ky]): j["status"] for j in jobs if j["status"] != "ok"}
        for yi in range(len(ys)):
            for xi in range(len(xs)):
                missing = np.isnan(grid[yi, xi])
                text = status.get((xs[xi], ys[yi]), "no result") if missing else f"{grid[yi, xi]:.2f}"
                ax.text(xi, yi, text, ha="center", va="center", color="red" if missing else "black",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        bx, by = xs.index(best["overrides"][kx]), ys.index(best["overrides"][ky])
        ax.add_patch(plt.Rectangle((bx - 0.5, by - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set_xlabel(kx)
        ax.set_ylabel(ky)
    ax.set_title(f"sweep: pruned perplexity ({where['mark'][1:-1]}: job {best['job']}, {best['ppl']:.2f})")
    fig.tight_layout()
    from .report import save_png

    save_png(fig, png)
    plt.close(fig)
    return True


def report(sweep: Path) -> dict:
    """Write ``report.md``, ``report.csv`` and (for one or two swept keys) ``report.png`` into ``sweep``; return the
    jobs (:func:`collect_jobs`), the markdown, whether a plot was drawn and :func:`standing`. Raises
    :class:`UserError` for a folder that holds no sweep."""
    if not sweep.is_dir():
        raise UserError(f"sweep directory {sweep} does not exist")
    jobs = collect_jobs(sweep)
    if not jobs:
        raise UserError(f"{sweep} holds no sweep jobs (no */.hydra/overrides.yaml); is it a `unipruning prune -m` dir?")
    where = standing(jobs)
    md, csv_text = tables(jobs, where)
    atomic_write_text(sweep / "report.md", md)
    atomic_write_text(sweep / "report.csv", csv_text)
    has_plot = plot(jobs, sweep / "report.png", where)
    return {"jobs": jobs, "markdown": md, "plot": has_plot, "standing": where}


def report_command(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="unipruning report", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ns = ap.parse_args(args)
    res = report(ns.sweep_dir)
    print(res["markdown"])
    print(f"wrote {ns.sweep_dir / 'report.md'}, report.csv" + (", report.png" if res["plot"] else ""))
    if not res["standing"]["complete"]:  # said again last, where a long table cannot scroll it away
        print(res["standing"]["headline"].strip("*"), file=sys.stderr)
