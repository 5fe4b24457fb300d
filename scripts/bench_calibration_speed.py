"""What sharing the statistics of a common input saves in Hessian calibration (SparseGPT's pass).

q/k/v read one tensor and gate/up another, so a Llama block has 4 distinct linear inputs for 7
layers. ``calibrate_blockwise(share_inputs=True)`` computes each input's XᵀX once. This runs the
same calibration with sharing on and off, alternately, in one process on a random-weight model
with the embedded model's shapes (SmolLM2-135M: width 576, MLP 1536, 9 heads, 3 KV heads), checks
the Hessians are bit-identical, and prints the time ratio. Keep sharing only while ratio < 1.

    python scripts/bench_calibration_speed.py [--depth 4] [--nsamples 32] [--seqlen 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_common import SMOLLM2
from transformers import LlamaConfig, LlamaForCausalLM

from unipruning_cli.data import calibration
from unipruning_cli.data.calibration import calibrate_blockwise


def run(model, windows, share: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    hessians: dict[str, torch.Tensor] = {}
    computed = []
    original = calibration.SharedInputs

    class Counting(original):  # count products across blocks without touching the library
        def clear(self) -> None:
            computed.append(self.computed)
            super().clear()

    calibration.SharedInputs = Counting
    try:
        t0 = time.perf_counter()
        calibrate_blockwise(model, windows, want_hessian=True, share_inputs=share,
                            on_block=lambda i, layers, stats: hessians.update({n: s.xtx for n, s in stats.items()}))
        return time.perf_counter() - t0, hessians, sum(computed)
    finally:
        calibration.SharedInputs = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, **{**SMOLLM2, "num_hidden_layers": args.depth},
                      max_position_embeddings=args.seqlen)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    windows = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen))
    times = {True: [], False: []}
    products = {}
    results = {}
    for _ in range(args.repeats):
        for share in (False, True):
            secs, hess, n = run(model, windows, share)
            times[share].append(secs)
            products[share] = n
            results[share] = hess
    identical = all(torch.equal(results[True][k], results[False][k]) for k in results[False])
    best = {k: min(v) for k, v in times.items()}
    out = {"depth": args.depth, "tokens": args.nsamples * args.seqlen,
           "seconds_per_layer_inputs": round(best[False], 2), "seconds_shared": round(best[True], 2),
           "ratio_shared_over_unshared": round(best[True] / best[False], 3),
           "products_unshared": products[False], "products_shared": products[True],
           "hessians_identical": identical}
    print(json.dumps(out, indent=2))
    if not identical:
        raise SystemExit("shared and per-layer Hessians differ")


if __name__ == "__main__":
    main()
