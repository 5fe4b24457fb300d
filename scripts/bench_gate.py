"""Regression gate: a fixed suite of prunes on the embedded model, compared with a baseline in the repo.

Every case runs in this process through the real config composition and runner. Checked against
``benchmarks/<tier>_baseline.json``:
- perplexity may not be worse than the baseline by more than ``ppl_rel_tol`` (relative);
- each case's seconds divided by a reference computation timed in the same run (a dense perplexity
  pass over the same windows, never read from a cache) may not exceed the baseline ratio times
  ``time_ratio_factor``: a ratio, not an absolute time, so a slower machine does not fail it.

    python scripts/bench_gate.py --tier ci                    # compare (exit 1 on a regression)
    python scripts/bench_gate.py --tier ci --update-baseline  # accept the current numbers
    python scripts/bench_gate.py --tier full                  # the larger tier (make bench-gate)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when a test loads this file by path
from bench_common import isolated_cache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TIERS = {
    # calibration nsamples x seqlen, eval windows, and the cases: (name, overrides); one cut per run, UniPruning's cut
    # per matrix (the reference), as the references were measured
    "ci": {"common": ["calibration.nsamples=16", "model.seqlen=256", "eval.max_windows=6", "schedule.steps=6",
                     "reuse_search=false", *(ONE_CUT := ["export.sparsities=[]", "export.patterns=[]", "eval.baselines=[]"])],
           "cases": [("magnitude-0.5", ["method=local", "local_metric=magnitude", "sparsity=0.5"]),
                     ("wanda-0.5", ["method=local", "local_metric=wanda", "sparsity=0.5"]),  # sequential (auto)
                     ("wanda-0.5-one_shot", ["method=local", "local_metric=wanda", "sparsity=0.5",
                                             "calibration.mode=one_shot"]),
                     ("wanda-2:4", ["method=local", "local_metric=wanda", "pattern=2:4"]),
                     ("ria-0.6", ["method=local", "local_metric=ria", "sparsity=0.6"]),
                     ("sparsegpt-0.5", ["method=sparsegpt", "sparsity=0.5"]),
                     ("unipruning-frozen-0.5", ["method=unipruning", "local_metric=stochria",
                                                "schedule.weight_mode=frozen", "sparsity=0.5",
                                                "pattern.allocation=per_matrix"])]},
    "full": {"common": ["calibration.nsamples=128", "model.seqlen=512", "eval.max_windows=20", "schedule.steps=32",
                       "reuse_search=false", *ONE_CUT],
             "cases": [(f"{m}-{p.split('=')[1]}", ["method=local", f"local_metric={m}", p])
                       for m in ("magnitude", "wanda", "ria") for p in ("sparsity=0.5", "sparsity=0.7", "pattern=2:4")]
             + [("sparsegpt-0.5", ["method=sparsegpt", "sparsity=0.5"]),
                ("sparsegpt-2:4", ["method=sparsegpt", "pattern=2:4"]),
                ("unipruning-frozen-0.5", ["method=unipruning", "schedule.weight_mode=frozen", "sparsity=0.5",
                                           "pattern.allocation=per_matrix"]),
                ("unipruning-drift-0.5", ["method=unipruning", "schedule.weight_mode=drift", "sparsity=0.5",
                                          "pattern.allocation=per_matrix"])]},
}
DEFAULT_TOLERANCES = {"ppl_rel_tol": 0.02, "time_ratio_factor": 3.0}


def reference_seconds(cfg) -> float:
    """The time of a dense perplexity pass over the eval windows: the yardstick of every ratio."""
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.models.loading import load_model
    from unipruning_cli.stages.evaluation import eval_windows_of

    model, tok = load_model(cfg.model)
    windows = eval_windows_of(cfg, tok)
    t0 = time.perf_counter()
    for w in windows.values():
        perplexity(model, w, cfg.eval.batch_size, "reference")
    return time.perf_counter() - t0


def fresh_cache(folder: Path) -> Path:
    """A cache that shares the prepared model and data but no cached results (dense PPL, calibration
    statistics): every gate run measures the same work, whatever ran before on this machine."""
    from unipruning_cli.core.paths import cache_dir

    return isolated_cache(cache_dir(), folder)


def run_suite(tier: str, out: Path, extra: list[str] | None = None) -> dict:
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.commands.prune import run_prune

    spec = TIERS[tier]
    common = [*spec["common"], *(extra or [])]
    ref = reference_seconds(compose_prune(common))
    cases = {}
    for name, overrides in spec["cases"]:
        cfg = compose_prune([*common, *overrides])
        validate(cfg)
        t0 = time.perf_counter()
        m = run_prune(cfg, out / name.replace(":", "of"))
        seconds = time.perf_counter() - t0
        corpus = next(iter(m["perplexity"]))
        cases[name] = {"ppl": m["perplexity"][corpus]["pruned"]["ppl"], "seconds": round(seconds, 2),
                       "time_ratio": round(seconds / ref, 3), "peak_rss_mib": m["memory"]["peak_rss_mib"],
                       "measured_sparsity": m["sparsity"]["overall"]}
        print(f"{name:26s} ppl {cases[name]['ppl']:10.3f}  {seconds:7.1f} s  ratio {cases[name]['time_ratio']:.2f}",
              flush=True)
    return {"tier": tier, "common": common, "reference_seconds": round(ref, 2), "cases": cases}


def compare(result: dict, baseline: dict) -> list[str]:
    """Every regression of ``result`` against ``baseline``, as readable lines (empty: pass)."""
    tol = {**DEFAULT_TOLERANCES, **baseline.get("tolerances", {})}
    failures = []
    for name, base in baseline["cases"].items():
        got = result["cases"].get(name)
        if got is None:
            failures.append(f"{name}: missing from this run")
            continue
        limit = base["ppl"] * (1 + tol["ppl_rel_tol"])
        if not got["ppl"] <= limit:  # NaN fails too
            failures.append(f"{name}: perplexity {got['ppl']:.3f} > {limit:.3f} (baseline {base['ppl']:.3f} "
                            f"+{tol['ppl_rel_tol']:.0%})")
        bound = base["time_ratio"] * tol["time_ratio_factor"]
        if got["time_ratio"] > bound:
            failures.append(f"{name}: time ratio {got['time_ratio']:.2f} > {bound:.2f} (baseline "
                            f"{base['time_ratio']:.2f} x{tol['time_ratio_factor']})")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", choices=sorted(TIERS), default="ci")
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write this run's results here")
    ap.add_argument("--update-baseline", action="store_true")
    args = ap.parse_args()
    baseline_path = args.baseline or REPO / "benchmarks" / f"{args.tier}_baseline.json"
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "runs"
        os.environ["UNIPRUNING_CACHE"] = str(fresh_cache(Path(tmp) / "cache"))
        result = run_suite(args.tier, out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.update_baseline:
        result["tolerances"] = DEFAULT_TOLERANCES
        baseline_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"baseline written: {baseline_path}")
        return 0
    failures = compare(result, json.loads(baseline_path.read_text()))
    for f in failures:
        print(f"REGRESSION {f}")
    print(f"bench gate ({args.tier}): {len(result['cases']) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
