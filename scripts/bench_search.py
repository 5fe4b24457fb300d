"""Where a UniPruning search step spends its time on the embedded model, and the optimisations kept.

Measures, in one process and one run (ratios, not absolute times):
- one forward + backward of the LM loss on one calibration window (the drift mode's unavoidable cost);
- the stochRIA metric over all prunable matrices with the exact sampler vs the cyclic one;
- the quantile threshold of the prox over all matrices by partial top-k vs two kthvalue calls;
- the drift step's own overhead, through the search's code (``mirror_descent._score_and_update``: the step metric,
  the dual step and the prox of every matrix, with V and Γ on the device or moved from the host) over one forward +
  backward on the same window (issue "The headline job at real size": at most 25 %), per sampler and state place.

    python scripts/bench_search.py [--seqlen 512] [--repeat 3] [--out bench-out/search.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from unipruning_cli.metrics import build_metric
from unipruning_cli.models.loading import load_model, prunable_layers
from unipruning_cli.search.regularizers import quantile
from unipruning_cli.data.stats import ActivationStats


def timed(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def kth_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The unoptimised rule: two kthvalue calls (what quantile() did before partial top-k)."""
    flat = values.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    a = flat.kthvalue(lo + 1).values
    b = flat.kthvalue(min(lo + 2, flat.numel())).values
    return a + (b - a) * (pos - lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-out/search.json"))
    args = ap.parse_args()

    model_cfg = OmegaConf.create({"name": "smollm2-135m", "source": "embedded", "path": "smollm2-135m",
                                  "revision": None, "dtype": "auto", "device": "auto", "device_map": None,
                                  "trust_remote_code": False})
    model, _ = load_model(model_cfg)
    layers = prunable_layers(model)
    x = torch.randint(0, model.config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0))
    for m in layers.values():
        m.weight.requires_grad_(True)

    def fwd_bwd():
        model(input_ids=x, labels=x, use_cache=False).loss.backward()

    stats = {n: ActivationStats(sq_sum=torch.rand(m.in_features, dtype=torch.float64) * args.seqlen, count=args.seqlen)
             for n, m in layers.items()}
    gen = torch.Generator().manual_seed(0)
    res = {"model": "smollm2-135m", "seqlen": args.seqlen, "matrices": len(layers),
           "prunable_params": sum(m.weight.numel() for m in layers.values()),
           "threads": torch.get_num_threads()}
    res["fwd_bwd_s"] = timed(fwd_bwd, args.repeat)
    for sampler in ("exact", "cyclic"):
        metric = build_metric("stochria", sampler=sampler)
        res[f"stochria_{sampler}_s"] = timed(lambda: [metric.score(m.weight, stats[n], generator=gen)
                                                      for n, m in layers.items()], args.repeat)
    v = {n: torch.randn(m.weight.shape) for n, m in layers.items()}
    res["prox_quantile_topk_s"] = timed(lambda: [quantile(t.abs(), 1e-3) for t in v.values()], args.repeat)
    res["prox_quantile_kthvalue_s"] = timed(lambda: [kth_quantile(t.abs(), 1e-3) for t in v.values()], args.repeat)
    for t in v.values():  # the two rules agree
        assert torch.allclose(quantile(t.abs(), 1e-3), kth_quantile(t.abs(), 1e-3))
    res["ratio_cyclic_over_exact"] = res["stochria_cyclic_s"] / res["stochria_exact_s"]
    res["ratio_topk_over_kthvalue"] = res["prox_quantile_topk_s"] / res["prox_quantile_kthvalue_s"]
    res["drift_step_estimate_s"] = res["fwd_bwd_s"] + res["stochria_exact_s"] + res["prox_quantile_topk_s"]
    res |= step_overhead(model, layers, x, args.repeat, res["fwd_bwd_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


def step_overhead(model, layers, x, repeat: int, fwd_bwd_s: float) -> dict:
    """Seconds of one drift step's search work (all matrices) and its ratio to one forward + backward."""
    from dataclasses import replace

    from unipruning_cli.search.log import SearchLog
    from unipruning_cli.search.mirror_descent import _DriftLane, prox_generator, _score_and_update
    from unipruning_cli.search.recompute import StepStats
    from unipruning_cli.search.regularizers import L1Prox
    from unipruning_cli.search.settings import SearchSettings
    from unipruning_cli.search.state import SearchState

    names = list(layers)
    params = [layers[n].weight for n in names]
    hooks = StepStats(layers)
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    stats = hooks.take()
    hooks.remove()
    device = params[0].device
    out = {}
    for sampler in ("exact", "cyclic"):
        for where in ("device", "host"):
            settings = replace(SearchSettings(), search_state=where)
            metric = build_metric("stochria", sampler=sampler)
            state = SearchState.zeros({n: layers[n].weight.shape for n in names},
                                      device if where == "device" else torch.device("cpu"), device.type == "cuda")
            log = SearchLog(Path(tempfile.mkdtemp()) / "search.jsonl", 0)  # not written by the scoring pass
            lanes = [_DriftLane(state, L1Prox(1e-3), prox_generator(0, device), log)]
            gen = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                s = timed(lambda: _score_and_update(params, names, stats, metric, gen, lanes, settings), repeat)
            out[f"step_overhead_{sampler}_{where}_s"] = s
            out[f"step_overhead_{sampler}_{where}_ratio"] = round(s / fwd_bwd_s, 3)
    return out


if __name__ == "__main__":
    main()
