"""Memory of evaluating several cuts in turn on one model: a full weight copy vs the zeroed entries only.

``stages.evaluation.evaluate_masks`` copies every prunable weight to host memory (pinned under CUDA, so a GPU
holds no second copy), then restores all of them after each cut. The alternative measured here puts only each cut's zeroed entries aside, on the
host, and writes them back. Each variant runs in a fresh process (peak memory only grows), on the
embedded model with magnitude cuts at 50 / 60 / 70 % per matrix; the script prints the peak RSS
(and, on CUDA, the peak device memory) added by the evaluation over the model and masks already in
memory, the seconds, and checks that both give the same perplexities.

    python scripts/bench_eval_memory.py [--windows 2] [--seqlen 256]

On CPU the alternative saved nothing (three runs: added peak RSS 1.00x to 1.01x the copy's, time
1.40x to 1.58x; freed host blocks stay in the heap, and boolean indexing is slow), so the runner
keeps the copy, on the host.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_common import reset_peak_rss, run_json_child, status_mib


def _evaluate_setting_aside(ctx, all_masks, windows):
    """The alternative: keep aside (on the host) only the entries a cut zeroes, and put them back."""
    from unipruning_cli.pruning.weights import apply_masks
    from unipruning_cli.stages.evaluation import evaluate_pruned

    layers, results = ctx.layers, {}
    for tag, masks in all_masks.items():
        with torch.no_grad():
            aside = {n: layers[n].weight[~m.to(layers[n].weight.device, torch.bool)].cpu() for n, m in masks.items()}
        apply_masks(layers, masks)
        results[tag] = evaluate_pruned(ctx, windows, tag)
        with torch.no_grad():
            for n, m in masks.items():
                w = layers[n].weight
                w[~m.to(w.device, torch.bool)] = aside.pop(n).to(w.device)
    return results


def run_variant(variant: str, n_windows: int, seqlen: int) -> dict:
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.pruning.masks import masks_for
    from unipruning_cli.core.context import RunContext
    from unipruning_cli.models.loading import load_model
    from unipruning_cli.stages.evaluation import eval_windows_of, evaluate_masks

    # The embedded model and its evaluation windows, composed as `unipruning prune` composes them.
    cfg = compose_prune([f"eval.seqlen={seqlen}", f"eval.max_windows={n_windows}", f"eval.batch_size={n_windows}"])
    ctx = RunContext(cfg).loaded(*load_model(cfg.model))
    model, tok, layers = ctx.model, ctx.tok, ctx.layers
    scores = {n: m.weight.detach().abs() for n, m in layers.items()}
    cuts = {f"s{s}": masks_for(scores, s) for s in (0.5, 0.6, 0.7)}
    del scores
    windows = eval_windows_of(cfg, tok)
    rule = _evaluate_setting_aside if variant == "aside" else evaluate_masks
    # No warm-up: freed memory would be reused and hide what the measured call adds. The forward
    # passes' own working memory is in both variants alike.
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dev_before = torch.cuda.memory_allocated()
    reset_peak_rss()
    before = status_mib("VmRSS")
    t0 = time.perf_counter()
    results = rule(ctx, cuts, windows)
    device = {"added_peak_device_mib": round((torch.cuda.max_memory_allocated() - dev_before) / 2**20, 1)} if cuda else {}
    return {"variant": variant, "added_peak_rss_mib": round(status_mib("VmHWM") - before, 1), **device,
            "seconds": round(time.perf_counter() - t0, 2),
            "ppl": {t: {c: p["ppl"] for c, p in r["perplexity"].items()} for t, r in results.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--variant", choices=["copy", "aside"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.windows, args.seqlen)))
        return
    out = {}
    for variant in ("copy", "aside"):
        out[variant] = run_json_child([__file__, "--variant", variant, "--windows", str(args.windows),
                                       "--seqlen", str(args.seqlen)])
    assert out["copy"]["ppl"] == out["aside"]["ppl"], "the two rules must give the same perplexities"
    out["ratio_added_rss_aside_over_copy"] = round(out["aside"]["added_peak_rss_mib"]
                                                   / max(out["copy"]["added_peak_rss_mib"], 1e-9), 3)
    if "added_peak_device_mib" in out["copy"]:
        out["ratio_added_device_aside_over_copy"] = round(out["aside"]["added_peak_device_mib"]
                                                          / max(out["copy"]["added_peak_device_mib"], 1e-9), 3)
    out["ratio_seconds_aside_over_copy"] = round(out["aside"]["seconds"] / out["copy"]["seconds"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
