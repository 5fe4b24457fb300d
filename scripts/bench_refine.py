"""What the refinement costs (issue 29, step 4), each a ratio measured in one run on this machine:

- ``passes``: on the embedded model (SmolLM2-135M, its fp32 weights), Wanda's magnitude cut at 60 % refined by swaps and
  then reconstructed by OBS, as two sequential calibration passes (``refine`` then ``reconstruct``, the way before
  issue 29) against one shared pass (``reconstruct`` with a refiner), beside a plain calibration pass with XᵀX
  (the unit). The shared pass refines each block on the reconstructed blocks' outputs, the two-pass way on the
  refined ones', so their masks differ somewhat: counted, not required equal.
- ``swaps``: one round rule against the other on the real XᵀX of one block: batched rounds until no swap helps
  against the earlier single swap per row per round, 50 rounds (DSnoT's cap), seconds and the error left.

    python scripts/bench_refine.py --samples 16          # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unipruning_cli.core.config import compose_prune  # noqa: E402
from unipruning_cli.core.context import RunContext  # noqa: E402
from unipruning_cli.data.calibration import calibrate_blockwise  # noqa: E402
from unipruning_cli.models.loading import load_model  # noqa: E402
from unipruning_cli.pruning.swaps import row_errors, swap_refine  # noqa: E402
from unipruning_cli.pruning.weights import restore_weights  # noqa: E402
from unipruning_cli.stages.reconstruction import reconstruct  # noqa: E402
from unipruning_cli.stages.refinement import SwapRefiner, refine  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16, help="calibration samples of 512 tokens")
    p.add_argument("--rounds", type=int, default=50, help="the single-swap rule's cap")
    p.add_argument("--out", default="bench-out/refine.json")
    args = p.parse_args()
    cfg = compose_prune([f"calibration.nsamples={args.samples}"])
    model, tok = load_model(cfg.model, "device")
    ctx = RunContext(cfg).loaded(model, tok)
    layers = ctx.layers
    windows = ctx.calibration()[0]
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    masks = {}
    for n, w in dense.items():  # magnitude at 60 % per row: any fixed mask serves the timing
        k = int(w.shape[1] * 0.4)
        masks[n] = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(k, dim=1).indices, True)

    _, unit = _timed(lambda: calibrate_blockwise(model, windows, sequential=True, want_hessian=True,
                                                 on_block=lambda i, ls, st: None))
    refiner = SwapRefiner(masks)
    (refined, _), t_refine = _timed(lambda: refine(model, windows, refiner, ctx.passes))
    _, t_obs = _timed(lambda: reconstruct(model, windows, refined, ctx.passes))
    restore_weights(layers, dense)
    shared = SwapRefiner(masks)
    _, t_shared = _timed(lambda: reconstruct(model, windows, masks, ctx.passes, shared))
    restore_weights(layers, dense)
    differing = sum(int((refined[n] != shared.refined[n]).sum()) for n in masks)

    stats = {}
    first = [n for n in layers if ".0." in n]
    calibrate_blockwise(model, windows, sequential=True, want_hessian=True,
                        on_block=lambda i, ls, st: stats.update({n: st[n].xtx.clone() for n in ls if n in first}))
    rules = {}
    for name, batch, cap in (("batched, until converged", True, None), (f"single, {args.rounds} rounds", False,
                                                                         args.rounds)):
        errors, seconds, rounds = 0.0, 0.0, 0
        for n in first:
            got, t = _timed(lambda: swap_refine(dense[n], masks[n], stats[n], batch=batch, max_rounds=cap))
            errors += float(row_errors(dense[n], got.keep, stats[n]).sum() / row_errors(dense[n], masks[n],
                                                                                   stats[n]).sum())
            seconds += t
            rounds = max(rounds, got.rounds)
        rules[name] = {"seconds": round(seconds, 2), "mean_error_ratio": round(errors / len(first), 4),
                       "rounds": rounds}
    out = {"samples": args.samples, "calibration_pass_s": round(unit, 1), "refine_pass_s": round(t_refine, 1),
           "obs_pass_s": round(t_obs, 1), "two_passes_s": round(t_refine + t_obs, 1), "shared_pass_s": round(t_shared, 1),
           "shared_over_two": round(t_shared / (t_refine + t_obs), 3),
           "shared_in_calibration_passes": round(t_shared / unit, 2),
           "mask_entries_differing": differing, "block0_rules": rules}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
