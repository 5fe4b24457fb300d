"""What fits where: ``unipruning plan`` of the named large models for each method on one GPU of each size.

    python scripts/plan_table.py [--models qwen2.5-7b llama-3.1-8b llama-3.1-70b] [--sizes 24 80 141]

Prints a markdown table (for each card size, whether the run fits, its peak GPU and host GiB, and "onload" where
the plan chose sequential onloading; a card of "80 GB" taken as the 80 GiB nvidia-smi reports, with the plan's 8 %
margin; host memory not limited, its peak shown),
the "What fits one GPU" table of docs/large-models.md. Needs no weights and no hub.
"""

from __future__ import annotations

import argparse

RUNS = {"drift (default)": [], "frozen": ["schedule.weight_mode=frozen"],
        "Wanda": ["method=local", "local_metric=wanda"], "SparseGPT": ["method=sparsegpt"]}


def main() -> None:
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.plan.estimate import GIB, plan_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["qwen2.5-7b", "llama-3.1-8b", "llama-3.1-70b"])
    ap.add_argument("--sizes", nargs="+", type=float, default=[24, 80, 141])
    args = ap.parse_args()
    print("| model (seqlen) | run | " + " | ".join(f"{s:g} GB card: fits (peak GPU / host GiB)" for s in args.sizes)
          + " |")
    print("|---|---|" + "---|" * len(args.sizes))
    for model in args.models:
        for label, extra in RUNS.items():
            cfg = compose_prune([f"model={model}", *extra])
            cells = []
            for size in args.sizes:  # search_state=auto: where V and Γ go depends on the card
                plan = plan_run(cfg, 1, size * GIB, None)
                cells.append(f"{'yes' if plan.fits else 'no'} ({plan.peak_gpu / GIB:.1f} / {plan.peak_host / GIB:.0f})"
                             + (", onload" if plan.onload else ""))
            print(f"| {model} ({cfg.model.seqlen}) | {label} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
