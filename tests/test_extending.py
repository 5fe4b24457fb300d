"""Adding a method (README, "Adding a method"): a local metric or regulariser registered in one place is usable
from the CLI by name, with no config file and no other code touched."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from _helpers import tiny_overrides


def _register(monkeypatch, registry, name: str, cls) -> None:
    """``registry.register(name)(cls)`` for this test only."""
    monkeypatch.setitem(registry._items, name, cls)


def _column_weighted_metric():
    from unipruning_cli.metrics import LocalMetric
    from unipruning_cli.metrics.base import abs_fp32

    @dataclass(frozen=True)
    class ColumnWeighted(LocalMetric):
        """|W_ij| · (j + 1) ** power: differs from every built-in metric, so its masks are its own."""

        name: ClassVar[str] = "column_weighted"
        power: float = 1.0

        def score(self, weight, stats, generator=None):
            w = abs_fp32(weight)
            return w * (torch.arange(w.shape[1], dtype=torch.float32) + 1) ** self.power

    return ColumnWeighted


def test_a_metric_registered_here_prunes_from_the_cli(monkeypatch, tmp_path, tiny_llama_dir, corpus_files):
    from transformers import AutoModelForCausalLM

    from unipruning_cli.cli import main
    from unipruning_cli.pruning.mask_files import load_masks
    from unipruning_cli.pruning.masks import masks_for
    from unipruning_cli.metrics import METRICS
    from unipruning_cli.models.loading import prunable_layers

    metric = _column_weighted_metric()
    _register(monkeypatch, METRICS, "column_weighted", metric)
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    torch.set_num_threads(1)
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("local_metric=")]
    main(["prune", *overrides, "local_metric=column_weighted", "local_metric.power=2", "sparsity=0.5",
          f"hydra.run.dir={run}", "hydra/job_logging=none", "hydra/hydra_logging=none"])

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["local_metric"] == {"name": "column_weighted", "power": 2.0}
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5)
    layers = prunable_layers(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    expected = masks_for({n: metric(power=2.0).score(m.weight, None) for n, m in layers.items()}, 0.5, "per_matrix")
    got = load_masks(run / "masks" / "s0.50_per_matrix.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_regularizer_registered_here_composes_validates_and_builds(monkeypatch, tiny_llama_dir, corpus_files):
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.search.regularizers import REGULARIZERS, L1Prox, build_regularizer

    @dataclass(frozen=True)
    class Halved(L1Prox):
        def __call__(self, v, generator=None):
            return v / 2

    _register(monkeypatch, REGULARIZERS, "halved", Halved)
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("method=")]
    cfg = compose_prune([*base, "method=unipruning", "regularizer=halved", "regularizer.lam=0.25"])
    validate(cfg)
    prox = build_regularizer(cfg.regularizer.name, cfg.regularizer.lam, cfg.regularizer.threshold_mode)
    assert isinstance(prox, Halved) and prox.lam == 0.25
    assert torch.equal(prox(torch.ones(2)), torch.full((2,), 0.5))
    with pytest.raises(UserError, match="did you mean 'halved'"):
        validate(compose_prune([*base, "method=unipruning", "regularizer.name=halve"]))
