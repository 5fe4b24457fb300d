"""What the frozen-W search costs next to the local metric it averages, on the embedded model.

Both start from nothing cached: one calibration pass over the same windows (per-sample statistics,
as the frozen search needs them), then
- local metric alone: one stochRIA score per matrix and a per-matrix cut;
- frozen search: ``steps`` x (stochRIA on one sample's statistics + dual step + prox) per matrix,
  then the same cut from |Γ|;
with the exact sampler (the reference's independent subsets) and the cyclic one. Everything runs
in this process, one after the other; the figures to read are the ratios.

    python scripts/bench_frozen_cost.py [--nsamples 128] [--seqlen 512] [--steps 64] [--out bench-out/frozen_cost.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from unipruning_cli.data.calibration import calibrate_blockwise
from unipruning_cli.core.config import compose_prune
from unipruning_cli.pruning.blockwise import LocalMetricPruning
from unipruning_cli.pruning.targets import Target
from unipruning_cli.metrics import build_metric
from unipruning_cli.models.loading import load_model, prunable_layers
from unipruning_cli.data.calibration_set import calibration_set
from unipruning_cli.search import SearchSettings, build_regularizer, search_frozen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-out/frozen_cost.json"))
    args = ap.parse_args()
    cfg = compose_prune([f"calibration.nsamples={args.nsamples}", f"model.seqlen={args.seqlen}"])
    model, tok = load_model(cfg.model)
    windows, _ = calibration_set(cfg, tok)
    layers = prunable_layers(model)
    target = Target(sparsity=0.5, allocation="per_matrix")

    t0 = time.perf_counter()
    stats = calibrate_blockwise(model, windows, want_per_sample=True)
    calib = time.perf_counter() - t0
    res = {"model": cfg.model.name, "tokens": int(windows.numel()), "steps": args.steps,
           "threads": torch.get_num_threads(), "calibration_s": round(calib, 2)}
    prox = build_regularizer("l1", cfg.regularizer.lam, cfg.regularizer.threshold_mode)
    weights = {n: m.weight.detach() for n, m in layers.items()}
    for sampler in ("exact", "cyclic"):
        metric = build_metric("stochria", sampler=sampler)
        t0 = time.perf_counter()
        target.cut(LocalMetricPruning(metric, seed=0).scores(layers, stats))
        local = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            gamma, _ = search_frozen(weights, stats, metric, prox, SearchSettings(steps=args.steps, weight_mode="frozen"),
                                     Path(tmp) / "ckpt.safetensors", "bench", Path(tmp) / "search.jsonl")
            target.cut({n: g.abs() for n, g in gamma.items()})
            frozen = time.perf_counter() - t0
        res[sampler] = {"local_metric_s": round(calib + local, 2), "frozen_search_s": round(calib + frozen, 2),
                        "per_step_s": round(frozen / args.steps, 3),
                        "ratio_frozen_over_local": round((calib + frozen) / (calib + local), 3)}
        print(sampler, res[sampler], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
