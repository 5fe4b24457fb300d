"""The device check (issue 25): what the memory plan predicts, measured stage by stage on the GPU it was made for.

Needs no hub and no prepared cache: random-weight models with a named model's exact architecture
(``plan.architectures.ARCHITECTURES``) are built in a helper process (the parent never opens a CUDA context, so the
runs it starts have the GPU to themselves) and saved with a small BPE tokenizer trained on generated text. Every run
goes through the CLI (``unipruning plan ... --json``, then ``unipruning prune``) in its own process, watched by a
sampler thread (the process tree's RSS, ``MemAvailable``, the GPU's used memory from ``nvidia-smi``, the work
folder's size on disk, every 0.5 s). The figures per stage come from the run's own ``metrics.json`` (``Timer``:
peak allocated and reserved CUDA memory, pinned host bytes and ``MemAvailable`` at each stage's end, ``VmHWM`` so
far) and stand beside the plan's stage of the same name.

Parts, in the order they run; each is caught on failure (``ok: false`` and the error, the rest still runs) and
``gpu_check.json`` is rewritten (atomically) after each. Seconds and disk are those planned for one H100 80 GB,
16 cores, 128 GiB RAM, Qwen2.5-7B at seqlen 4096 (--budget 450 s; the shell wrapper stops everything at 470 s):

- ``probe`` (about 10 s, no disk): torch / transformers versions, the device, the CUDA context (``mem_get_info``'s
  used bytes after ``torch.cuda.init()`` and a tiny allocation, less ``memory_reserved``), pinned rounding:
  ``torch.zeros(18944*3584, pin_memory=True)`` (271581184 bytes) should take 536870912 bytes of the caching host
  allocator (``torch.cuda.host_memory_stats``), and ``pinned.HostArena`` of the same shape what ``arena_bytes``
  says. On a CPU the CUDA-only fields are null.
- ``cpu_vs_device`` (about 50 s, < 0.1 GiB): a tiny random Llama (fp32) on the CPU and on ``--device``: Wanda 50 %
  masks (kept weights in common, aim >= 0.99) and a deterministic Γ (frozen search, Wanda anchor, λ = 0): the
  largest relative difference of a matrix's Γ (Frobenius), aim <= 1e-6.
- ``checkpoint_7b`` (about 50 s, peak 14 GiB): the same architecture truncated to 2 layers (same matrix shapes),
  drift with ``schedule.steps=2 schedule.checkpoint_every=1`` and ``schedule.search_state=host`` on CUDA (where the
  7B search keeps V and Γ on an 80 GB card), so one checkpoint is written: its size, its write seconds and the
  peaks while it is written (sampled), and both scaled to the full depth. Removed afterwards.
- ``drift_7b`` (about 200 s; peak disk 39.2 GiB, see below): ``--arch`` in bf16, ``--steps`` drift steps
  (``schedule.checkpoint_every`` above them: no checkpoint), one cut (2:4), no dense eval and no baselines, one eval
  window. Planned vs measured per stage, seconds per search step from step 2 on (``search.jsonl`` deltas) against
  one forward+backward of the same model on one window of the same length (plain and with activation
  checkpointing, timed in the build helper right after the build). Then Γ and the masks are deleted.
- ``frozen_and_onload`` (about 90 s, 3 GiB): ``--small-arch`` (Qwen2.5-0.5B): the frozen search, and SparseGPT with
  ``model.placement=onload calibration.mode=sequential``, per stage against the plan.
- ``fsdp`` (only where more than one GPU is visible or ``--ranks N`` is given): the drift run of ``drift_7b`` under
  ``torchrun --nproc-per-node N`` (FSDP2), per stage against its plan, Γ against the one-process Γ (its first 16 rows
  per matrix, kept from ``drift_7b``), seconds per step against the one-process run.

Disk (Qwen2.5-7B: P = 6.51e9 prunable weights, 7.60e9 in all): the bf16 model folder takes 14.2 GiB, Γ (fp32,
``gamma.safetensors``) 24.3 GiB, one cut's packed masks 0.76 GiB: 39.2 GiB at the drift run's end (the peak of the
whole check), plus a few MiB of corpora, logs and cache. That is why drift_7b makes one cut, no baselines and no
checkpoint (the defaults would add 7 more mask files and a Wanda baseline, and a 7B drift checkpoint is about
100 GiB: 16 bytes per prunable weight), and why Γ and the masks are deleted as soon as they are read. Every other
part holds at most 14 GiB at once: checkpoint_7b's truncated model 2.9 GiB, its checkpoint 9.0 GiB (16 bytes per
prunable weight, 6.9 GiB, and the other parameters' gradients, 2.0 GiB), its Γ 1.7 GiB. Each part removes what it
wrote before the next starts (the 7B model folder stays only while ``fsdp`` still needs it; then the 2-rank Γ makes
38.4 GiB). ``drift_7b`` refuses to start the run when the free disk is below what the run writes.
``disk_peak_gib`` in the JSON: the work folder's largest size, sampled every 0.5 s and after each part.

Time: probe 10 s + cpu_vs_device 50 s + checkpoint_7b 50 s + drift_7b 200 s (its build and save of 15 GiB about
40 s, load 15 s, pinning V, Γ and the restore copy 20 s, 3 steps at about 7 s in host mode, saving Γ 25 s, the 2:4
cut and one eval window 30 s) + frozen_and_onload 90 s = about 400 s of the 450 s budget. Each part gets what is
left of ``--budget`` less the least kept for the parts after it (``RESERVE``); a process past its part's deadline
is stopped (its process group: torchrun's ranks too) and the part records what it had.

    python scripts/gpu_check.py --out DIR                           # Qwen2.5-7B, seqlen 4096, on CUDA
    python scripts/gpu_check.py --arch tiny --device cpu --out DIR  # the same parts on a tiny model (seqlen 256)
    python scripts/gpu_check.py --arch tiny --device cpu --ranks 2 --out DIR  # with the 2-rank part (gloo)
    python scripts/gpu_check.py --fwdbwd MODEL_DIR --seqlen N       # helper: one forward+backward, seconds (JSON)
    python scripts/gpu_check.py --summarize DIR/gpu_check.json      # a few lines per part (the wrapper prints them)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
GIB, MIB = 2**30, 2**20

#: The parts, in the order they run.
PARTS = ("probe", "cpu_vs_device", "checkpoint_7b", "drift_7b", "frozen_and_onload", "fsdp")
#: Seconds kept for each part while the parts before it run (the least it needs on the device).
RESERVE = {"probe": 0, "cpu_vs_device": 45, "checkpoint_7b": 50, "drift_7b": 0, "frozen_and_onload": 60, "fsdp": 0}
#: Every part's record holds these, whatever happens.
BASE_KEYS = ("ok", "skipped", "error", "seconds", "disk_after_gib", "disk_peak_gib")
#: Each part's own keys (null until measured; CUDA-only ones stay null on a CPU).
PART_KEYS = {
    "probe": ("torch", "transformers", "python", "cuda_runtime", "device", "device_name", "gpu_count",
              "gpu_total_gib", "cpu_count", "host_total_gib", "mem_available_gib", "disk_free_gib", "context_mib",
              "host_stats_key", "pinned_request_bytes", "pinned_expected_bytes", "pinned_probe_bytes",
              "pinned_rounded_to_power_of_two", "arena_expected_bytes", "arena_nbytes", "arena_pinned_bytes",
              "host_cache_api", "alloc_conf", "sharded_buffers", "probe_errors"),
    "cpu_vs_device": ("devices", "masks_kept_in_common", "masks_matrices", "masks_ok", "gamma_rel_diff_worst_matrix",
                      "gamma_max_abs_diff", "gamma_target", "gamma_within_target", "runs"),
    "drift_7b": ("model", "model_gib", "prunable_weights", "build", "fwdbwd", "run", "step_over_fwdbwd",
                 "step_over_fwdbwd_checkpointed", "gamma_gib", "masks_gib", "disk_needed_gib"),
    "checkpoint_7b": ("model", "truncated", "layers", "full_layers", "model_gib", "search_state", "run",
                      "checkpoint_gib", "checkpoint_files", "checkpoint_write_seconds", "checkpoint_window",
                      "full_depth_checkpoint_gib", "full_depth_write_seconds"),
    "frozen_and_onload": ("model", "model_gib", "frozen", "sparsegpt_onload"),
    "fsdp": ("ranks", "run", "gamma_rel_diff_worst_matrix", "one_process_seconds_per_step", "sharding"),
}
#: The keys of every run's summary (:func:`run_summary`).
RUN_KEYS = ("overrides", "returncode", "timed_out", "process_seconds", "plan", "stages", "measured", "sampled",
            "search_steps", "search_step_deltas", "search_seconds_per_step", "stderr_tail")
#: Plan stages whose ``Timer`` stage has another name.
PLAN_TO_TIMER = {"prune": "calibrate_prune"}
TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512}
WORDS = ("the model prunes weights with a mask while activations flow through every layer of the network and sparse "
         "matrices keep half of their entries so perplexity grows slowly when calibration data is good").split()
GAMMA_TARGET = 1e-6
GAMMA_ROWS = 16  # rows per matrix of Γ kept from drift_7b for the fsdp comparison
RESULT = "GPU_CHECK_RESULT "  # a helper's last line of output: this prefix, then its JSON


# ----------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="Qwen/Qwen2.5-7B", help="a hub id of plan.architectures, or tiny")
    ap.add_argument("--small-arch", default=None,
                    help="model of frozen_and_onload (default: Qwen/Qwen2.5-0.5B; tiny with --arch tiny)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seqlen", type=int, default=None,
                    help="window of calibration and evaluation (default: 4096; 256 for --arch tiny, 512 positions)")
    ap.add_argument("--steps", type=int, default=3, help="drift steps of drift_7b (seconds per step from step 2 on)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    ap.add_argument("--out", type=Path, default=None, help="folder of gpu_check.json and gpu_check.log")
    ap.add_argument("--ranks", type=int, default=None,
                    help="ranks of the fsdp part (default: the visible GPUs where more than one; 0: skip it)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default: 450 on CUDA, 1800 on a CPU)")
    ap.add_argument("--no-plan-check", action="store_true", help="run even where the plan says it does not fit")
    # helper modes (one process each, started by the parts; a JSON line on stdout)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--time-fwdbwd", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plans", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fwdbwd", type=Path, default=None, metavar="MODEL_DIR",
                    help="helper: load MODEL_DIR and time one forward+backward on one window of --seqlen tokens")
    ap.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                    help="print a few lines per part of a gpu_check.json and exit")
    args = ap.parse_args(argv)
    tiny = args.arch == "tiny"
    if args.small_arch is None:
        args.small_arch = "tiny" if tiny else "Qwen/Qwen2.5-0.5B"
    if args.seqlen is None:
        args.seqlen = 256 if tiny else 4096
    if args.budget is None:
        args.budget = 450.0 if args.device.startswith("cuda") else 1800.0
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    helper = args.probe or any(x is not None for x in (args.build, args.plans, args.fwdbwd, args.summarize))
    if not helper and args.out is None:
        ap.error("--out is required")
    return args


def empty_part(name: str) -> dict:
    return {k: None for k in (*BASE_KEYS, *PART_KEYS[name])}


def empty_run() -> dict:
    return {k: None for k in RUN_KEYS}


# ----------------------------------------------------------------------------------------------
# small tools: sizes, /proc, atomic JSON


def tree_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks) under ``path``; files that vanish while counting are skipped."""
    total = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            with os.scandir(p) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        else:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (``VmRSS``), 0 where /proc cannot tell."""
    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def gpu_used_bytes() -> int | None:
    """Used memory of GPU 0 as ``nvidia-smi`` reports it (every process, contexts too), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout.split()
        return int(float(out[0])) * MIB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def gib(nbytes: float | None, digits: int = 2) -> float | None:
    return None if nbytes is None else round(nbytes / GIB, digits)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


# ----------------------------------------------------------------------------------------------
# child processes, watched


class Watch(threading.Thread):
    """Samples a child process tree every ``interval`` s: its RSS, the machine's MemAvailable, GPU 0's used memory
    (where ``gpu``), the work folder's size; and the same peaks inside the window where ``window()`` is true."""

    def __init__(self, pid: int, work: Path, gpu: bool, window: Callable[[], bool] | None = None,
                 interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.work, self.gpu, self.window, self.interval = pid, work, gpu, window, interval
        self.done = threading.Event()
        self.peak = {"rss": 0, "gpu_used": None, "disk": 0, "mem_available_min": None}
        self.win = {"first": None, "last": None, "rss": 0, "gpu_used": None, "mem_available_min": None}
        self.t0 = time.perf_counter()

    @staticmethod
    def _max(a, b):
        return b if a is None else (a if b is None else max(a, b))

    @staticmethod
    def _min(a, b):
        return b if a is None else (a if b is None else min(a, b))

    def sample(self) -> None:
        rss, avail = tree_rss(self.pid), meminfo("MemAvailable")
        used = gpu_used_bytes() if self.gpu else None
        p = self.peak
        p["rss"] = max(p["rss"], rss)
        p["gpu_used"] = self._max(p["gpu_used"], used)
        p["disk"] = max(p["disk"], tree_bytes(self.work))
        p["mem_available_min"] = self._min(p["mem_available_min"], avail)
        if self.window is not None and self.window():
            w, now = self.win, round(time.perf_counter() - self.t0, 2)
            w["first"] = now if w["first"] is None else w["first"]
            w["last"] = now
            w["rss"] = max(w["rss"], rss)
            w["gpu_used"] = self._max(w["gpu_used"], used)
            w["mem_available_min"] = self._min(w["mem_available_min"], avail)

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a sampler never stops the check
                pass
            self.done.wait(self.interval)

    def stop(self) -> dict:
        self.done.set()
        self.join(timeout=10)
        self.sample()
        p = self.peak
        out = {"peak_rss_gib": gib(p["rss"]), "peak_gpu_used_gib": gib(p["gpu_used"]),
               "min_mem_available_gib": gib(p["mem_available_min"]), "peak_disk_gib": gib(p["disk"])}
        return out

    def window_figures(self) -> dict:
        w = self.win
        return {"seconds": None if w["first"] is None else round(w["last"] - w["first"] + self.interval, 2),
                "peak_rss_gib": gib(w["rss"]) if w["first"] is not None else None,
                "peak_gpu_used_gib": gib(w["gpu_used"]), "min_mem_available_gib": gib(w["mem_available_min"])}


class Check:
    """The parent: the report, its deadline, the children it starts and the disk it watches."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        self.part_deadline = self.deadline
        self.proc: subprocess.Popen | None = None
        self.disk_peak = 0
        self.part_disk_peak = 0
        self.gpu = args.device.startswith("cuda")
        self.env = {**os.environ, "UNIPRUNING_CACHE": str(args.work / "cache"),
                    "UNIPRUNING_RUNS": str(args.work / "runs"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.report = {"schema": 2, "command": sys.argv[1:], "arch": args.arch, "small_arch": args.small_arch,
                       "device": args.device, "dtype": args.dtype, "seqlen": args.seqlen, "steps": args.steps,
                       "budget_seconds": args.budget, "disk_budget_gib": 40.0, "disk_peak_gib": 0.0,
                       "elapsed_seconds": 0.0, "parts": {p: empty_part(p) for p in PARTS}}
        self.log_lines: list[str] = []

    # -- report

    def note_disk(self, nbytes: int | None = None) -> float:
        nbytes = tree_bytes(self.args.work) if nbytes is None else nbytes
        self.disk_peak = max(self.disk_peak, nbytes)
        self.part_disk_peak = max(self.part_disk_peak, nbytes)
        self.report["disk_peak_gib"] = gib(self.disk_peak)
        return gib(nbytes)

    def save(self) -> None:
        self.report["elapsed_seconds"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.args.out / "gpu_check.json", self.report)
        (self.args.out / "gpu_check.log").write_text("\n".join(self.log_lines) + "\n")

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_lines.append(line)

    # -- children

    def left(self) -> float:
        return self.part_deadline - time.perf_counter()

    def child(self, cmd: list[str], name: str, window: Callable[[], bool] | None = None) -> dict:
        """Run ``cmd`` (cwd: the repository) until it ends or the part's deadline passes (then its process group is
        stopped); output to ``<work>/logs/<name>.log``. Returns returncode, timed_out, seconds, the sampler's figures
        (and its window's), the output's tail, and the helper's result where it printed one."""
        logs = self.args.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"{name}.log"
        timeout = self.left()
        if timeout < 5:
            raise TimeoutError(f"{name}: no time left in this part's budget")
        t0 = time.perf_counter()
        with open(log_file, "w") as out:
            # its own process group (not a new session): stopped as a whole here, and by the device when we end
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, **group)
            watch = Watch(self.proc.pid, self.args.work, self.gpu, window)
            watch.start()
            timed_out = False
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                self.stop_child()
                sampled = watch.stop()
        self.note_disk(watch.peak["disk"])
        output = log_file.read_text(errors="replace")
        result = None
        for line in reversed(output.splitlines()):
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
                break
        rc = self.proc.returncode
        self.proc = None
        self.log(f"  {name}: rc {rc}{' (timed out)' if timed_out else ''}, {time.perf_counter() - t0:.1f} s")
        if rc:
            self.log_lines.append(output[-3000:])
        return {"returncode": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1),
                "sampled": sampled, "window": watch.window_figures() if window else None,
                "tail": output[-2500:], "result": result}

    def stop_child(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def helper(self, name: str, *flags: str) -> dict:
        """This script in a helper mode; its JSON result (raises with the output's tail when it fails)."""
        r = self.child([sys.executable, str(Path(__file__).resolve()), *flags], name)
        if r["returncode"] or r["result"] is None:
            raise RuntimeError(f"{name} failed (rc {r['returncode']}{', timed out' if r['timed_out'] else ''}):\n"
                               f"{r['tail'][-2000:]}")
        return r["result"]

    # -- building blocks of the parts

    def corpora(self) -> Path:
        folder = self.args.work / "corpus"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "calib.txt").exists():
            (folder / "calib.txt").write_text(text(1, 400_000))
            (folder / "eval.txt").write_text(text(2, 100_000))
        return folder

    def build(self, arch: str, folder: Path, name: str, layers: int | None = None, dtype: str | None = None,
              device: str | None = None, fwdbwd: bool = False) -> dict:
        """A random-weight ``arch`` model saved in ``folder`` by a helper process; what it reports."""
        self.corpora()
        if folder.exists():
            shutil.rmtree(folder)
        flags = ["--build", str(folder), "--arch", arch, "--dtype", dtype or self.args.dtype,
                 "--device", device or self.args.device, "--work", str(self.args.work),
                 "--seqlen", str(self.args.seqlen)]
        if layers is not None:
            flags += ["--layers", str(layers)]
        if fwdbwd:
            flags.append("--time-fwdbwd")
        result = self.helper(f"build_{name}", *flags)
        self.note_disk()
        return result

    def common(self, model: Path, device: str | None = None, dtype: str | None = None, seqlen: int | None = None,
               nsamples: int = 8) -> list[str]:
        corpus = self.corpora()
        over = ["model=local", f"model.path={model}", f"model.device={device or self.args.device}",
                f"model.dtype={dtype or self.args.dtype}", f"model.seqlen={seqlen or self.args.seqlen}",
                f"calibration.source={corpus / 'calib.txt'}", f"calibration.nsamples={nsamples}",
                f"eval.corpora=[{corpus / 'eval.txt'}]", "eval.max_windows=1", "eval.batch_size=1",
                "eval.dense=false", "eval.baselines=[]", "export.sparsities=[]", "export.patterns=[]",
                "reuse_search=false"]
        return over + (["plan_check=false"] if self.args.no_plan_check else [])

    def plans(self, name: str, runs: dict[str, list[str]], gpus: int | None = None) -> dict[str, dict]:
        """``unipruning plan <overrides> --json`` of each run, in one helper process: name -> the plan's JSON."""
        folder = self.args.work / "plans"
        folder.mkdir(parents=True, exist_ok=True)
        gpus = (1 if self.gpu else 0) if gpus is None else gpus
        flags = ["--gpus", str(gpus)]
        total = meminfo("MemTotal")
        if gpus and total:
            flags += ["--host-memory", f"{total / GIB:.1f}GiB"]
        spec = {k: [*over, *flags, "--json", str(folder / f"{k}.json")] for k, over in runs.items()}
        write_json(folder / f"{name}.spec.json", spec)
        self.helper(f"plan_{name}", "--plans", str(folder / f"{name}.spec.json"))
        return {k: json.loads((folder / f"{k}.json").read_text()) for k in runs}

    def prune(self, name: str, over: list[str], plan: dict | None, launcher: list[str] | None = None,
              window: Callable[[Path], Callable[[], bool]] | None = None) -> tuple[dict, Path]:
        """One ``unipruning prune`` run in a fresh run folder, summarised (:func:`run_summary`)."""
        run = self.args.work / "runs" / name
        if run.exists():
            shutil.rmtree(run)  # a run folder holds one run: start afresh
        run.parent.mkdir(parents=True, exist_ok=True)
        launcher = launcher or [sys.executable, "-m", "unipruning_cli.cli"]
        r = self.child([*launcher, "prune", *over, f"hydra.run.dir={run}"], f"prune_{name}",
                       window(run) if window else None)
        summary = run_summary(over, r, plan, run)
        summary["window"] = r["window"]
        return summary, run


# ----------------------------------------------------------------------------------------------
# what a run measured


def read_rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def step_deltas(rows: list[dict]) -> list[float]:
    """Seconds of each search step from step 2 on, from ``search.jsonl``'s cumulative ``seconds``."""
    seconds = [float(r["seconds"]) for r in sorted(rows, key=lambda r: r["step"]) if r.get("seconds") is not None]
    return [round(b - a, 3) for a, b in zip(seconds, seconds[1:])]


def compare_stages(plan: dict | None, memory: dict | None, seconds: dict | None) -> list[dict]:
    """One row per stage of the plan (and per measured stage the plan lacks): planned GPU and host GiB beside the
    run's peak allocated and reserved CUDA memory, VmHWM so far, pinned host memory and MemAvailable at its end."""
    memory, seconds = memory or {}, seconds or {}
    measured = {"allocated_gib": memory.get("stages_cuda_mib") or {},
                "reserved_gib": memory.get("stages_cuda_reserved_mib") or {},
                "host_peak_so_far_gib": memory.get("host_peak_so_far_mib") or {},
                "pinned_host_gib": memory.get("stages_pinned_host_mib") or {},
                "mem_available_gib": memory.get("stages_mem_available_mib") or {}}
    planned = [(s["stage"], s) for s in (plan or {}).get("stages", [])]
    seen = {PLAN_TO_TIMER.get(n, n) for n, _ in planned}
    extra = [n for n in dict.fromkeys([*seconds, *(k for d in measured.values() for k in d)])
             if n not in seen and n != "total"]
    rows = []
    for name, stage in [*planned, *((n, None) for n in extra)]:
        timer = PLAN_TO_TIMER.get(name, name)
        row = {"stage": name, "planned_gpu_gib": stage and stage.get("gpu_gib"),
               "planned_host_gib": stage and stage.get("host_gib"), "seconds": seconds.get(timer)}
        for key, values in measured.items():
            row[key] = None if timer not in values else round(values[timer] / 1024, 3)
        rows.append(row)
    return rows


def run_summary(over: list[str], r: dict, plan: dict | None, run: Path) -> dict:
    """What one prune run measured, in :data:`RUN_KEYS` (null where it did not get that far)."""
    out = empty_run()
    out.update(overrides=over, returncode=r["returncode"], timed_out=r["timed_out"], process_seconds=r["seconds"],
               sampled=r["sampled"])
    if plan is not None:
        top = max((s["gpu_gib"] for s in plan.get("stages", [])), default=0.0)
        out["plan"] = {"fits": plan.get("fits"), "placement": plan.get("placement"),
                       "peak_gpu_gib": plan.get("peak_gpu_gib"), "peak_host_gib": plan.get("peak_host_gib"),
                       "host_baseline_gib": plan.get("host_baseline"), "disk_gib": plan.get("disk_gib"),
                       "cuda_overhead_gib": round(plan["peak_gpu_gib"] - top, 2) if plan.get("peak_gpu_gib") else None}
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    memory = metrics.get("memory")
    out["stages"] = compare_stages(plan, memory, metrics.get("seconds"))
    if memory:
        reserved = memory.get("stages_cuda_reserved_mib") or {}
        out["measured"] = {"peak_rss_gib": gib(memory.get("peak_rss_mib", 0) * MIB),
                           "peak_cuda_allocated_gib": gib((memory.get("peak_cuda_mib") or 0) * MIB) if
                           "peak_cuda_mib" in memory else None,
                           "peak_cuda_reserved_gib": gib(max(reserved.values()) * MIB) if reserved else None,
                           "placement": metrics.get("placement")}
    rows = read_rows(run / "search.jsonl")
    deltas = step_deltas(rows)
    out["search_steps"] = len(rows)
    out["search_step_deltas"] = deltas
    out["search_seconds_per_step"] = round(sum(deltas) / len(deltas), 3) if deltas else None
    if r["returncode"] or r["timed_out"]:
        out["stderr_tail"] = r["tail"]
    return out


def run_failed(summary: dict) -> str | None:
    if summary["timed_out"]:
        return "timed out (the part's deadline)"
    if summary["returncode"]:
        return f"exit status {summary['returncode']}: {(summary['stderr_tail'] or '')[-600:]}"
    return None


def gamma_difference(a: dict, b: dict) -> tuple[float, float]:
    """Worst relative Frobenius difference of a matrix, and the largest absolute difference over the largest |Γ|."""
    worst, top, scale = 0.0, 0.0, 0.0
    for n in a:
        x, y = a[n].double(), b[n].double()
        worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-30)))
        top = max(top, float((x - y).abs().max()))
        scale = max(scale, float(x.abs().max()))
    return worst, top / max(scale, 1e-30)


def gamma_rows(path: Path, rows: int = GAMMA_ROWS) -> dict:
    """The first ``rows`` rows of every matrix of a Γ file, read without loading the whole file."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_slice(k)[:rows].clone()
    return out


def remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------------------------
# the parts


def part_probe(c: Check, rec: dict) -> None:
    rec.update(c.helper("probe", "--probe", "--device", c.args.device, "--work", str(c.args.work)))


def part_cpu_vs_device(c: Check, rec: dict) -> None:
    """Wanda masks and the deterministic Γ of a tiny fp32 model on the CPU and on ``--device``."""
    from unipruning_cli.pruning.mask_files import load_masks
    from unipruning_cli.core.rundir import load_tensors

    small = c.args.work / "models" / "tiny_fp32"
    devices = ["cpu", c.args.device]
    rec["devices"] = devices
    masks, gammas, runs, folders = {}, {}, {}, [small]
    try:
        c.build("tiny", small, "tiny_fp32", dtype="float32", device="cpu")
        for k, device in enumerate(devices):
            base = c.common(small, device=device, dtype="float32", seqlen=256, nsamples=16)
            wanda, run = c.prune(f"wanda_{k}_{device}", [*base, "method=local", "local_metric=wanda", "sparsity=0.5"],
                                 None)
            folders.append(run)
            runs[f"wanda_{device}"] = {"seconds": wanda["process_seconds"], "returncode": wanda["returncode"]}
            if run_failed(wanda):
                raise RuntimeError(f"wanda on {device}: {run_failed(wanda)}")
            masks[k] = load_masks(next((run / "masks").glob("s0.50*.safetensors")))
            deterministic = ["method=unipruning", "schedule.weight_mode=frozen", "local_metric=wanda",
                             "regularizer.lam=0", "schedule.steps=4"]
            frozen, run = c.prune(f"gamma_{k}_{device}", [*base, *deterministic], None)
            folders.append(run)
            runs[f"gamma_{device}"] = {"seconds": frozen["process_seconds"], "returncode": frozen["returncode"]}
            if run_failed(frozen):
                raise RuntimeError(f"frozen Γ on {device}: {run_failed(frozen)}")
            gammas[k] = load_tensors(run / "gamma.safetensors")
    finally:
        rec["runs"] = runs
        remove(*folders)
    a, b = masks[0], masks[1]
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    kept = sum(int(a[n].sum()) for n in a)
    rec.update(masks_kept_in_common=round(both / kept, 6), masks_matrices=len(a), masks_ok=both / kept >= 0.99)
    worst, top = gamma_difference(gammas[0], gammas[1])
    rec.update(gamma_rel_diff_worst_matrix=worst, gamma_max_abs_diff=top, gamma_target=GAMMA_TARGET,
               gamma_within_target=worst <= GAMMA_TARGET)


def drift_overrides(c: Check, model: Path) -> list[str]:
    """The drift run of drift_7b and fsdp: ``--steps`` steps, no checkpoint, one 2:4 cut."""
    return [*c.common(model), "method=unipruning", "schedule.weight_mode=drift", f"schedule.steps={c.args.steps}",
            f"schedule.checkpoint_every={c.args.steps + 1000}", "pattern=2:4"]


def part_drift_7b(c: Check, rec: dict) -> None:
    args = c.args
    model = args.work / "models" / "big"
    keep_model = "fsdp" in args.parts and fsdp_ranks(c) > 1
    rec["model"] = args.arch
    run = args.work / "runs" / "drift"
    try:
        built = c.build(args.arch, model, "big", fwdbwd=True)
        rec.update(build={k: built.get(k) for k in ("seconds", "save_seconds", "parameters")},
                   fwdbwd=built.get("fwdbwd"), prunable_weights=built.get("prunable"), model_gib=gib(tree_bytes(model)))
        P = built["prunable"]
        need = 4 * P + P / 8 + GIB // 2  # Γ (fp32), one cut's packed masks, corpora / cache / logs
        rec["disk_needed_gib"] = gib(need)
        free = shutil.disk_usage(args.work).free
        if free < need:
            raise RuntimeError(f"{gib(free)} GiB free under {args.work}, the drift run writes about {gib(need)} GiB")
        over = drift_overrides(c, model)
        plan = c.plans("drift", {"drift": over})["drift"]
        summary, run = c.prune("drift", over, plan)
        summary.pop("window")
        rec["run"] = summary
        per_step = summary["search_seconds_per_step"]
        fb = rec["fwdbwd"] or {}
        if per_step and fb.get("seconds"):
            rec["step_over_fwdbwd"] = round(per_step / fb["seconds"], 2)
        if per_step and fb.get("seconds_checkpointed"):
            rec["step_over_fwdbwd_checkpointed"] = round(per_step / fb["seconds_checkpointed"], 2)
        gamma = run / "gamma.safetensors"
        if gamma.exists():
            rec["gamma_gib"] = gib(gamma.stat().st_size)
            if keep_model:  # a few rows of every matrix, for the fsdp comparison
                from safetensors.torch import save_file

                save_file(gamma_rows(gamma), str(args.work / "gamma_rows_drift.safetensors"))
        if (run / "masks").exists():
            rec["masks_gib"] = gib(tree_bytes(run / "masks"))
        c.note_disk()
    finally:  # Γ (24 GiB at 7B) and the masks go; the model too unless fsdp still needs it
        remove(run / "gamma.safetensors", run / "masks", *([] if keep_model else [model]))
    failed = run_failed(summary)
    if failed:
        raise RuntimeError(f"prune (drift): {failed}")


def part_checkpoint_7b(c: Check, rec: dict) -> None:
    args = c.args
    model = args.work / "models" / "truncated"
    full_layers = (TINY if args.arch == "tiny" else _architecture(args.arch))["num_hidden_layers"]
    layers = min(2, full_layers - 1) if full_layers > 1 else 1
    state = "host"  # where an 80 GB card keeps the 7B search's V and Γ (on a CPU the same place)
    rec.update(model=args.arch, truncated=True, layers=layers, full_layers=full_layers, search_state=state)
    run = args.work / "runs" / "checkpoint"

    def window(run: Path) -> Callable[[], bool]:
        folder, pointer = run / "checkpoints" / "search.step1", run / "checkpoints" / "search.json"
        return lambda: folder.exists() and not pointer.exists()  # the checkpoint of step 1 is being written

    try:
        c.build(args.arch, model, "truncated", layers=layers)
        rec["model_gib"] = gib(tree_bytes(model))
        over = [*c.common(model), "method=unipruning", "schedule.weight_mode=drift", "schedule.steps=2",
                "schedule.checkpoint_every=1", f"schedule.search_state={state}", "pattern=2:4"]
        plan = c.plans("checkpoint", {"checkpoint": over})["checkpoint"]
        summary, run = c.prune("checkpoint", over, plan, window=window)
        rec["run"] = summary
        rec["checkpoint_window"] = summary.pop("window")
        rec["checkpoint_write_seconds"] = rec["checkpoint_window"]["seconds"]
        folder = run / "checkpoints" / "search.step1"
        if folder.is_dir():
            files = {p.name: p.stat().st_size for p in folder.iterdir()}
            measured = sum(files.values())
            per_matrix = sum(v for k, v in files.items() if k.startswith("m"))  # m00000...: one file per matrix
            full = per_matrix * full_layers / layers + (measured - per_matrix)
            rec.update(checkpoint_files=len(files), checkpoint_gib=gib(measured), full_depth_checkpoint_gib=gib(full))
            if rec["checkpoint_write_seconds"]:
                rec["full_depth_write_seconds"] = round(rec["checkpoint_write_seconds"] * full / max(measured, 1), 1)
        c.note_disk()
    finally:
        remove(run, model)
    failed = run_failed(summary)
    if failed:
        raise RuntimeError(f"prune (checkpoint): {failed}")


def part_frozen_and_onload(c: Check, rec: dict) -> None:
    args = c.args
    model = args.work / "models" / "small"
    rec["model"] = args.small_arch
    errors, folders = [], [model]
    try:
        c.build(args.small_arch, model, "small")
        rec["model_gib"] = gib(tree_bytes(model))
        base = c.common(model)
        runs = {"frozen": [*base, "method=unipruning", "schedule.weight_mode=frozen",
                           f"schedule.steps={args.steps + 1}"],
                # sequential onloading: the blocks in host memory, one at a time on the GPU
                "sparsegpt_onload": [*base, "method=sparsegpt", "model.placement=onload",
                                     "calibration.mode=sequential"]}
        plans = c.plans("small", runs)
        for name, over in runs.items():
            summary, run = c.prune(name, over, plans[name])
            summary.pop("window")
            folders.append(run)
            rec[name] = summary
            if run_failed(summary):
                errors.append(f"{name}: {run_failed(summary)}")
        c.note_disk()
    finally:
        remove(*folders)
    if errors:
        raise RuntimeError("; ".join(errors))


def fsdp_ranks(c: Check) -> int:
    if c.args.ranks is not None:
        return c.args.ranks
    return int(c.report["parts"]["probe"].get("gpu_count") or 0) if c.gpu else 0


def part_fsdp(c: Check, rec: dict) -> None:
    """The drift run of drift_7b under torchrun (FSDP2) over the ranks; Γ against the one-process Γ's rows."""
    args = c.args
    ranks = fsdp_ranks(c)
    rec["ranks"] = ranks
    model = args.work / "models" / "big"
    rows_file = args.work / "gamma_rows_drift.safetensors"
    run = args.work / "runs" / "fsdp"
    try:
        if not model.exists():
            c.build(args.arch, model, "big")
        over = drift_overrides(c, model)
        plan = c.plans("fsdp", {"fsdp": over}, gpus=ranks if c.gpu else 0)["fsdp"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                    "-m", "unipruning_cli"]
        summary, run = c.prune("fsdp", over, plan, launcher=launcher)
        summary.pop("window")
        rec["run"] = summary
        try:
            rec["sharding"] = json.loads((run / "stages" / "search.json").read_text())["info"].get("sharding")
        except (OSError, ValueError, KeyError):
            pass
        one = c.report["parts"]["drift_7b"].get("run") or {}
        rec["one_process_seconds_per_step"] = one.get("search_seconds_per_step")
        if (run / "gamma.safetensors").exists() and rows_file.exists():
            from safetensors.torch import load_file

            rec["gamma_rel_diff_worst_matrix"] = gamma_difference(load_file(str(rows_file)),
                                                                  gamma_rows(run / "gamma.safetensors"))[0]
        c.note_disk()
    finally:
        remove(run, model, rows_file)
    failed = run_failed(summary)
    if failed:
        raise RuntimeError(f"torchrun prune: {failed}")


PART_FUNCTIONS = {"probe": part_probe, "cpu_vs_device": part_cpu_vs_device, "drift_7b": part_drift_7b,
                  "checkpoint_7b": part_checkpoint_7b, "frozen_and_onload": part_frozen_and_onload, "fsdp": part_fsdp}


def _architecture(arch: str) -> dict:
    from unipruning_cli.stages.plan.architectures import ARCHITECTURES

    return dict(ARCHITECTURES[arch])


# ----------------------------------------------------------------------------------------------
# helper modes (each in its own process)


def helper_probe(args: argparse.Namespace) -> dict:
    import platform

    import torch
    import transformers

    out = {k: None for k in PART_KEYS["probe"]}
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    work = args.work if args.work.exists() else Path("/")
    total, avail = meminfo("MemTotal"), meminfo("MemAvailable")
    out.update(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               cuda_runtime=torch.version.cuda, device=args.device, cpu_count=os.cpu_count(),
               gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
               host_total_gib=gib(total), mem_available_gib=gib(avail), disk_free_gib=gib(shutil.disk_usage(work).free),
               device_name=platform.processor() or platform.machine(),
               alloc_conf={k: os.environ[k] for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
                           if k in os.environ},
               host_cache_api=[name for name, ok in (
                   ("torch.accelerator.empty_host_cache",
                    hasattr(getattr(torch, "accelerator", None), "empty_host_cache")),
                   ("torch._C._host_emptyCache", hasattr(torch._C, "_host_emptyCache")),
                   ("torch.cuda.host_memory_stats", hasattr(torch.cuda, "host_memory_stats"))) if ok])
    request = 18944 * 3584 * 4  # one fp32 Qwen2.5-7B MLP matrix: 259 MiB, just above a power of two
    out.update(pinned_request_bytes=request, pinned_expected_bytes=1 << (request - 1).bit_length())
    out["probe_errors"] = errors = {}
    try:
        from unipruning_cli.core.pinned import arena_bytes

        out["arena_expected_bytes"] = arena_bytes([request])
    except Exception as err:  # noqa: BLE001 - pinned.py may be missing in an older tree
        errors["arena_expected"] = f"{type(err).__name__}: {err}"[:500]
    try:
        out["sharded_buffers"] = sharded_buffer_devices(args.work / "probe_model", cuda)
    except Exception as err:  # noqa: BLE001
        errors["sharded_buffers"] = f"{type(err).__name__}: {err}"[:500]
    if not cuda:
        return out
    from unipruning_cli.core.progress import pinned_host_bytes

    try:
        torch.cuda.init()
        x = torch.ones(1, device="cuda")
        torch.cuda.synchronize()
        free, total_gpu = torch.cuda.mem_get_info()
        out.update(device_name=torch.cuda.get_device_name(0), gpu_total_gib=gib(total_gpu),
                   context_mib=round((total_gpu - free - torch.cuda.memory_reserved()) / MIB, 1))
        del x
    except Exception as err:  # noqa: BLE001 - each probe records its failure, the others still run
        errors["context"] = f"{type(err).__name__}: {err}"[:500]
    try:
        stats = torch.cuda.host_memory_stats()
        keys = [k for k in ("allocated_bytes.current", "allocated_bytes.all.current") if k in stats]
        out["host_stats_key"] = keys[0] if keys else sorted(k for k in stats if "bytes" in k)[:8]
        before = pinned_host_bytes() or 0
        t = torch.zeros(request // 4, pin_memory=True)
        after = pinned_host_bytes()
        out["pinned_probe_bytes"] = None if after is None else after - before
        out["pinned_rounded_to_power_of_two"] = \
            None if after is None else after - before == out["pinned_expected_bytes"]
        del t
    except Exception as err:  # noqa: BLE001
        errors["pinned"] = f"{type(err).__name__}: {err}"[:500]
    try:
        from unipruning_cli.core.pinned import HostArena, empty_host_cache

        empty_host_cache()
        before = pinned_host_bytes() or 0
        arena = HostArena({"a": (18944, 3584)}, torch.float32, pin=True)
        after = pinned_host_bytes()
        out.update(arena_nbytes=arena.nbytes, arena_pinned_bytes=None if after is None else after - before)
        arena.release()
        empty_host_cache()
    except Exception as err:  # noqa: BLE001 - pinned.py missing, say
        errors["arena"] = f"{type(err).__name__}: {err}"[:500]
    return out


def sharded_buffer_devices(folder: Path, cuda: bool) -> dict:
    """``search.sharded.load_sharded`` in a world of one rank (``cpu:gloo,cuda:nccl`` on a GPU, with FSDP's CPU
    offload; gloo without it here): where the buffers (RoPE's ``inv_freq``) and the parameters' shards end up. Under
    offload the buffers must be on the GPU and the shards on the host (gpu-readiness §3b)."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from unipruning_cli.core.distributed import Ranks
    from unipruning_cli.stages.sharded_search import load_sharded

    fields = dict(TINY)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(folder)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        cfg = OmegaConf.create({"source": "local", "path": str(folder), "dtype": "bfloat16", "revision": None,
                                "trust_remote_code": False})
        model, _ = load_sharded(cfg, Ranks(0, 1), device, offload=cuda)
        buffers = sorted({str(b.device) for b in model.buffers()})
        shards = sorted({str(p.to_local().device) for p in model.parameters()})
        ok = buffers == [str(device)] and shards == (["cpu"] if cuda else [str(device)])
        return {"offload": cuda, "buffer_devices": buffers, "shard_devices": shards, "ok": ok}
    finally:
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)


def helper_build(args: argparse.Namespace) -> dict:
    """A random-weight model of ``--arch`` (``--layers`` of them, else all) in ``--build``, with the tokenizer of
    the work folder's corpus; ``--time-fwdbwd``: then one forward+backward timed on it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    corpus = args.work / "corpus"
    tok_file = corpus / "tokenizer.json"
    if not tok_file.exists():
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator([(corpus / "calib.txt").read_text()],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
        tok.save(str(tok_file.with_suffix(".tmp")))
        os.replace(tok_file.with_suffix(".tmp"), tok_file)
    fields = dict(TINY) if args.arch == "tiny" else _architecture(args.arch)
    if args.layers is not None:
        fields["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.eval()
    built = time.perf_counter() - t0
    args.build.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    model.save_pretrained(args.build)
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(args.build)
    out = {"seconds": round(built, 1), "save_seconds": round(time.perf_counter() - t1, 1),
           "parameters": sum(p.numel() for p in model.parameters()), "prunable": _prunable(model)}
    if args.time_fwdbwd:
        out["fwdbwd"] = time_fwdbwd(model, _window(args.build, args.seqlen, args.device), args.device)
    return out


def _prunable(model) -> int:
    from torch import nn

    blocks = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))


def _window(model_dir: Path, seqlen: int, device: str):
    """One calibration-like window: ``seqlen`` tokens of generated text like the calibration corpus's."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text(1, 4 * seqlen), return_tensors="pt").input_ids[:, :seqlen]
    if ids.shape[1] < seqlen:
        raise ValueError(f"the calibration text gives {ids.shape[1]} tokens, fewer than {seqlen}")
    return ids.to(torch.device(device))


def time_fwdbwd(model, ids, device: str, repeats: int = 3) -> dict:
    """Seconds of one forward+backward (the LM loss on ``ids``, every parameter's gradient, as a drift step's
    ``_lm_backward``) without and with the search's activation checkpointing: the fastest of ``repeats`` after a
    warm-up. And the peak CUDA memory it allocated."""
    import torch

    from unipruning_cli.search.recompute import activation_checkpointing

    cuda = device.startswith("cuda")
    model.requires_grad_(True)
    out = {"seqlen": int(ids.shape[1]), "repeats": repeats, "seconds": None, "seconds_checkpointed": None,
           "errors": {}, "peak_allocated_gib": None, "peak_reserved_gib": None}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for key, checkpointed in (("seconds", False), ("seconds_checkpointed", True)):
        blocks, times = [], []
        try:
            blocks = activation_checkpointing(model, True) if checkpointed else []
            for k in range(1 + repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                if k:
                    times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        except Exception as err:  # noqa: BLE001 - out of memory, say: the build stands, the yardstick is missing
            out["errors"][key] = f"{type(err).__name__}: {err}"[:500]
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        finally:
            if checkpointed:
                activation_checkpointing(model, False, blocks)
        out[key] = round(min(times), 4) if times else None
    if cuda:
        out["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
        out["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    return out


def helper_fwdbwd(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.fwdbwd, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    load = time.perf_counter() - t0
    return {"load_seconds": round(load, 1), **time_fwdbwd(model, _window(args.fwdbwd, args.seqlen, args.device),
                                                          args.device)}


def helper_plans(args: argparse.Namespace) -> dict:
    from unipruning_cli.cli import main as cli_main

    spec = json.loads(args.plans.read_text())
    for name, argv in spec.items():
        cli_main(["plan", *argv])
    return {"plans": list(spec)}


# ----------------------------------------------------------------------------------------------


def summarize(report: dict) -> list[str]:
    """A few lines per part of a report: whether it ran, and the figures to read first."""
    def peaks(run: dict | None) -> str:
        if not run:
            return "no run"
        plan, m, smp = run.get("plan") or {}, run.get("measured") or {}, run.get("sampled") or {}
        return (f"plan GPU {plan.get('peak_gpu_gib')} / host {plan.get('peak_host_gib')} GiB "
                f"(fits {plan.get('fits')}); "
                f"measured GPU allocated {m.get('peak_cuda_allocated_gib')} reserved {m.get('peak_cuda_reserved_gib')}"
                f" (nvidia-smi {smp.get('peak_gpu_used_gib')}), RSS {m.get('peak_rss_gib')} (sampled "
                f"{smp.get('peak_rss_gib')}), MemAvailable low {smp.get('min_mem_available_gib')} GiB; "
                f"s/step {run.get('search_seconds_per_step')}; rc {run.get('returncode')}")

    def stages(run: dict | None) -> list[str]:
        return [f"    {row['stage']}: plan {row['planned_gpu_gib']} GPU / {row['planned_host_gib']} host; allocated "
                f"{row['allocated_gib']} reserved {row['reserved_gib']} VmHWM {row['host_peak_so_far_gib']} pinned "
                f"{row['pinned_host_gib']} MemAvailable {row['mem_available_gib']} GiB; {row['seconds']} s"
                for row in (run or {}).get("stages") or []]

    lines = [f"gpu_check: {report.get('arch')} on {report.get('device')}, {report.get('elapsed_seconds')} s, "
             f"disk peak {report.get('disk_peak_gib')} GiB"]
    for name, r in report.get("parts", {}).items():
        state = ("skipped: " + str(r["skipped"]) if r.get("skipped") else "ok" if r.get("ok") else
                 "not run" if r.get("ok") is None else f"FAILED: {str(r.get('error'))[:200]}")
        lines.append(f"[{name}] {state} ({r.get('seconds')} s, disk peak {r.get('disk_peak_gib')} GiB)")
        if name == "probe":
            lines.append(f"  torch {r.get('torch')}, transformers {r.get('transformers')}, {r.get('device_name')}; "
                         f"context {r.get('context_mib')} MiB; pinned {r.get('pinned_request_bytes')} B took "
                         f"{r.get('pinned_probe_bytes')} B; arena {r.get('arena_nbytes')} B took "
                         f"{r.get('arena_pinned_bytes')} B")
        elif name == "cpu_vs_device":
            lines.append(f"  masks in common {r.get('masks_kept_in_common')}; Γ rel diff "
                         f"{r.get('gamma_rel_diff_worst_matrix')} (target {r.get('gamma_target')})")
        elif name == "drift_7b":
            fb = r.get("fwdbwd") or {}
            lines.append(f"  {peaks(r.get('run'))}; fwd+bwd {fb.get('seconds')} s ({fb.get('seconds_checkpointed')} "
                         f"checkpointed): step/fwdbwd {r.get('step_over_fwdbwd')}; Γ {r.get('gamma_gib')} GiB")
            lines += stages(r.get("run"))
        elif name == "checkpoint_7b":
            lines.append(f"  {peaks(r.get('run'))}; checkpoint {r.get('checkpoint_gib')} GiB in "
                         f"{r.get('checkpoint_write_seconds')} s (full depth {r.get('full_depth_checkpoint_gib')} GiB, "
                         f"{r.get('full_depth_write_seconds')} s); while writing {r.get('checkpoint_window')}")
        elif name == "frozen_and_onload":
            for k in ("frozen", "sparsegpt_onload"):
                lines.append(f"  {k}: {peaks(r.get(k))}")
        elif name == "fsdp" and not r.get("skipped"):
            lines.append(f"  {peaks(r.get('run'))}; Γ rows rel diff {r.get('gamma_rel_diff_worst_matrix')}; "
                         f"one process s/step {r.get('one_process_seconds_per_step')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        print("\n".join(summarize(json.loads(args.summarize.read_text()))))
        return 0
    for flag, fn in (("probe", helper_probe), ("build", helper_build), ("fwdbwd", helper_fwdbwd),
                     ("plans", helper_plans)):
        if getattr(args, flag):
            print(RESULT + json.dumps(fn(args), default=str), flush=True)
            return 0
    sys.path.insert(0, str(REPO))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for old in ("runs", "models", "plans", "logs", "cache", "gamma_rows_drift.safetensors"):  # start afresh
        remove(args.work / old)
    c = Check(args)

    def stop(signum, frame):  # the wrapper's timeout: end the running child, keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    order = [p for p in PARTS if p in args.parts]
    for name in PARTS:
        if name not in order:
            c.report["parts"][name]["skipped"] = "not asked (--parts)"
    for i, name in enumerate(order):
        rec = c.report["parts"][name]
        if name == "fsdp" and fsdp_ranks(c) <= 1:
            rec.update(skipped="one GPU visible and no --ranks N (N > 1)")
            c.save()
            continue
        # what is left less the least kept for the later parts, yet never less than this part's own least (15 s)
        now, reserve = time.perf_counter(), sum(RESERVE[p] for p in order[i + 1:])
        c.part_deadline = min(c.deadline, max(c.deadline - reserve, now + max(RESERVE[name], 15)))
        c.log(f"part {name}: up to {max(c.left(), 0):.0f} s")
        t0 = time.perf_counter()
        c.part_disk_peak = 0
        try:
            if c.left() < 5:
                raise TimeoutError("no time left in the budget")
            PART_FUNCTIONS[name](c, rec)
            rec["ok"] = True
        except KeyboardInterrupt as err:
            c.stop_child()
            rec.update(ok=False, error=f"interrupted ({err})")
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            c.save()
            return 1
        except Exception as err:  # noqa: BLE001 - a failed part is recorded, the next one runs
            c.stop_child()
            rec.update(ok=False, error=f"{type(err).__name__}: {err}"[-4000:])
            c.log_lines.append(traceback.format_exc())
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["disk_after_gib"] = c.note_disk()
        rec["disk_peak_gib"] = gib(c.part_disk_peak)
        c.save()
        c.log(f"part {name}: {'ok' if rec['ok'] else 'FAILED: ' + str(rec['error'])[:300]} in {rec['seconds']} s")
    c.save()
    return 0 if all(r["ok"] or r["skipped"] for n, r in c.report["parts"].items() if n in order) else 1


if __name__ == "__main__":
    sys.exit(main())
