"""``pattern.allocation=auto`` (issue 29, step 5): each cut of Γ takes the allocation whose masks give the lowest loss
on held-out calibration windows (never the evaluation corpus); the choice and its losses are recorded."""

from __future__ import annotations

import pytest
import torch

from _helpers import tiny_overrides, validate_overrides
from unipruning_cli.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_auto_is_refused_where_no_saliency_is_cut(tiny_llama_dir, corpus_files):
    with pytest.raises(UserError, match="allocation=auto"):
        validate_overrides(tiny_llama_dir, corpus_files, "pattern.allocation=auto")  # method=local
    validate_overrides(tiny_llama_dir, corpus_files, "method=unipruning", "pattern.allocation=auto")


@pytest.mark.e2e
def test_auto_picks_the_allocation_of_lowest_held_out_loss_and_records_it(tmp_path, tiny_llama_dir, corpus_files,
                                                                          monkeypatch):
    """A UniPruning run at 0.6 and 0.7 with allocation=auto: each cut's record holds a loss per candidate, the pick is
    their minimum, the masks are those of the picked allocation cut from the run's Γ, and the losses are recomputed
    here by hand (the model with each candidate's masks on the held-out windows, which are not the calibration
    windows of the search)."""
    from dataclasses import replace

    from _helpers import load_tensors
    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.context import RunContext
    from unipruning_cli.data.calibration_set import calibration_set
    from unipruning_cli.models.loading import load_model
    from unipruning_cli.pruning.mask_files import load_masks
    from unipruning_cli.pruning.targets import make_target
    from unipruning_cli.pruning.weights import apply_masks
    from unipruning_cli.stages.allocation import CANDIDATES, holdout_loss, holdout_windows

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric=",
                                                                                          "export.sparsities"))]
    cfg = compose_prune([*base, "method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3",
                         "sparsity=0.6", "export.sparsities=[0.7]", "pattern.allocation=auto", "eval.dense=false"])
    run = tmp_path / "run"
    metrics = run_prune(cfg, run)
    assert set(metrics["results"]) == {"s0.60_auto", "s0.70_auto"}
    gamma = load_tensors(run / "gamma.safetensors")
    model, tok = load_model(cfg.model)
    ctx = RunContext(cfg).loaded(model, tok)
    windows = holdout_windows(ctx)
    search = calibration_set(cfg, tok)[0]
    assert not any(torch.equal(w, s) for w in windows for s in search)
    dense = {n: m.weight.detach().clone() for n, m in ctx.layers.items()}
    for tag, share in (("s0.60_auto", 0.6), ("s0.70_auto", 0.7)):
        record = metrics["results"][tag]["allocation"]
        assert set(record["losses"]) == set(CANDIDATES)
        assert record["picked"] == min(record["losses"], key=record["losses"].get)
        for candidate in CANDIDATES:
            target = replace(make_target(cfg), sparsity=share, allocation=candidate)
            masks = target.cut({n: g.abs() for n, g in gamma.items()})
            apply_masks(ctx.layers, masks)
            assert holdout_loss(ctx, windows) == pytest.approx(record["losses"][candidate], rel=1e-5)
            with torch.no_grad():
                for n, m in ctx.layers.items():
                    m.weight.copy_(dense[n])
            if candidate == record["picked"]:
                saved = load_masks(run / "masks" / f"{tag}.safetensors")
                assert all(torch.equal(saved[n], masks[n]) for n in masks)
