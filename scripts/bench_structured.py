"""Structural cuts on the embedded model, measured in one run: the perplexity of MLP channel cuts (UniPruning's Γ, FLAP
and Wanda-sp, each without compensation, with ``reconstruct=ls`` and with ``reconstruct=bias``), and each exported model
against the dense one with plain transformers on this machine: file size, peak memory, prefill tokens/s at 512 tokens
and decode tokens/s at batch 1.

Three ``unipruning prune`` processes (``reconstruct=none``, ``ls`` and ``bias``), each cutting every share from one Γ
(frozen search, stochRIA anchor) with FLAP's cut beside it (``pattern.channel_score=flap``, added by every UniPruning
channels run) and ``eval.baselines=[wanda@one_shot]`` (Wanda's scores summed per channel: Wanda-sp); where a reused
run predates FLAP, FLAP's cuts come from ``method=local pattern.channel_score=flap`` runs, one per share; then
``unipruning export <ls run> pattern=channels sparsity=S`` per share; then the dense folder and each export are timed
in a fresh process each (same threads, same prompt), dense first.

    python scripts/bench_structured.py --out bench-out/structured                 # 10/20/30 % (about 70 min on 2 cores)
    python scripts/bench_structured.py --sparsities 0.2 --windows 8 --out /tmp/s  # a quick look
    python scripts/bench_structured.py --pattern heads --out bench-out/structured # 1 of 3 KV groups (about 25 min)
    python scripts/bench_structured.py --runs <none run> <ls run> [<bias run>] --out ...   # after an interruption:
                                                                # those runs and the finished exports are reused
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import run_json_child

#: Timed in a fresh process: load the folder, then prefill and decode, then the process's peak RSS.
CHILD = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM
from bench_common import status_mib

folder, threads, prefill, decode, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
params = sum(p.numel() for p in model.parameters())
tokens = torch.randint(3, model.config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(0))
times = []
with torch.no_grad():
    model(tokens[:, :32], use_cache=False)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(tokens, use_cache=False)
        times.append(time.perf_counter() - t0)
    prompt = tokens[:, :16]
    gen = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                             pad_token_id=0)
        gen.append(time.perf_counter() - t0)
        assert out.shape[1] == 16 + decode
print(json.dumps({"parameters": params, "prefill_tokens_per_s": prefill / statistics.median(times),
                  "decode_tokens_per_s": decode / statistics.median(gen), "peak_rss_mib": status_mib("VmHWM"),
                  "intermediate_size": getattr(model.config, "intermediate_size", None)}))
"""


#: The compensations compared: none, the least-squares refit of the projection after the channels, FLAP's bias.
HOWS = ("none", "ls", "bias")


def prune(overrides: list[str], runs: Path) -> Path:
    env = {**os.environ, "UNIPRUNING_RUNS": str(runs), "COLUMNS": "1000"}
    proc = subprocess.run([sys.executable, "-m", "unipruning_cli.cli", "prune", *overrides], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prune {overrides} failed:\n{proc.stderr[-3000:]}")
    return Path(next(line.split("run directory: ", 1)[1].strip() for line in proc.stderr.splitlines()[::-1]
                     if "run directory: " in line))


def finished(overrides: list[str], runs: Path) -> Path | None:
    """A finished run under ``runs`` made with exactly ``overrides`` (Hydra's record of them), or None."""
    import yaml

    for metrics in sorted(runs.glob("prune/*/metrics.json")):
        recorded = metrics.parent / ".hydra" / "overrides.yaml"
        if recorded.is_file() and yaml.safe_load(recorded.read_text()) == overrides:
            return metrics.parent
    return None


def export(run: Path, share: float, out: Path, pattern: str = "channels") -> Path:
    if (out / "unipruning_export.json").is_file():  # written last: a finished export of an interrupted call
        return out
    proc = subprocess.run([sys.executable, "-m", "unipruning_cli.cli", "export", str(run), f"pattern={pattern}",
                           f"sparsity={share}", "--out", str(out), "--force"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export {run} {share} failed:\n{proc.stderr[-3000:]}")
    return out


def file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/structured"))
    ap.add_argument("--pattern", choices=("channels", "heads"), default="channels",
                    help="MLP channels, or whole KV groups of attention heads (SmolLM2: 1 of 3 is 0.33)")
    ap.add_argument("--sparsities", default=None, help="shares removed (channels: 0.1,0.2,0.3; heads: 0.33)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", nargs="+", type=Path, default=[], metavar="RUN",
                    help="the none, ls (and bias) prune runs of an earlier, interrupted call, in that order (their "
                         "exports in --out are reused)")
    args = ap.parse_args()
    kind = args.pattern
    hows = HOWS if kind == "channels" else HOWS[:2]  # FLAP's bias compensation: MLP channels only
    shares = [float(s) for s in (args.sparsities or ("0.1,0.2,0.3" if kind == "channels" else "0.33")).split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = "wiki_offline"
    common = ["method=unipruning", "local_metric=stochria", "schedule.weight_mode=frozen", f"schedule.steps={args.steps}",
              f"pattern={kind}", f"sparsity={shares[0]}", f"export.sparsities=[{','.join(map(str, shares))}]",
              "export.patterns=[]", "eval.baselines=[wanda@one_shot]", f"calibration.nsamples={args.nsamples}",
              f"calibration.seqlen={args.seqlen}", "calibration.source=owt_offline", f"eval.seqlen={args.seqlen}",
              f"eval.max_windows={args.windows}", f"eval.corpora=[{corpus}]", "reuse_search=false"]
    runs, ppl = {}, {}
    for i, how in enumerate(hows):
        t0 = time.perf_counter()
        runs[how] = args.runs[i] if i < len(args.runs) else prune([*common, f"reconstruct={how}"], args.out / "runs")
        m = json.loads((runs[how] / "metrics.json").read_text())
        ppl["dense"] = m["perplexity"][corpus]["dense"]["ppl"]
        for tag, r in m["results"].items():
            ppl[(how, tag)] = r["ppl"][corpus]
        print(f"-> reconstruct={how}: {runs[how]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for s in shares:  # a run from before FLAP was cut beside Γ: FLAP's own run at this share
            if (how, f"s{s:.2f}_{kind}-flap") not in ppl:
                flap = [o for o in common if not o.startswith(("method=", "local_metric=", "schedule.", "sparsity=",
                                                               "export.", "eval.baselines", "reuse_search"))]
                overrides = [*flap, "method=local", "local_metric=wanda", "pattern.channel_score=flap", f"sparsity={s}",
                             f"reconstruct={how}"]
                run = finished(overrides, args.out / "runs") or prune(overrides, args.out / "runs")
                r = json.loads((run / "metrics.json").read_text())["results"][f"s{s:.2f}_{kind}-flap"]
                ppl[(how, f"s{s:.2f}_{kind}-flap")] = r["ppl"][corpus]
                print(f"   FLAP {s:.2f} reconstruct={how}: {run}", flush=True)

    from unipruning_cli.data.assets import embedded_model_path

    folders = {"dense": embedded_model_path("smollm2-135m")}
    for s in shares:
        folders[f"{s:.2f}"] = export(runs["ls"], s, args.out / "export" / f"{kind}-{s:.2f}", kind)
    measured = {}
    for name, folder in folders.items():  # one fresh process each, dense first
        measured[name] = run_json_child(["-c", CHILD, str(folder), str(args.threads), str(args.prefill),
                                         str(args.decode), str(args.repeats)])
        measured[name]["file_bytes"] = file_bytes(Path(folder))
        print(f"   {name}: {measured[name]}", flush=True)

    d = measured["dense"]
    what = "MLP channels" if kind == "channels" else "KV groups of attention heads (with their query heads)"
    sp_name = "channel" if kind == "channels" else "group"
    lines = [f"SmolLM2-135M (embedded), {what} removed in every layer; calibration {args.nsamples} x {args.seqlen} "
             f"tokens (owt_offline), perplexity on {corpus} ({args.windows} windows of {args.seqlen}); UniPruning: "
             f"frozen search, {args.steps} steps, stochRIA anchor; Wanda-sp: Wanda's scores summed per {sp_name} "
             f"(one-shot); FLAP: the fluctuation of each input channel of the projection after the cut (down_proj, o_proj) "
             f"times its column's squared norm; "
             f"+ ls: the projection after the cut (down_proj, o_proj) refit on the kept ones; + bias: FLAP's bias compensation. Speed and memory: the exported folder (from the `reconstruct=ls` run) against the dense "
             f"one, plain transformers, float32, {args.threads} threads, prefill {args.prefill} tokens, decode "
             f"{args.decode} tokens at batch 1, medians of {args.repeats}. Command: `{' '.join(sys.argv)}`.", "",
             f"| {kind} removed | " + " | ".join(f"{name}{'' if how == 'none' else ' + ' + how}"
                                               for name in ("Γ", "FLAP", "Wanda-sp") for how in hows)
             + " | parameters | file MiB | peak RSS MiB | prefill tok/s | decode tok/s |",
             "|---|" + "---|" * (3 * len(hows) + 5),
             f"| 0 (dense) | {ppl['dense']:.2f} |" + " |" * (3 * len(hows) - 1) + f" {d['parameters']:,} | "
             f"{d['file_bytes'] / 2**20:.1f} | {d['peak_rss_mib']:.0f} | {d['prefill_tokens_per_s']:.0f} | "
             f"{d['decode_tokens_per_s']:.1f} |"]
    for s in shares:
        tag, e = f"s{s:.2f}_{kind}", measured[f"{s:.2f}"]
        cells = [ppl.get((how, t)) for t in (tag, f"{tag}-flap", f"wanda@one_shot:{tag}") for how in hows]
        lines.append(f"| {s:.0%} | " + " | ".join(f"{c:.2f}" if c is not None else "" for c in cells)
                     + f" | {e['parameters']:,} ({e['parameters'] / d['parameters']:.3f}x) | "
                     f"{e['file_bytes'] / 2**20:.1f} ({e['file_bytes'] / d['file_bytes']:.3f}x) | "
                     f"{e['peak_rss_mib']:.0f} ({e['peak_rss_mib'] / d['peak_rss_mib']:.3f}x) | "
                     f"{e['prefill_tokens_per_s']:.0f} ({e['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:.3f}x) | "
                     f"{e['decode_tokens_per_s']:.1f} ({e['decode_tokens_per_s'] / d['decode_tokens_per_s']:.3f}x) |")
    table = "\n".join(lines) + "\n"
    (args.out / f"structured{'' if kind == 'channels' else '-' + kind}.md").write_text(table)
    (args.out / f"structured{'' if kind == 'channels' else '-' + kind}.json").write_text(json.dumps({"ppl": {str(k): v for k, v in ppl.items()},
                                                          "measured": measured, "runs": {k: str(v) for k, v in runs.items()}},
                                                         indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
