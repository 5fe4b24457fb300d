"""The embedded SmolLM2-135M on real offline text: one bounded run, and the full defaults (slow).

The runs read the prepared model and corpora from the user's cache, but through a temporary cache
folder whose ``models/`` and ``data/`` are symlinks to it: the dense-perplexity cache (``ppl/``) the
run writes then lands in tmp, so the user's cache is never written and the dense PPL is really
measured by the run rather than read back from an earlier one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _helpers import cli_env, run_cli
from conftest import real_model_prepared

pytestmark = pytest.mark.skipif(not real_model_prepared(), reason="embedded model not prepared (unipruning prepare)")


@pytest.fixture()
def real_ws(tmp_path):
    from unipruning_cli.paths import cache_dir

    real = cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("models", "data"):
        (cache / sub).symlink_to(real / sub, target_is_directory=True)
    (tmp_path / "cwd").mkdir()
    return {"root": tmp_path, "cwd": tmp_path / "cwd", "runs": tmp_path / "runs", "cache": cache, "real": real}


def _single_metrics(runs: Path) -> tuple[Path, dict]:
    found = list(runs.rglob("metrics.json"))
    assert len(found) == 1, found
    return found[0].parent, json.loads(found[0].read_text())


def _check(run_dir: Path, m: dict, real_cache: Path, nsamples: int, tag: str = "s0.50_per_row") -> None:
    ppl = m["perplexity"]["wiki_offline"]
    dense, pruned = ppl["dense"], ppl["pruned"]
    assert dense["cached"] is False  # measured by this run
    assert 10 < dense["ppl"] < 100, dense
    assert pruned["ppl"] > dense["ppl"]
    assert pruned["windows"] == dense["windows"]
    assert abs(m["sparsity"]["overall"] - 0.5) < 1e-6
    # SmolLM2-135M: 30 blocks x 7 projections
    assert len(m["sparsity"]["per_layer"]) == 30 * 7
    assert m["calibration"]["tokens"] == nsamples * 512 and m["calibration"]["source"] == "owt_offline"
    assert os.path.realpath(m["model"]["location"]) == os.path.realpath(real_cache / "models" / "smollm2-135m")
    assert (run_dir / "masks" / f"{tag}.safetensors").is_file()


def test_bounded_real_run(real_ws):
    # one intra-op thread: on a shared 2-core machine two threads spin against other work (3x slower)
    env = cli_env(real_ws["runs"], real_ws["cache"], threads=1)
    proc, seconds = run_cli(["prune", "method=local", "local_metric=wanda", "calibration.nsamples=4",
                             "eval.max_windows=2"], real_ws["cwd"], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir, m = _single_metrics(real_ws["runs"])
    _check(run_dir, m, real_ws["real"], nsamples=4)
    assert m["perplexity"]["wiki_offline"]["pruned"]["windows"] == 2
    # the user's cache was not written: the dense PPL went to the temporary one
    assert list((real_ws["cache"] / "dense").glob("*.json"))
    assert list(real_ws["cwd"].iterdir()) == []


def test_bounded_real_unipruning_run(real_ws):
    """The default method (UniPruning, drift mode, stochRIA anchor) with a two-step search."""
    env = cli_env(real_ws["runs"], real_ws["cache"], threads=1)
    proc, _ = run_cli(["prune", "schedule.steps=2", "calibration.nsamples=4", "eval.max_windows=2",
                       "export.sparsities=[0.5,0.7]"], real_ws["cwd"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir, m = _single_metrics(real_ws["runs"])
    _check(run_dir, m, real_ws["real"], nsamples=4, tag="s0.50_per_matrix")
    assert m["method"] == "unipruning" and m["local_metric"]["name"] == "stochria"
    assert m["results"]["s0.70_per_matrix"]["ppl"]["wiki_offline"] > m["results"]["s0.50_per_matrix"]["ppl"]["wiki_offline"]
    rows = (run_dir / "search.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[1])["lr"] > 0
    assert (run_dir / "gamma.safetensors").is_file() and (run_dir / "plots" / "search.png").is_file()


@pytest.mark.slow
def test_full_defaults_run(real_ws):
    env = cli_env(real_ws["runs"], real_ws["cache"], threads=None)
    proc, _ = run_cli(["prune"], real_ws["cwd"], env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir, m = _single_metrics(real_ws["runs"])
    _check(run_dir, m, real_ws["real"], nsamples=128, tag="s0.50_per_matrix")
    assert m["perplexity"]["wiki_offline"]["pruned"]["windows"] == 40


def test_tool_perplexity_equals_hf_loss_on_the_embedded_model(real_ws, monkeypatch):
    """The runner's dense PPL of SmolLM2 equals exp(mean HF loss) over the same windows, to 1e-4."""
    import math

    import torch
    from omegaconf import OmegaConf

    from unipruning_cli.data import eval_windows, token_stream
    from unipruning_cli.models import load_model
    from unipruning_cli.evaluation.dense import dense_evaluation
    from unipruning_cli.evaluation.protocol import eval_windows_of
    from unipruning_cli.progress import Timer

    monkeypatch.setenv("UNIPRUNING_CACHE", str(real_ws["cache"]))
    torch.set_num_threads(1)
    cfg = OmegaConf.create({"model": {"name": "smollm2-135m", "source": "embedded", "path": "smollm2-135m",
                                      "revision": None, "dtype": "auto", "device": "auto", "device_map": None,
                                      "trust_remote_code": False, "add_bos": False},
                            "eval": {"corpora": ["wiki_offline"], "seqlen": 512, "max_windows": 2, "batch_size": 2,
                                     "tasks": []}})
    model, tok = load_model(cfg.model)
    ours = dense_evaluation(cfg, model, tok, eval_windows_of(cfg, tok), Timer())["perplexity"]["wiki_offline"]["ppl"]
    windows = eval_windows(token_stream(tok, "wiki_offline", "eval"), 512, 2)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert math.isclose(ours, math.exp(sum(losses) / len(losses)), rel_tol=1e-4)
