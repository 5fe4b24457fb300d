#!/usr/bin/env bash
# The GPU check of the headline job, for the device machine (README "Large models"): under 10 minutes, no hub.
# Where more than one GPU is visible it adds the multi-GPU part: the drift search under torchrun with FSDP2.
# Its python3 holds torch, transformers, safetensors and accelerate; hydra-core, omegaconf and antlr4 travel as
# wheels in .whl (see the device tool's README: pip download --no-deps ... -d .whl hydra-core==1.3.2
# omegaconf==2.3.0 antlr4-python3-runtime==4.9.3), carried with the call (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT="${OUT:-/tmp/gpu_check_out}"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 scripts/gpu_check.py --out "$OUT" "$@"
