#!/usr/bin/env bash
# The device check (scripts/gpu_check.py, issue 25) as one command for the device machine: one H100 80 GB (or H200),
# 16 cores, 128 GiB RAM, 64 GiB disk, 10 minutes per command, its own python3 (torch 2.11, transformers 5.17,
# safetensors, accelerate), no hub. It ends within 8 minutes: the check's own budget is 450 s (each part gets what
# is left, its processes stopped at their part's deadline), and `timeout` stops it at 470 s whatever happens.
# gpu_check.json is rewritten after each part, so whatever ran is printed at the end, even after a failure.
# hydra-core, omegaconf and antlr4 travel as wheels in .whl (see the device tool's README: pip download --no-deps
# ... -d .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3), carried with the call
# (carry: [".whl"]). Extra arguments go to gpu_check.py (e.g. --parts probe,drift_7b, --budget 300).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu_check.sh: installing the wheels of .whl failed" >&2
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
df -h /tmp || true
# SIGTERM at 470 s (the check saves what it has and stops its child), SIGKILL 10 s later
timeout -k 10 470 python3 scripts/gpu_check.py --out "$OUT" "$@"
rc=$?
echo "gpu_check.py exit status: $rc"
if [ -f "$OUT/gpu_check.json" ]; then
  cat "$OUT/gpu_check.json"
  echo
  python3 scripts/gpu_check.py --summarize "$OUT/gpu_check.json" || true  # the gist, last in the output's tail
else
  echo "no $OUT/gpu_check.json was written"
fi
exit "$rc"
