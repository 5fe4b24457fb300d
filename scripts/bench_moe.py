"""The per-expert loop of ``ExpertLinears.forward`` (``models/layouts.py``): one stable sort per layer against the
``torch.where`` per expert it replaced (shared/docs/gpu-readiness.md §6).

Same inputs, same outputs (asserted bit for bit here, tested in tests/test_moe.py). On a GPU the gain is the host
syncs (one ``.tolist()`` per layer instead of one ``nonzero`` per hit expert), which this CPU cannot show: here the
figures are the launch and indexing overhead alone, for the routing by itself and for the whole forward. Shapes:
one Mixtral-style layer of random weights, ``--experts`` experts of ``--intermediate``, top ``--top-k`` of
``--tokens`` tokens, width ``--hidden``; medians of ``--reps`` timings each, interleaved.

    python scripts/bench_moe.py [--experts 64] [--top-k 8] [--tokens 512] [--hidden 256] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from unipruning_cli.models.layouts import ExpertLinears


def where_routes(top_k_index: torch.Tensor, n_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """BASELINE (the old routing, transformers' eager loop): a one-hot ``[E + 1, k, T]`` mask, then one
    ``torch.where`` (a nonzero: a host sync on a GPU) per hit expert."""
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    return [(e, *torch.where(mask[e])) for e in hit[:, 0].tolist() if e != n_experts]


def where_forward(experts: ExpertLinears, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """BASELINE (the old ``ExpertLinears.forward``): the per-expert ``torch.where`` loop."""
    out = torch.zeros_like(hidden_states)
    for e, top_k_pos, token_idx in where_routes(top_k_index, len(experts)):
        h = getattr(experts[e], experts.up_name)(hidden_states[token_idx])
        h = experts.fused_module._apply_gate(h) if experts.has_gate else experts.fused_module.act_fn(h)
        h = experts[e].down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fused = MixtralExperts(MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                         num_local_experts=args.experts, num_experts_per_tok=args.top_k))
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.05)
    experts = ExpertLinears(fused)
    x = torch.randn(args.tokens, args.hidden)
    weights, index = torch.softmax(torch.randn(args.tokens, args.experts), -1).topk(args.top_k, dim=-1)
    with torch.no_grad():
        assert torch.equal(experts(x, index, weights), where_forward(experts, x, index, weights))
    new, old = experts.routes(index), where_routes(index, args.experts)
    assert [r[0] for r in new] == [r[0] for r in old]
    assert all(torch.equal(a, b) for n, o in zip(new, old) for a, b in zip(n[1:], o[1:]))

    cases = {"routing_old_where": lambda: where_routes(index, args.experts),
             "routing_new_sort": lambda: experts.routes(index),
             "forward_old_where": lambda: where_forward(experts, x, index, weights),
             "forward_new_sort": lambda: experts(x, index, weights)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.reps):  # interleaved, so a neighbour's load falls on both alike
            for name, fn in cases.items():
                times[name].append(_seconds(fn))
    out = {"experts": args.experts, "top_k": args.top_k, "tokens": args.tokens, "hidden": args.hidden,
           "intermediate": args.intermediate, "threads": args.threads, "reps": args.reps,
           "hit_experts": len(new)}
    out.update({f"{name}_median_ms": round(1e3 * statistics.median(t), 3) for name, t in times.items()})
    for part in ("routing", "forward"):
        new_ms, old_ms = out[f"{part}_new_sort_median_ms"], out[f"{part}_old_where_median_ms"]
        out[f"{part}_ratio_new_over_old"] = round(new_ms / old_ms, 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
