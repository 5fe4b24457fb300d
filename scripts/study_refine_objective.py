"""Which error should ``refine=swap`` lower (issue 29, step 2)? Each cut of a finished run (its masks as cut,
unrefined) refined under each objective, then measured: perplexity on the run's evaluation corpora, the LM loss on
the held-out calibration windows (``allocation.holdout_windows``: the calibration corpus, seed + 1, never the
evaluation corpus; what the choice is made on), the output error the refinement lowered, the rounds it ran, its
seconds, and, per block, how far the pruned model's outputs are from the dense model's
(:func:`unipruning_cli.data.dense_stream.relative_drift`, what the loss sees).

    python scripts/study_refine_objective.py --run <run> --tags s0.60_owl,s0.70_owl,2of4 --variants none,pruned,dense
    python scripts/study_refine_objective.py --run <run> --tags 2of4 --variants none,dense --obs   # + reconstruct=obs
    python scripts/study_refine_objective.py --run <run> --tags 2of4 --variants none --obs --solver admm

Variants: ``none`` (the cut as it is), ``pruned`` (swaps lower ``‖(W - Ŵ) X_m‖²``, the pruned model's own inputs),
``dense`` (``‖W X_d - Ŵ X_m‖²``, toward the dense model: ``layer_target=dense``), ``single50`` (the capped single-swap
rounds of the earlier refinement, 50 rounds, one swap per row per round). ``--obs``: each variant's masks then get the
OBS update in the same pass (``reconstruct=obs``), toward the dense outputs for ``dense`` and ``none_dense`` (no
swaps, the OBS update alone with ``layer_target=dense``). The run must have cut its masks without refinement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unipruning_cli.core.context import RunContext  # noqa: E402
from unipruning_cli.core.pinned import HostCopy  # noqa: E402
from unipruning_cli.evaluation.perplexity import perplexity  # noqa: E402
from unipruning_cli.models.loading import load_model  # noqa: E402
from unipruning_cli.pruning.block_loop import block_pass  # noqa: E402
from unipruning_cli.pruning.mask_files import load_masks, read_masks_header  # noqa: E402
from unipruning_cli.pruning.targets import nm_of_tag  # noqa: E402
from unipruning_cli.pruning.weights import apply_masks, restore_weights  # noqa: E402
from unipruning_cli.stages.allocation import holdout_loss, holdout_windows  # noqa: E402
from unipruning_cli.stages.evaluation import eval_windows_of  # noqa: E402
from unipruning_cli.stages.export.run import open_run  # noqa: E402
from unipruning_cli.stages.reconstruction import reconstruct  # noqa: E402
from unipruning_cli.stages.refinement import SwapRefiner, refine  # noqa: E402

VARIANTS = {"none": None, "none_dense": None, "pruned": {"target": "pruned"}, "dense": {"target": "dense"},
            "single50": {"target": "pruned", "max_rounds": 50, "batch": False}}


def drift_of(model, windows, masks, passes) -> list[float]:
    """Per block, the relative distance of the pruned outputs from the dense model's with ``masks`` applied
    sequentially (W x mask; the model is as it was on return)."""
    drift: list[float] = []
    block_pass(model, windows, lambda i, layers, stats: {n: masks[n] for n in layers}, passes, restore=True,
               dense_targets=True, want_hessian=False, drift=drift)
    return drift


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run whose masks were cut without refinement")
    p.add_argument("--tags", default="s0.60_owl,s0.70_owl,2of4")
    p.add_argument("--variants", default="none,masked,dense")
    p.add_argument("--obs", action="store_true", help="then the kept weights updated on each variant's masks (one pass)")
    p.add_argument("--solver", default="obs", choices=("obs", "admm"), help="the update --obs runs (reconstruct=)")
    p.add_argument("--percdamp", type=float, default=None,
                   help="the update's damping, of H's mean diagonal (default: the solver's, obs 0.01, admm 0.001)")
    p.add_argument("--drift", action="store_true", help="also the per-block drift of each weights-kept variant")
    p.add_argument("--out", default="bench-out/refine_objective.json")
    args = p.parse_args()
    run = open_run(args.run)
    cfg = run.cfg
    model, tok = load_model(cfg.model, "device")
    ctx = RunContext(cfg).loaded(model, tok)
    layers = ctx.layers
    windows = eval_windows_of(cfg, tok)
    held = holdout_windows(ctx)
    calib = ctx.calibration()[0]
    original = HostCopy({n: m.weight for n, m in layers.items()})
    rows = []
    for tag in args.tags.split(","):
        path = run.mask_path(tag)
        if read_masks_header(path)[1].get("refine"):
            raise SystemExit(f"{path} is refined already: this study needs the masks as cut")
        masks = load_masks(path)
        for variant in args.variants.split(","):
            spec = VARIANTS[variant]
            refiner = None if spec is None else SwapRefiner(masks, nm=nm_of_tag(tag), **spec)
            start = time.monotonic()
            if args.obs:
                dense = variant in ("dense", "none_dense")
                record = {"reconstruction": reconstruct(model, calib, masks, ctx.passes, refiner, dense,
                                                         args.solver, args.percdamp)}
                final = refiner.refined if refiner else masks
            else:
                final = refine(model, calib, refiner, ctx.passes)[0] if refiner else masks
                record = {}
                apply_masks(layers, final)
            seconds = time.monotonic() - start
            row = {"tag": tag, "variant": variant, "obs": args.solver if args.obs else False,
                   **({"percdamp": record["reconstruction"]["percdamp"]} if args.obs else {}), "seconds": round(seconds, 1),
                   "ppl": {c: perplexity(model, w, cfg.eval.batch_size, f"{tag} {variant}").ppl
                           for c, w in windows.items()},
                   "holdout_loss": holdout_loss(ctx, held),
                   **({"refinement": refiner.record()} if refiner else {}), **record}
            restore_weights(layers, original.tensors)
            if args.drift and not args.obs:
                row["drift"] = drift_of(model, calib, final, ctx.passes)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "drift"}), flush=True)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))
    corpus = next(iter(windows))
    print(f"\n| cut | variant | {'+ ' + args.solver + ' ' if args.obs else ''}PPL {corpus} | held-out loss | error ratio | rounds | "
          "seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ref = r.get("refinement", {})
        print(f"| {r['tag']} | {r['variant']} | {r['ppl'][corpus]:.2f} | {r['holdout_loss']:.4f} | "
              f"{ref.get('error_ratio', 1.0):.3f} | {ref.get('rounds', 0)} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
