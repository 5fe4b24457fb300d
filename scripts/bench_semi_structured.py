"""Dense vs semi-structured (2:4 sparse tensor core) forward of an exported 2:4 model, on one NVIDIA GPU.

    unipruning export <run_dir> pattern=2:4 --out pruned-2of4
    python scripts/bench_semi_structured.py pruned-2of4                 # the exported model
    python scripts/bench_semi_structured.py --synthetic 4096,11008,4    # a random Llama-shaped 2:4 model

The model is loaded in float16 (``--dtype``) on the GPU, timed dense (CUDA events, after warm-up), then its
2:4 prunable Linear weights are swapped for ``torch.sparse`` semi-structured tensors
(``unipruning_cli.stages.export.to_semi_structured``) and timed again; the largest logit difference is printed
next to the times. Small models (the tiny test models, the 135M embedded one) are launch-bound; on large ones the
result depends on the GPU, the shapes and the batch (semi-structured matmuls can be slower at batch-1 decode,
pytorch #111339), so this script's numbers are the only speed figures the project states. It measures PyTorch's
research path, not a serving engine: none of the mainstream ones runs 2:4 in 2026 (vLLM #36799, TensorRT-LLM #15918).

Without an NVIDIA GPU of compute capability >= 8.0 it prints why it cannot time anything and exits 0.
``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def gpu_problem() -> str | None:
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return "no NVIDIA CUDA device is available"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return f"{torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}"
    return None


def synthetic_model(spec: str, dtype: torch.dtype):
    """A random Llama of ``hidden,intermediate,layers`` with magnitude 2:4 masks on every block Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unipruning_cli.pruning.masks import nm_mask
    from unipruning_cli.models.loading import prunable_layers

    hidden, inter, layers = (int(v) for v in spec.split(","))
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for lin in prunable_layers(model).values():
            lin.weight.mul_(nm_mask(lin.weight.float().abs(), 2, 4).to(dtype))
    return model


@torch.no_grad()
def time_forward(model, ids: torch.Tensor, iters: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of one forward, and the logits of the last one."""
    out = None
    for _ in range(warmup):
        out = model(ids, use_cache=False).logits
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(ids, use_cache=False).logits
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="an exported 2:4 HF folder (unipruning export pattern=2:4)")
    parser.add_argument("--synthetic", metavar="HIDDEN,INTER,LAYERS", help="time a random Llama-shaped 2:4 model instead")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = parser.parse_args(argv)
    if ns.folder is None and ns.synthetic is None:
        parser.error("give an exported folder or --synthetic HIDDEN,INTER,LAYERS")

    problem = gpu_problem()
    if problem is not None:
        print(f"cannot time semi-structured 2:4 kernels here: {problem}; they need an NVIDIA GPU with compute "
              f"capability >= 8.0 (Ampere or newer). Nothing was timed.")
        return 0

    from unipruning_cli.stages.export.nm import to_semi_structured

    dtype = DTYPES[ns.dtype]
    t0 = time.perf_counter()
    if ns.synthetic:
        model, label = synthetic_model(ns.synthetic, dtype), f"synthetic {ns.synthetic}"
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ns.folder, dtype=dtype).cuda().eval()
        label = str(ns.folder)
    print(f"{label}: loaded in {time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name()} ({ns.dtype})")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (ns.batch, ns.seqlen), generator=torch.Generator().manual_seed(0)).cuda()

    dense_ms, dense_logits = time_forward(model, ids, ns.iters, ns.warmup)
    dense_logits = dense_logits.float().cpu()
    conv = to_semi_structured(model)
    if not conv["converted"]:
        print(f"no layer could be converted: {json.dumps(conv['skipped'], indent=1)[:2000]}")
        return 1
    sparse_ms, sparse_logits = time_forward(model, ids, ns.iters, ns.warmup)
    diff = (sparse_logits.float().cpu() - dense_logits).abs().max().item()
    res = {"model": label, "device": torch.cuda.get_device_name(), "dtype": ns.dtype, "batch": ns.batch,
           "seqlen": ns.seqlen, "iters": ns.iters, "dense_ms": dense_ms, "semi_structured_ms": sparse_ms,
           "speedup": dense_ms / sparse_ms, "max_abs_logit_diff": diff, "backend": conv["backend"],
           "converted_layers": len(conv["converted"]), "skipped_layers": len(conv["skipped"]),
           "torch": torch.__version__}
    print(f"{'':<18}{'ms / forward':>14}")
    print(f"{'dense':<18}{dense_ms:>14.3f}")
    print(f"{'semi-structured':<18}{sparse_ms:>14.3f}")
    print(f"speed-up {res['speedup']:.3f}x ({res['backend']}, {res['converted_layers']} layers converted, "
          f"{res['skipped_layers']} skipped); max |logit diff| {diff:.3g} (batch {ns.batch} x {ns.seqlen} tokens)")
    if conv["skipped"]:
        print("skipped: " + "; ".join(f"{n}: {why}" for n, why in list(conv["skipped"].items())[:5]))
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
