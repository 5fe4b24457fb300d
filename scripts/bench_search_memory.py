"""Memory of the drift search per prunable weight, measured: the code in this tree against an earlier commit.

Each (tree, metric) runs in a fresh process on the CPU: a random-weight Llama (width 512, 4 blocks, fp32),
windows of ``--seqlen`` tokens (32: activations small next to the search state; 1024: activations large), and
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS at once and the peak RSS
follows the live tensors instead of glibc's heap. Reported: the peak RSS the search added over the
loaded model, in bytes per prunable weight, the seconds per search step, and the ratios this tree / the other
(run alone: the timing shares the machine with nothing else).

    python scripts/bench_search_memory.py [--base 002debf] [--steps 3] [--metrics wanda stochria] [--seqlen 32]

``--base``: a commit to compare with (checked out into a temporary git worktree, removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench_common import run_json_child

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, tempfile, time, torch
from pathlib import Path
from bench_common import reset_peak_rss, status_mib
from transformers import LlamaConfig, LlamaForCausalLM
from unipruning_cli.metrics import build_metric
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.search import SearchSettings, build_regularizer, search_drift
assert search_drift.__code__.co_filename.startswith(sys.argv[3]), search_drift.__code__.co_filename
metric_name, steps, seqlen = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seqlen)
model = LlamaForCausalLM(cfg).eval()
layers = prunable_layers(model)
numel = sum(m.weight.numel() for m in layers.values())
windows = torch.randint(0, 512, (4, seqlen))
with tempfile.TemporaryDirectory() as tmp:
    reset_peak_rss()
    before = status_mib("VmRSS")
    t0 = time.perf_counter()
    gamma, _ = search_drift(model, layers, windows, build_metric(metric_name), build_regularizer("l1", 1e-3, "quantile"),
                            SearchSettings(steps=steps, checkpoint_every=10**6), Path(tmp) / "c.safetensors", "fp",
                            Path(tmp) / "s.jsonl")
    added = status_mib("VmHWM") - before
    seconds = time.perf_counter() - t0
print(json.dumps({"metric": metric_name, "prunable_weights": numel, "added_mib": round(added, 1),
                  "bytes_per_weight": round(added * 2**20 / numel, 2), "seconds_per_step": round(seconds / steps, 3)}))
"""


def measure(tree: Path, metric: str, steps: int, seqlen: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(tree)}
    return run_json_child(["-c", CHILD, metric, str(steps), str(tree), str(seqlen)], env=env, cwd=tree)  # imports that tree's package


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="a commit to compare with (default: this tree alone)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--metrics", nargs="+", default=["wanda", "stochria"])
    ap.add_argument("--seqlen", type=int, default=32, help="tokens per window (activations grow with it)")
    args = ap.parse_args()
    out = {"steps": args.steps, "seqlen": args.seqlen, "this": {m: measure(REPO, m, args.steps, args.seqlen) for m in args.metrics}}
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base],
                           check=True, capture_output=True)
            try:
                out["base"] = {"commit": args.base, **{m: measure(base, m, args.steps, args.seqlen) for m in args.metrics}}
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=True)
        out["ratio_this_over_base"] = {
            m: {k: round(out["this"][m][k] / out["base"][m][k], 3) for k in ("bytes_per_weight", "seconds_per_step")}
            for m in args.metrics}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
