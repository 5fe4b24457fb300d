"""What fits where: ``unipruning plan`` of the named large models for each method on one GPU of each size.

    python scripts/plan_table.py [--models qwen2.5-7b llama-3.1-8b llama-3.1-70b] [--sizes 24 80 141]

Prints a markdown table (peak GPU GiB per run, and whether it fits each size, a card of "80 GB" taken as the
80 GiB nvidia-smi reports, with the plan's 8 % margin; host memory not limited),
the README's "Large models" table. Needs no weights and no hub.
"""

from __future__ import annotations

import argparse

RUNS = {"drift (default)": [], "frozen": ["schedule.weight_mode=frozen"],
        "Wanda": ["method=local", "local_metric=wanda"], "SparseGPT": ["method=sparsegpt"]}


def main() -> None:
    from unipruning_cli.config import compose_prune
    from unipruning_cli.plan.estimate import GIB, USABLE, plan_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["qwen2.5-7b", "llama-3.1-8b", "llama-3.1-70b"])
    ap.add_argument("--sizes", nargs="+", type=float, default=[24, 80, 141])
    args = ap.parse_args()
    print("| model (seqlen) | run | peak GPU GiB | peak host GiB | " + " | ".join(f"{s:g} GB card" for s in args.sizes) + " |")
    print("|---|---|---|---|" + "---|" * len(args.sizes))
    for model in args.models:
        for label, extra in RUNS.items():
            cfg = compose_prune([f"model={model}", *extra])
            plan = plan_run(cfg, 1, None, None)
            fits = ["yes" if plan.peak_gpu <= USABLE * s * GIB else "no" for s in args.sizes]
            print(f"| {model} ({cfg.model.seqlen}) | {label} | {plan.peak_gpu / GIB:.1f} | {plan.peak_host / GIB:.1f} | "
                  + " | ".join(fits) + " |")


if __name__ == "__main__":
    main()
