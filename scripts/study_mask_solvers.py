"""How close each reconstruction on a fixed mask gets to the least-squares optimum, per layer of one block, and at
what cost (issue 29, step 3): the masks of a finished run's cut, the block's inputs from the dense model on the first
``--windows`` calibration samples (the run's), and for each layer the output error ``‖(Ŵ - W) X‖²`` (H damped by 1 %)
over the masked weights' after OBS's sweep and after ``admm_reconstruct`` with several ADMM steps and tolerances,
with the conjugate-gradient steps and seconds each took.

    python scripts/study_mask_solvers.py --run <run> --tag 2of4 --block 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unipruning_cli.core.context import RunContext  # noqa: E402
from unipruning_cli.models.loading import load_model  # noqa: E402
from unipruning_cli.pruning.admm import admm_reconstruct  # noqa: E402
from unipruning_cli.pruning.mask_files import load_masks  # noqa: E402
from unipruning_cli.pruning.obs import damped_hessian, obs_reconstruct  # noqa: E402
from unipruning_cli.pruning.swaps import output_error  # noqa: E402
from unipruning_cli.stages.export.run import open_run  # noqa: E402

SETTINGS = ((0, 1e-2), (0, 1e-3), (0, 1e-6), (10, 1e-3), (30, 1e-3), (30, 1e-6))  # (admm_steps, tol)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--tag", default="2of4")
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--windows", type=int, default=32)
    args = p.parse_args()
    run = open_run(args.run)
    model, tok = load_model(run.cfg.model, "device")
    ctx = RunContext(run.cfg).loaded(model, tok)
    names = [n for n in ctx.layers if f"layers.{args.block}." in n]
    xtx: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook(name):
        def capture(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            xtx[name] = xtx.get(name, 0) + x.t() @ x
            count[name] = count.get(name, 0) + x.shape[0]
        return capture

    handles = [ctx.layers[n].register_forward_hook(hook(n)) for n in names]
    for sample in ctx.calibration()[0][: args.windows]:
        model(sample[None])
    for h in handles:
        h.remove()
    masks = load_masks(run.mask_path(args.tag))
    print("| layer | OBS | " + " | ".join(f"admm {a} steps, tol {t:g}" for a, t in SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    for name in names:
        w, keep = ctx.layers[name].weight.float(), masks[name]
        h = 2 * xtx[name] / count[name]
        hd = damped_hessian(h, 0.01)[0]
        masked = output_error(w * keep - w, hd)
        start = time.perf_counter()
        obs = output_error(obs_reconstruct(w, h, keep) - w, hd) / masked
        cells = [f"{obs:.4f} ({time.perf_counter() - start:.2f} s)"]
        for steps, tol in SETTINGS:
            start = time.perf_counter()
            got = admm_reconstruct(w, h, keep, admm_steps=steps, tol=tol, cg_steps=500)
            cells.append(f"{output_error(got.weight - w, hd) / masked:.4f} ({got.cg_steps} CG, "
                         f"{time.perf_counter() - start:.2f} s)")
        print(f"| {name.split('.', 3)[-1]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
