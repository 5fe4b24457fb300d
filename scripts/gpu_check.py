"""The GPU check of the headline job: plan vs measured peak GPU memory, seconds per search step, CPU vs CUDA masks.

Needs no hub and no prepared cache: a random-weight model with a named model's exact architecture
(``plan.architectures.ARCHITECTURES``) is built and saved with a small BPE tokenizer trained on generated text.
For each of drift, frozen and SparseGPT with sequential onloading it runs ``unipruning plan`` and ``unipruning prune`` (4 search steps) through the
CLI, each in its own process, and prints planned vs measured peak GPU memory (``torch.cuda.max_memory_allocated``
+ the plan's CUDA allowance) and the search's seconds per step. Then a small random Llama pruned with Wanda at
50 % on the CPU and on CUDA (fp32): the share of kept weights the two masks agree on (aim: at least 0.99).
Where more than one GPU is visible (or ``--ranks N`` is given), the multi-GPU part: the same drift search under
``torchrun --nproc-per-node N`` (FSDP2), its planned vs measured peak GPU memory per rank, seconds per step against
the one-GPU run, and how far its Γ is from the one-GPU run's (relative Frobenius norm, per matrix at worst).

    python scripts/gpu_check.py --out DIR                          # Qwen2.5-7B, seqlen 4096, on CUDA
    python scripts/gpu_check.py --arch tiny --device cpu --out DIR # the same steps on a tiny model (seqlen 256), here
    python scripts/gpu_check.py --arch tiny --device cpu --ranks 2 --out DIR  # with the 2-rank part (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the model prunes weights with a mask while activations flow through every layer of the network and sparse "
         "matrices keep half of their entries so perplexity grows slowly when calibration data is good").split()


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build(arch: str, folder: Path, device: str, dtype: str) -> None:
    """A random-weight model of ``arch`` saved in ``folder`` with a tokenizer and two corpora beside it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from unipruning_cli.plan.architectures import ARCHITECTURES

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calib.txt").write_text(text(1, 400_000))
    (folder / "eval.txt").write_text(text(2, 100_000))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([(folder / "calib.txt").read_text()],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    if arch == "tiny":
        fields = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512}
    else:
        fields = dict(ARCHITECTURES[arch])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder / "model")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def cli(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "unipruning_cli.cli", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"unipruning {' '.join(args[:1])} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="Qwen/Qwen2.5-7B", help="a hub id of plan.architectures, or tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seqlen", type=int, default=None,
                    help="window of calibration and evaluation (default: 4096; 256 for --arch tiny, 512 positions)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ranks", type=int, default=None,
                    help="ranks of the multi-GPU part (default: the visible GPUs where more than one; 0: skip it)")
    args = ap.parse_args()
    if args.seqlen is None:
        args.seqlen = 256 if args.arch == "tiny" else 4096
    args.out.mkdir(parents=True, exist_ok=True)
    for old in [*args.work.glob("run_*"), *args.work.glob("masks_*")]:  # a run directory holds one run: start afresh
        shutil.rmtree(old)
    env = {**os.environ, "UNIPRUNING_CACHE": str(args.work / "cache"), "UNIPRUNING_RUNS": str(args.work / "runs"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    t0 = time.perf_counter()
    build(args.arch, args.work, args.device, dtype)
    report = {"arch": args.arch, "device": args.device, "seqlen": args.seqlen, "build_seconds": round(time.perf_counter() - t0, 1)}
    gpus = ["--gpus", "1"] if args.device == "cuda" else ["--gpus", "0"]
    common = [f"model=local", f"model.path={args.work / 'model'}", f"model.device={args.device}", f"model.dtype={dtype}",
              f"model.seqlen={args.seqlen}", f"calibration.source={args.work / 'calib.txt'}", "calibration.nsamples=8",
              f"eval.corpora=[{args.work / 'eval.txt'}]", "eval.max_windows=2", "eval.batch_size=1",
              f"schedule.steps={args.steps}", "reuse_search=false"]
    runs = {"drift": ["method=unipruning", "schedule.weight_mode=drift"],
            "frozen": ["method=unipruning", "schedule.weight_mode=frozen"],
            # sequential onloading: the blocks in host memory, one at a time on the GPU
            "sparsegpt_onload": ["method=sparsegpt", "model.placement=onload", "calibration.mode=sequential"]}
    for mode, extra in runs.items():
        over = [*common, *extra]
        cli(["plan", *over, *gpus, "--json", str(args.out / f"plan_{mode}.json")], env)
        plan = json.loads((args.out / f"plan_{mode}.json").read_text())
        run = args.work / f"run_{mode}"
        seconds, _ = cli(["prune", *over, f"hydra.run.dir={run}"], env)
        m = json.loads((run / "metrics.json").read_text())
        measured_gpu = m["memory"].get("peak_cuda_mib", 0) / 1024 + (0.75 if args.device == "cuda" else 0)
        report[mode] = {"planned_gpu_gib": plan["peak_gpu_gib"], "measured_gpu_gib": round(measured_gpu, 2),
                        "planned_host_gib": plan["peak_host_gib"],
                        "measured_host_gib": round(m["memory"]["peak_rss_mib"] / 1024, 2),
                        "search_seconds_per_step": round(m["seconds"].get("search", 0) / args.steps, 2),
                        "stages_cuda_mib": m["memory"].get("stages_cuda_mib"), "placement": m["placement"],
                        "process_seconds": round(seconds, 1), "stages": plan["stages"]}
        print(json.dumps({mode: {k: v for k, v in report[mode].items() if k != "stages"}}), flush=True)
    ranks = args.ranks if args.ranks is not None else (_visible_gpus() if args.device == "cuda" else 0)
    if ranks > 1:
        report["fsdp"] = sharded_search(args, env, [*common, *runs["drift"]], ranks, report["drift"])
        print(json.dumps({"fsdp": {k: v for k, v in report["fsdp"].items() if k != "stages"}}), flush=True)
    report["masks_cpu_vs_device"] = masks_agreement(args, env)
    print(json.dumps({"masks_cpu_vs_device": report["masks_cpu_vs_device"]}), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def sharded_search(args, env, over: list[str], ranks: int, one: dict) -> dict:
    """The drift search of ``over`` under ``torchrun --nproc-per-node ranks`` (FSDP2): plan vs measured peak GPU
    memory of rank 0 in the search, seconds per step against the one-process run ``one``, Γ against its Γ."""
    import torch

    from unipruning_cli.rundir import load_tensors

    plan_file = args.out / "plan_fsdp.json"
    cli(["plan", *over, "--gpus", str(ranks if args.device == "cuda" else 0), "--json", str(plan_file)], env)
    plan = json.loads(plan_file.read_text())
    run = args.work / "run_fsdp"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                           "-m", "unipruning_cli", "prune", *over, f"hydra.run.dir={run}"], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"torchrun prune failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    seconds = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    search = json.loads((run / "stages" / "search.json").read_text())["info"]
    a, b = load_tensors(args.work / "run_drift" / "gamma.safetensors"), load_tensors(run / "gamma.safetensors")
    worst = max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a)
    stages = m["memory"].get("stages_cuda_mib") or {}
    return {"ranks": ranks, "planned_gpu_gib": plan["peak_gpu_gib"], "planned_host_gib": plan["peak_host_gib"],
            "measured_search_gpu_gib_rank0": round(stages.get("search", 0) / 1024 + (0.75 if args.device == "cuda" else 0), 2),
            "search_seconds_per_step": round(search["search_seconds"] / args.steps, 2),
            "one_process_seconds_per_step": one["search_seconds_per_step"], "sharding": search.get("sharding"),
            "gamma_rel_diff_worst_matrix": worst, "process_seconds": round(seconds, 1), "stages": plan["stages"],
            "torch": torch.__version__}


def masks_agreement(args, env) -> dict:
    """Wanda at 50 % of a small random Llama (fp32) on the CPU and on ``--device``: kept weights in common."""
    import torch

    from unipruning_cli.mask_files import load_masks

    small = args.work / "small"
    build("tiny", small, "cpu", "float32")
    runs = {}
    for device in ("cpu", args.device):
        run = args.work / f"masks_{device}"
        cli(["prune", "model=local", f"model.path={small / 'model'}", f"model.device={device}", "model.dtype=float32",
             "model.seqlen=256", f"calibration.source={small / 'calib.txt'}", "calibration.nsamples=16",
             f"eval.corpora=[{small / 'eval.txt'}]", "eval.max_windows=2", "method=local", "local_metric=wanda",
             "sparsity=0.5", f"hydra.run.dir={run}"], env)
        runs[device] = load_masks(run / "masks" / "s0.50_per_row.safetensors")
    a, b = runs["cpu"], runs[args.device]
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    kept = sum(int(a[n].sum()) for n in a)
    return {"kept_in_common": round(both / kept, 5), "matrices": len(a), "ok": both / kept >= 0.99}


if __name__ == "__main__":
    main()
