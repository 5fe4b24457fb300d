"""Every method on the embedded model at 50/60/70 % and 2:4, 4:8: one table of PPL, seconds, memory.

Each (method, pattern) is one `unipruning prune` process, so its peak RSS is its own; all share the
same calibration windows (nsamples x seqlen from owt_offline, seed 0) and the same perplexity protocol
(wiki_offline, non-overlapping seqlen windows, first --windows of them). Dense calibration statistics
and dense perplexity are cached after the first process. UniPruning runs once per weight mode and cuts
every sparsity and N:M pattern from its one Γ.

    python scripts/bench_methods.py --out bench-out            # full table (about an hour on 2 cores)
    python scripts/bench_methods.py --quick --out bench-out    # a small tier for CI (minutes)
    python scripts/bench_methods.py --only wanda,unipruning-drift --allocation owl --reconstruct --out bench-out
                                                                # beyond the paper: OWL budgets, OBS reconstruction
    python scripts/bench_methods.py --only wanda@one_shot --refine --out bench-out   # swap refinement of the masks
    python scripts/bench_methods.py --only wanda --only-cut 2:4 --refine --reconstruct admm --out bench-out/cost
                                # what refining and reconstructing one cut costs, in calibration passes of the same run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SPARSITIES = (0.5, 0.6, 0.7)
PATTERNS = ("2:4", "4:8")


def jobs(quick: bool, sgpt_mode: str = "sequential", allocation: str | None = None,
         reconstruct: str | None = None, refine: bool = False) -> list[tuple[str, list[str]]]:
    """(label, overrides) per process. ``allocation``: ``pattern.allocation`` of every unstructured cut but
    SparseGPT's (which chooses its own); ``reconstruct``: ``reconstruct=<it>`` (obs, admm) for every method but
    SparseGPT (which reconstructs as it prunes); ``refine``: ``refine=swap`` likewise."""
    out = []
    for label, ov in _jobs(quick, sgpt_mode):
        if label != "sparsegpt":
            if allocation and not any(o.startswith("pattern=") for o in ov):  # N:M cuts have no allocation
                ov = [*ov, f"pattern.allocation={allocation}"]
            if refine:
                ov = [*ov, "refine=swap"]
            if reconstruct:
                ov = [*ov, f"reconstruct={reconstruct}"]
        out.append((label, ov))
    return out


def _jobs(quick: bool, sgpt_mode: str) -> list[tuple[str, list[str]]]:
    sps = SPARSITIES[:1] if quick else SPARSITIES
    pats = PATTERNS[:1] if quick else PATTERNS
    out = []
    # Wanda and RIA under their published protocol (sequential, calibration.mode=auto) and one-shot
    for label, extra in (("magnitude", ["local_metric=magnitude"]), ("wanda", ["local_metric=wanda"]),
                         ("wanda@one_shot", ["local_metric=wanda", "calibration.mode=one_shot"]),
                         ("ria", ["local_metric=ria"]), ("ria@one_shot", ["local_metric=ria", "calibration.mode=one_shot"])):
        for s in sps:
            out.append((label, ["method=local", *extra, f"sparsity={s}"]))
        for p in pats:
            out.append((label, ["method=local", *extra, f"pattern={p}"]))
    for s in sps:
        out.append(("sparsegpt", ["method=sparsegpt", f"calibration.mode={sgpt_mode}", f"sparsity={s}"]))
    for p in pats:
        out.append(("sparsegpt", ["method=sparsegpt", f"calibration.mode={sgpt_mode}", f"pattern={p}"]))
    export = [f"export.sparsities=[{','.join(map(str, sps))}]", f"export.patterns=[{','.join(pats)}]"]
    for mode in (("frozen",) if quick else ("frozen", "drift")):
        out.append((f"unipruning-{mode}", ["method=unipruning", "local_metric=stochria",
                                          f"schedule.weight_mode={mode}", *export]))
    return out


def run(label: str, overrides: list[str], common: list[str], runs: Path) -> dict:
    env = {**os.environ, "UNIPRUNING_RUNS": str(runs), "COLUMNS": "1000"}  # the run directory on one line
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "unipruning_cli.cli", "prune", *common, *overrides],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label} {overrides} failed:\n{proc.stderr[-3000:]}")
    run_dir = next(line.split("run directory: ", 1)[1].strip() for line in proc.stderr.splitlines()[::-1]
                   if "run directory: " in line)
    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    m["wall_s"] = wall
    m["run_dir"] = run_dir
    return m


def label_of(m: dict) -> str:
    """The row a run belongs to, with its block protocol (``calibration.mode`` as the run resolved it) and, for the
    drift search, which gradients were clipped (runs from before ``grad_clip_scope`` clipped the prunable ones)."""
    mode = m["calibration"].get("mode")
    if m["method"] == "local":
        name = m["local_metric"]["name"]
        return (name if name == "magnitude" else f"{name} ({mode})") + _extras(m)
    if m["method"] == "unipruning":
        sch = m["search"]["schedule"]
        sampler = m["local_metric"].get("sampler", "exact")  # runs from before "auto" drew exactly
        if sampler == "auto":
            sampler = "cyclic" if sch["weight_mode"] == "frozen" else "exact"
        clip = f", clip over {sch.get('grad_clip_scope', 'prunable')}" if sch["weight_mode"] == "drift" else ""
        return f"unipruning-{sch['weight_mode']} ({sch['steps']} steps, {sampler} draws{clip}){_extras(m)}"
    return f"{m['method']} ({mode})"


def _extras(m: dict) -> str:
    """The allocation of a run's unstructured cuts, and whether it refined its masks and reconstructed the kept
    weights."""
    unstructured = [t for t in m["results"] if t.startswith("s")]
    allocation = unstructured[0].split("_", 1)[1] if unstructured else None
    refined = any("refinement" in r for r in m["results"].values())
    rebuilt = {r["reconstruction"]["method"] for r in m["results"].values() if "reconstruction" in r}
    return (f" [{allocation}]" if allocation else "") + (" + swap" if refined else "") + \
        "".join(f" + {how.upper()}" for how in sorted(rebuilt))


def collect(runs: Path) -> list[tuple[str, dict]]:
    """Every finished run under ``runs`` (e.g. of an interrupted or partial benchmark), labelled."""
    out = []
    for path in sorted(runs.rglob("metrics.json")):
        m = json.loads(path.read_text())
        m.setdefault("wall_s", m["seconds"]["total"])
        m["run_dir"] = str(path.parent)
        out.append((label_of(m), m))
    return out


def rows_of(label: str, m: dict, corpus: str) -> list[dict]:
    out = []
    for tag, r in m["results"].items():
        out.append({"method": label, "cut": tag, "ppl": r["ppl"][corpus], "measured_sparsity": r["measured_sparsity"],
                    "dense_ppl": m["perplexity"][corpus]["dense"]["ppl"], "seconds": m["wall_s"],
                    "prune_seconds": m["seconds"].get("calibrate_prune", m["seconds"].get("search")),
                    "passes_per_cut": passes_per_cut(m),
                    "peak_rss_mib": m["memory"]["peak_rss_mib"], "run_dir": m["run_dir"]})
    return out


def passes_per_cut(m: dict) -> float | None:
    """What refining and reconstructing one cut cost in a run, in units of the same run's calibration pass (the
    ``refine`` and ``reconstruct`` stages over ``calibrate_prune``, per cut): a ratio measured in one process. None
    where the run did neither, or had no calibration pass of its own (UniPruning's search)."""
    sec = m["seconds"]
    extra = sec.get("refine", 0.0) + sec.get("reconstruct", 0.0)
    if not extra or not sec.get("calibrate_prune"):
        return None
    return extra / sec["calibrate_prune"] / len(m["results"])


def markdown(rows: list[dict], header: dict) -> str:
    cuts = list(dict.fromkeys(r["cut"].split("_")[0] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["method"], r["cut"].split("_")[0]): r for r in rows}
    lines = [f"Model {header['model']}, calibration {header['nsamples']} x {header['seqlen']} tokens "
             f"({header['calibration']}, seed 0), perplexity on {header['corpus']} at seqlen {header['seqlen']} "
             f"({header['windows']} windows); dense PPL {rows[0]['dense_ppl']:.2f}. UniPruning: stochRIA anchor; "
             f"SparseGPT calibration {header['sparsegpt_mode']}. Command: "
             f"`{header['command']}`.", "",
             "| method | " + " | ".join(cuts) + " | seconds (process) | peak RSS MiB | refine + reconstruct per cut, "
             "in calibration passes |", "|---|" + "---|" * len(cuts) + "---|---|---|"]
    for meth in methods:
        cells = [f"{table[(meth, c)]['ppl']:.2f}" if (meth, c) in table else "" for c in cuts]
        mine = [r for r in rows if r["method"] == meth]
        secs = sum({r["run_dir"]: r["seconds"] for r in mine}.values())
        cost = [r["passes_per_cut"] for r in mine if r.get("passes_per_cut") is not None]
        lines.append(f"| {meth} | " + " | ".join(cells) + f" | {secs:.0f} | {max(r['peak_rss_mib'] for r in mine):.0f} | "
                     + (f"{max(cost):.2f}" if cost else "") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="the small CI tier")
    ap.add_argument("--only", default=None, help="comma list of labels to run (e.g. sparsegpt,unipruning-drift)")
    ap.add_argument("--only-cut", default=None, help="with --only: keep jobs whose overrides contain this (e.g. 2:4)")
    ap.add_argument("--collect", action="store_true",
                    help="build the table from every finished run under <out>/runs (after partial runs)")
    ap.add_argument("--override", action="append", default=[],
                    help="an extra config override for every job, e.g. --override schedule.grad_clip_scope=prunable")
    ap.add_argument("--allocation", default=None, choices=("per_row", "per_matrix", "global", "owl", "gamma"),
                    help="pattern.allocation of every unstructured cut (not SparseGPT's)")
    ap.add_argument("--reconstruct", nargs="?", const="obs", default=None, choices=("obs", "admm"),
                    help="reconstruct=obs (or admm): each cut's kept weights updated on its mask (not SparseGPT's)")
    ap.add_argument("--refine", action="store_true",
                    help="refine=swap: each cut's mask refined by swaps inside rows / N:M groups (not SparseGPT)")
    ap.add_argument("--sparsegpt-mode", default="sequential", choices=("sequential", "one_shot"),
                    help="one_shot halves SparseGPT's calibration cost (each block sees dense inputs)")
    args = ap.parse_args()
    corpus = "wiki_offline"
    common = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}",
              f"eval.seqlen={args.seqlen}", f"eval.max_windows={args.windows}", f"schedule.steps={args.steps}",
              f"eval.corpora=[{corpus}]", "calibration.source=owt_offline", "reuse_search=false", "eval.baselines=[]", *args.override]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    todo = jobs(args.quick, args.sparsegpt_mode, args.allocation, args.reconstruct, args.refine)
    if args.only:
        keep = set(args.only.split(","))
        todo = [(lab, ov) for lab, ov in todo if lab in keep and (not args.only_cut or any(args.only_cut in o for o in ov))]
    for label, overrides in ([] if args.collect else todo):
        print(f"-> {label} {' '.join(overrides)}", flush=True)
        m = run(label, overrides, common, args.out / "runs")
        rows += rows_of(label_of(m), m, corpus)
        print(f"   {rows[-1]['cut']}: ppl {rows[-1]['ppl']:.2f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    if args.collect:
        for label, m in collect(args.out / "runs"):
            same = (m["perplexity"][corpus]["pruned"]["windows"] == args.windows
                    and m["calibration"]["nsamples"] == args.nsamples and m["calibration"]["seqlen"] == args.seqlen)
            if same:  # only runs of this protocol
                rows += rows_of(label, m, corpus)
    header = {"model": "smollm2-135m", "nsamples": args.nsamples, "seqlen": args.seqlen, "calibration": "owt_offline",
              "corpus": corpus, "windows": args.windows, "steps": args.steps, "sparsegpt_mode": args.sparsegpt_mode,
              "command": " ".join(sys.argv)}
    (args.out / "methods.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    (args.out / "methods.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
