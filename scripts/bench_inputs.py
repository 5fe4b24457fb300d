"""What recording a run's inputs costs (issue 26): :func:`unipruning_cli.core.inputs.run_inputs` of a config, with an
empty digest memo (every file hashed) and again with the memo it wrote (nothing read).

    python scripts/bench_inputs.py [overrides ...]      # default: the default run (embedded SmolLM2-135M)

The model, tokenizer and corpora are read from the real cache; the digest memo goes to a temporary cache, so the
user's memo is neither used nor touched. The cold figure includes reading the files (from the page cache where the
system holds them)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock


def main(overrides: list[str]) -> dict:
    from unipruning_cli.core import inputs
    from unipruning_cli.core.config import compose_prune

    cfg = compose_prune(overrides)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(inputs, "_digest_cache",
                                                                 lambda: Path(tmp) / "digests.json"):
        t0 = time.perf_counter()
        record = inputs.run_inputs(cfg)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        inputs.run_inputs(cfg)
        warm = time.perf_counter() - t0
    files = {**(record["model"] or {}), **(record["tokenizer"] or {})}
    size = sum(f["bytes"] for f in files.values())
    out = {"model": cfg.model.name, "files": len(files), "mib": round(size / 2**20, 1), "cold_s": round(cold, 3),
           "memoised_s": round(warm, 4), "mib_per_s_cold": round(size / 2**20 / cold, 1)}
    print(f"{out['model']}: {out['files']} model and tokenizer files, {out['mib']} MiB (+ corpora); run_inputs "
          f"cold {out['cold_s']} s ({out['mib_per_s_cold']} MiB/s), memoised {out['memoised_s']} s")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
