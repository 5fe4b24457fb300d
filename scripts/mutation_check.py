"""Mutation check: deliberate bugs in the method, each of which must make at least one test fail.

Each mutation is a textual change to one file of a copy of the working tree (the tree itself is never touched);
the named test files then run against the copy (``PYTHONPATH`` first, so the copy's package is the one imported).
A mutation that leaves those tests green is a hole in the suite: the script exits 1.

    python scripts/mutation_check.py            # every mutation (a few minutes on 2 cores)
    python scripts/mutation_check.py --only no-clip,rho-ignored
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPY = ("unipruning_cli", "tests", "configs", "scripts", "pyproject.toml", "README.md")

# name: (file, old text, new text, test files, what the bug is)
MUTATIONS = {
    "metric-after-step": (
        "unipruning_cli/search/mirror_descent.py",
        "            accumulated = _score_and_update(params, names, stats, metric, gen, lanes, settings, shards)\n"
        "            _weight_step(accumulated, opt)\n",
        "            opt.step()\n"
        "            accumulated = _score_and_update(params, names, stats, metric, gen, lanes, settings, shards)\n",
        ["tests/test_drift_reference.py"], "the step metric S is taken on W after this step's AdamW update"),
    "no-clip": (
        "unipruning_cli/search/mirror_descent.py",
        "                torch.nn.utils.clip_grad_norm_(clipped, settings.grad_clip)\n",
        "                pass\n",
        ["tests/test_drift_reference.py"], "the accumulated gradient is never clipped"),
    "no-accumulation": (
        "unipruning_cli/search/mirror_descent.py",
        "            if not settings.accumulate_grads_across_steps:\n",
        "            if True:\n",
        ["tests/test_drift_reference.py"], "gradients are zeroed after every step (no accumulation across steps)"),
    "rho-ignored": (
        "unipruning_cli/search/mirror_descent.py",
        "        if settings.rho > 0:",
        "        if False:",
        ["tests/test_drift_reference.py"], "the ρ alignment gradient never reaches W"),
    "decay-ignored": (
        "unipruning_cli/search/settings.py",
        'LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}',
        'LR_SCHEDULES = {"linear": "linear", "cosine": "linear", "constant": "linear"}',
        ["tests/test_drift_reference.py"], "schedule.decay is read but every schedule is linear"),
    "clip-prunable-only": (
        "unipruning_cli/search/mirror_descent.py",
        '        if settings.grad_clip_scope == "model" else {}',
        "        if False else {}",
        ["tests/test_drift_reference.py"], "the clipping norm ignores the gradients of embeddings, norms and lm_head"),
    "rho-round-trip": (
        "unipruning_cli/search/mirror_descent.py",
        "        p.grad = acc\n",
        "        p.grad = acc.add_(p.grad - acc).sub_(p.grad - acc)\n",
        ["tests/test_drift_reference.py"], "the ρ term is added to and subtracted from the accumulated gradient"),
    "ria-wrong-sum": (
        "unipruning_cli/metrics/ria.py",
        "    col_sum = abs_w.sum(dim=0, keepdim=True)",
        "    col_sum = abs_w.sum(dim=1, keepdim=True)",
        ["tests/test_metrics.py"], "RIA's column term is normalised by the row sum (both terms over the same axis)"),
    "per-row-wrong-axis": (
        "unipruning_cli/pruning/masks.py",
        "    in_features = values.shape[1]\n"
        "    return _keep_top_along_last_dim(values, in_features - num_pruned(in_features, sparsity))\n",
        "    in_features = values.shape[0]\n"
        "    return _keep_top_along_last_dim(values.T.contiguous(), in_features - num_pruned(in_features, sparsity)).T\n",
        ["tests/test_masks.py", "tests/test_mask_rules.py"], "the per-row cut keeps a fixed count per input column"),
    "baseline-not-sequential": (
        "unipruning_cli/stages/baselines.py",
        "settings,\n                      restore=True).masks",
        "settings,\n                      sequential=False, restore=True).masks",
        ["tests/test_baselines.py"], "an eval.baselines entry said sequential but used the dense model's statistics"),
    "block0-kwargs": (
        "unipruning_cli/data/calibration.py",
        'stats, streams = _calibrate_block(block, f"{prefix}.{i}", i, streams, kwargs[i], sequential,',
        'stats, streams = _calibrate_block(block, f"{prefix}.{i}", i, streams, kwargs[0], sequential,',
        ["tests/test_protocols.py"], "every block is calibrated with block 0's attention mask and keywords"),
    "admm-cg-off-mask": (
        "unipruning_cli/pruning/admm.py",
        "        ap = (p @ h) * mask\n",
        "        ap = p @ h\n",
        ["tests/test_admm.py"], "the conjugate gradients' product leaves the mask: the solve is not the one on the mask"),
    "admm-dual-sign": (
        "unipruning_cli/pruning/admm.py",
        "            v.add_(r * (w - d))\n",
        "            v.sub_(r * (w - d))\n",
        ["tests/test_admm.py"], "ADMM's dual ascent goes the wrong way"),
    "sparsegpt-wrong-saliency": (
        "unipruning_cli/pruning/obs.py",
        "    scores = w_block.pow(2) / hinv_diag.pow(2).unsqueeze(0)",
        "    scores = w_block.pow(2) / hinv_diag.unsqueeze(0)",
        ["tests/test_sparsegpt.py"], "SparseGPT selects by w²/[H⁻¹]_cc instead of w²/[H⁻¹]_cc²"),
    "sharded-metric-on-rows": (
        "unipruning_cli/search/mirror_descent.py",
        "        m = shards.rows(metric.score(shards.full(p).to(dev), stats[n], generator=gen if metric.stochastic else None))",
        "        m = metric.score(shards.local(p).to(dev), stats[n], generator=gen if metric.stochastic else None)",
        ["tests/test_distributed.py::test_two_ranks_give_the_single_process_gamma_and_masks_in_one_run_directory"],
        "over FSDP2 ranks each rank scores only its rows (RIA's column sums over a shard)"),
    "sharded-quantile-local": (
        "unipruning_cli/search/shards.py",
        "        return _values_at(self.v.detach().abs(), positions, self.shape, self.ranks)",
        "        return self.v.detach().abs().reshape(-1)[positions.clamp_max(self.v.numel() - 1)]",
        ["tests/test_distributed.py::test_sharded_prox_gather_and_log_equal_the_whole_matrix_s"],
        "over FSDP2 ranks the prox's sampled λ-quantile reads this rank's rows only"),
    "reap-without-router-weight": (
        "unipruning_cli/pruning/experts.py",
        "st.reap[e] += float((weights.detach().double() * out.detach().double().norm(dim=-1)).sum())",
        "st.reap[e] += float((out.detach().double().norm(dim=-1)).sum())",
        ["tests/test_experts.py"], "REAP's score forgets the router weight of each routed token"),
    "flap-mean-square": (
        "unipruning_cli/pruning/channels.py",
        "return (w.float().square() * stats[name].variance.to(w.device).float()).cpu()",
        "return (w.float().square() * stats[name].mean_sq.to(w.device).float()).cpu()",
        ["tests/test_channels.py"], "FLAP's fluctuation is the mean square of the input, not its variance"),
    "zeroed-experts-still-routed": (
        "unipruning_cli/stages/evaluation.py",
        "            if is_experts_tag(tag):  # evaluated as exported",
        "            if False:  # evaluated as exported",
        ["tests/test_experts.py"], "an experts cut is evaluated as zeroed experts the router still sends tokens to"),
}


def copy_tree(dst: Path) -> None:
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)


def run_one(name: str, spec: tuple, workdir: Path) -> tuple[bool, float, str]:
    """Apply one mutation to a fresh copy, run its tests; returns (caught, seconds, the failing tests)."""
    path, old, new, tests, _ = spec
    tree = workdir / name
    copy_tree(tree)
    target = tree / path
    text = target.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutation {name}: the text to change occurs {text.count(old)} times in {path}; "
                         f"update MUTATIONS to the current code")
    target.write_text(text.replace(old, new))
    env = {**os.environ, "PYTHONPATH": str(tree), "UNIPRUNING_CONFIG_DIR": str(tree / "configs")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return proc.returncode != 0 and bool(failed), time.perf_counter() - t0, ", ".join(failed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma list of mutation names")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(MUTATIONS)
    holes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            caught, secs, failed = run_one(name, MUTATIONS[name], Path(tmp))
            print(f"{name:26s} {'caught' if caught else 'NOT CAUGHT':10s} {secs:6.1f} s  {MUTATIONS[name][4]}"
                  + (f"\n{'':26s} failing: {failed}" if failed else ""), flush=True)
            if not caught:
                holes.append(name)
    if holes:
        raise SystemExit(f"mutations the tests did not catch: {', '.join(holes)}")


if __name__ == "__main__":
    main()
