"""Helpers shared by the benchmark scripts: the embedded model's shapes, memory readings, child processes, caches.

Scripts run as ``python scripts/<name>.py`` import this as ``bench_common`` (their folder is on
``sys.path``); code run in a child process by :func:`run_json_child` can import it too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent

#: SmolLM2-135M (the embedded model): width 576, MLP 1536, 9 heads of 64 with 3 KV heads, 30 blocks.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "num_hidden_layers": 30}
#: Its prunable matrices per block, ``[out, in]``: q, k, v, o, gate, up, down.
SMOLLM2_BLOCK_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``getrusage``), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: peak since the last reset), MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_json_child(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``python <argv>`` in a fresh process (peak memory is per process) and parse the JSON of its last
    stdout line. The child can ``import bench_common``. ``cwd``: where it runs (``python -c`` puts its working
    folder first on ``sys.path``). Raises ``CalledProcessError`` when it fails."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True, env=env, cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def isolated_cache(real: Path, folder: Path) -> Path:
    """A cache at ``folder`` that sees the prepared model, corpora and tasks of ``real`` (symlinks, read only)
    but none of its cached results (dense perplexities, calibration statistics, search index), so a
    benchmark measures the same work whatever ran before on this machine."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("models", "data", "raw", "tasks", "wheels", "manifest.json"):
        if (real / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(real / name, target_is_directory=(real / name).is_dir())
    return folder
