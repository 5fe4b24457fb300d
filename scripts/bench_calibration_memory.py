"""Peak memory of layer-by-layer calibration grows with one block, not with the number of blocks.

Random-weight Llama models of the same width and increasing depth are calibrated in fresh processes
(peak RSS is per process). Reported: peak RSS after loading the model, peak RSS of the whole process,
and their difference, which is what calibration added; the weights grow with depth, the difference
must not. A full-model forward keeping every block's activations (what per-layer hooks on a single
whole-model pass would hold) is measured alongside for contrast.

    python scripts/bench_calibration_memory.py [--depths 4 16] [--nsamples 32] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json

from bench_common import run_json_child

CHILD = r"""
import json, sys, torch
from bench_common import peak_rss_mib
from transformers import LlamaConfig, LlamaForCausalLM
from unipruning_cli.data.calibration import calibrate_blockwise
depth, nsamples, seqlen, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=depth,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seqlen)
model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
windows = torch.randint(0, 1000, (nsamples, seqlen))
after_load = peak_rss_mib()
if mode == "blockwise":
    calibrate_blockwise(model, windows)
else:  # every block's activations alive at once: one forward keeping all hidden states
    with torch.no_grad():
        keep = [model(w[None], output_hidden_states=True, use_cache=False).hidden_states for w in windows]
print(json.dumps({"after_load_mib": after_load, "peak_mib": peak_rss_mib()}))
"""


def measure(depth: int, nsamples: int, seqlen: int, mode: str) -> dict:
    r = run_json_child(["-c", CHILD, str(depth), str(nsamples), str(seqlen), mode])
    return {"depth": depth, "mode": mode, **r, "added_mib": round(r["peak_mib"] - r["after_load_mib"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    rows = [measure(d, args.nsamples, args.seqlen, mode) for mode in ("blockwise", "all_hidden_states")
            for d in args.depths]
    print(f"{'mode':18s} {'depth':>5s} {'after load MiB':>15s} {'peak MiB':>9s} {'added MiB':>10s}")
    for r in rows:
        print(f"{r['mode']:18s} {r['depth']:5d} {r['after_load_mib']:15.0f} {r['peak_mib']:9.0f} {r['added_mib']:10.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
