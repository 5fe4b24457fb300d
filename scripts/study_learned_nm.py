"""Can an N:M choice learned end to end beat the refined one with the weights kept (issue 29, step 2)? A study, not a
feature: each N:M group of a cut gets one logit per pattern (the C(M, N) ways to keep N of M, MaskLLM's
parametrisation, Fang et al. 2024), set from a prior mask (``kappa`` times the number of kept weights a pattern
shares with it, so the prior is the argmax), and the logits are trained on the calibration windows against the dense
model's next-token distribution (KL, the dense model as teacher) or the LM loss, the weights never changing
(W x mask). After training each group keeps its argmax pattern; the result is measured on the held-out calibration
windows (``allocation.holdout_windows``, the data a choice may be made on) and on the evaluation corpus (shown).

    python scripts/study_learned_nm.py --run <run> --prior /tmp/refined_2of4.safetensors \\
        --rule soft --noise 1 --kappa 3 --lr 0.05 --tau0 1 --tau1 0.1 --steps 200 --eval-every 50

Rules: ``soft`` (the Gumbel-softmax mixture of patterns in the forward, MaskLLM), ``st`` (straight through: the
argmax pattern in the forward, the softmax's gradient backward). ``--sgd Q``: SGD (momentum 0.9) whose learning rate
makes the 99.99th percentile of the first step's logit gradients a step of Q, instead of Adam at ``--lr``.
``--flips F``: at most a fraction F of the groups may change pattern per step (those whose new pattern leads by the
most; the others are held where they were). Without ``--prior`` the run's cut is refined first (``refine=swap``,
about 10 minutes on SmolLM2-135M) and saved to ``--prior-out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unipruning_cli.core.context import RunContext  # noqa: E402
from unipruning_cli.core.pinned import HostCopy  # noqa: E402
from unipruning_cli.evaluation.perplexity import perplexity  # noqa: E402
from unipruning_cli.models.loading import load_model  # noqa: E402
from unipruning_cli.pruning.mask_files import load_masks  # noqa: E402
from unipruning_cli.pruning.targets import nm_of_tag  # noqa: E402
from unipruning_cli.pruning.weights import apply_masks, restore_weights  # noqa: E402
from unipruning_cli.stages.allocation import holdout_loss, holdout_windows  # noqa: E402
from unipruning_cli.stages.evaluation import eval_windows_of  # noqa: E402
from unipruning_cli.stages.export.run import open_run  # noqa: E402
from unipruning_cli.stages.refinement import SwapRefiner, refine  # noqa: E402


def patterns(n: int, m: int) -> torch.Tensor:
    """fp32 ``[C(m, n), m]``: row k keeps the k-th combination of n of the m positions (1.0 kept, 0.0 pruned)."""
    return torch.tensor([[float(i in c) for i in range(m)] for c in itertools.combinations(range(m), n)])


def flip_cap(logits: dict, current: dict, cap: int) -> int:
    """Let the ``cap`` groups (over every layer; all of them where fewer lead elsewhere) whose new argmax pattern leads
    their current one by the most move to it; the others get their current pattern's logit raised just above the rest. Returns the
    number moved (``current``, name -> int64 ``[out, groups]``, updated in place)."""
    cands = []
    for name, z in logits.items():
        new = z.argmax(-1)
        at = (new != current[name]).nonzero(as_tuple=True)
        if at[0].numel():
            cands.append((z[at + (new[at],)] - z[at + (current[name][at],)], name, at, new[at]))
    if not cands:
        return 0
    lead = torch.cat([c[0] for c in cands])
    chosen = torch.zeros_like(lead, dtype=torch.bool)
    chosen[torch.topk(lead, min(cap, lead.numel())).indices] = True
    moved = 0
    for (_, name, at, new), ok in zip(cands, chosen.split([len(c[0]) for c in cands])):
        current[name][tuple(a[ok] for a in at)] = new[ok]
        moved += int(ok.sum())
        held = tuple(a[~ok] for a in at)
        z = logits[name]
        z[held + (current[name][held],)] = z[held].max(-1).values + 1e-3
    return moved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run holding the cut --tag (as cut, unrefined)")
    p.add_argument("--tag", default="2of4")
    p.add_argument("--prior", help="a mask file to start from (default: the run's cut refined by swaps)")
    p.add_argument("--prior-out", default="bench-out/refined_prior.safetensors")
    p.add_argument("--rule", default="soft", choices=("soft", "st"))
    p.add_argument("--kappa", type=float, default=3.0)
    p.add_argument("--noise", type=float, default=1.0, help="scale of the Gumbel noise (0: none)")
    p.add_argument("--tau0", type=float, default=1.0)
    p.add_argument("--tau1", type=float, default=0.1, help="the temperature at the last step (geometric schedule)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sgd", type=float, default=0.0)
    p.add_argument("--flips", type=float, default=0.0)
    p.add_argument("--loss", default="kd", choices=("kd", "lm"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--stop-after", type=int, help="measure after this many steps of the --steps schedule, then stop")
    p.add_argument("--out", default="bench-out/learned_nm.json")
    args = p.parse_args()
    torch.manual_seed(0)
    run = open_run(args.run)
    cfg = run.cfg
    model, tok = load_model(cfg.model, "device")
    model.requires_grad_(False)
    ctx = RunContext(cfg).loaded(model, tok)
    layers = ctx.layers
    windows, held, calib = eval_windows_of(cfg, tok), holdout_windows(ctx), ctx.calibration()[0]
    calib = calib if torch.is_tensor(calib) else torch.stack(list(calib))
    n, m = nm_of_tag(args.tag)
    if args.prior:
        prior = load_file(args.prior)
    else:
        prior = refine(model, calib, SwapRefiner(load_masks(run.mask_path(args.tag)), nm=(n, m)), ctx.passes)[0]
        Path(args.prior_out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in prior.items()}, args.prior_out)
    device = next(model.parameters()).device  # the logits live where the weights do (a GPU, where there is one)
    prior = {k: v.to(device) for k, v in prior.items()}
    pats = patterns(n, m).to(device)
    param_of = {mod: name + ".weight" for name, mod in model.named_modules()}
    # views of the modules' weights: evaluate() masks them in place and puts them back from ``original``
    weights = {k: mod.weight.detach() for k, mod in layers.items()}
    logits = {k: (args.kappa * (prior[k].reshape(w.shape[0], -1, m).float() @ pats.T)).requires_grad_(True)
              for k, w in weights.items()}
    current = {k: z.detach().argmax(-1) for k, z in logits.items()}
    groups = sum(c.numel() for c in current.values())
    opt = torch.optim.Adam(list(logits.values()), lr=args.lr)
    original = HostCopy({k: mod.weight for k, mod in layers.items()})
    rows = []

    def evaluate(label: str) -> None:
        masks = {k: pats[z.detach().argmax(-1)].reshape(weights[k].shape).bool() for k, z in logits.items()}
        moved = sum(int((masks[k] != prior[k]).sum()) for k in masks) / 2 / sum(w.numel() for w in weights.values())
        apply_masks(layers, masks)
        row = {"label": label, "holdout_loss": holdout_loss(ctx, held), "moved": moved,
               "ppl": {c: perplexity(model, w, 1, label).ppl for c, w in windows.items()}}
        restore_weights(layers, original.tensors)
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))

    evaluate("prior")
    start = time.monotonic()
    last = args.stop_after or args.steps
    for step in range(last):
        tau = args.tau0 * (args.tau1 / args.tau0) ** (step / max(1, args.steps - 1))
        opt.zero_grad(set_to_none=True)
        ids = calib[step % calib.shape[0]][None].to(device)
        params = {}
        for k, z in logits.items():
            if args.noise:
                z = z - args.noise * torch.log(-torch.log(torch.rand_like(z).clamp_(1e-10, 1 - 1e-10)))
            prob = torch.softmax(z / tau, -1)
            if args.rule == "st":
                prob = torch.nn.functional.one_hot(z.detach().argmax(-1), len(pats)).to(prob) + prob - prob.detach()
            params[param_of[layers[k]]] = weights[k] * (prob @ pats).reshape(weights[k].shape)
        student = functional_call(model, params, (ids,)).logits[0, :-1].float()
        if args.loss == "kd":
            with torch.no_grad():
                teacher = model(ids).logits[0, :-1].float().log_softmax(-1)
            loss = torch.sum(teacher.exp() * (teacher - student.log_softmax(-1)), -1).mean()
        else:
            loss = torch.nn.functional.cross_entropy(student, ids[0, 1:])
        loss.backward()
        if args.sgd and step == 0:
            sample = torch.cat([z.grad.abs().flatten()[::97] for z in logits.values()])[:10_000_000]
            opt = torch.optim.SGD(list(logits.values()), lr=args.sgd / float(torch.quantile(sample, 0.9999)),
                                  momentum=0.9)
        opt.step()
        moved = flip_cap({k: z.data for k, z in logits.items()}, current, int(args.flips * groups)) if args.flips else 0
        print(f"step {step} tau {tau:.3f} loss {float(loss.detach()):.4f} moved {moved} {time.monotonic() - start:.0f}s",
              flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < last:
            evaluate(f"step {step + 1}")
    evaluate(f"step {last}")


if __name__ == "__main__":
    main()
