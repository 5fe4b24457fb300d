"""Peak memory and time of a frozen search with glibc's default allocator vs a fixed mmap threshold.

glibc raises its mmap threshold each time a large block is freed; blocks of that size then come from
the heap, where a search's many [out, in] temporaries fragment it and the resident set grows step after
step. ``MALLOC_MMAP_THRESHOLD_=131072`` pins the threshold: large blocks go back to the OS at once, at
the price of fresh pages (page faults, zero-fill) for every large temporary. This measures both sides;
the library does not pin it (the time it costs is far larger than the memory it saves on this machine),
docs/results.md says how to, for a user short of memory.

Each variant runs in its own process (peak RSS is per process): the frozen UniPruning search over
random weights with the embedded model's matrix shapes (30 blocks of q, k, v, o, gate, up, down;
106 M parameters) and random per-sample statistics, the cyclic sampler (the frozen default), λ=1e-3.
``fixed`` runs the child with ``MALLOC_MMAP_THRESHOLD_=131072`` in its environment.

    python scripts/bench_allocator.py [--steps 16] [--blocks 30]
"""

from __future__ import annotations

import argparse
import json
import os

from bench_common import run_json_child

CHILD = r"""
import json, sys, tempfile, time, torch
from pathlib import Path
from bench_common import SMOLLM2_BLOCK_SHAPES, peak_rss_mib
from unipruning_cli.metrics import build_metric
from unipruning_cli.search import SearchSettings, build_regularizer, search_frozen
from unipruning_cli.data.stats import ActivationStats
mode, steps, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gen = torch.Generator().manual_seed(0)
weights = {f"b{b}.{i}": torch.randn(*s, generator=gen) for b in range(blocks) for i, s in enumerate(SMOLLM2_BLOCK_SHAPES)}
stats = {n: ActivationStats(sq_sum=torch.ones(w.shape[1], dtype=torch.float64), count=8,
                            sample_mean_sq=torch.rand(8, w.shape[1], generator=gen)) for n, w in weights.items()}
before = peak_rss_mib()
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    search_frozen(weights, stats, build_metric("stochria", sampler="cyclic"), build_regularizer("l1", 1e-3, "quantile"),
                  SearchSettings(steps=steps, weight_mode="frozen"), Path(tmp) / "c", "x", Path(tmp) / "s.jsonl")
    secs = time.perf_counter() - t0
print(json.dumps({"mode": mode, "seconds": round(secs, 2),
                  "rss_before_search_mib": round(before), "peak_rss_mib": round(peak_rss_mib()),
                  "search_added_mib": round(peak_rss_mib() - before)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=30)
    args = ap.parse_args()
    env_clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = {}
    for mode in ("default", "fixed"):
        env = {**env_clean, "MALLOC_MMAP_THRESHOLD_": "131072"} if mode == "fixed" else env_clean
        out[mode] = run_json_child(["-c", CHILD, mode, str(args.steps), str(args.blocks)], env=env)
        print(json.dumps(out[mode]), flush=True)
    out["added_memory_ratio_fixed_over_default"] = round(out["fixed"]["search_added_mib"]
                                                         / max(1, out["default"]["search_added_mib"]), 3)
    out["time_ratio_fixed_over_default"] = round(out["fixed"]["seconds"] / out["default"]["seconds"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
