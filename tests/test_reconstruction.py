"""Reconstruction on a given mask (issue: beyond the paper): the OBS solve with the mask fixed leaves the weights
alone under an all-ones mask, keeps exactly the given mask, and lowers each layer's output error on the calibration
data; a run with ``reconstruct=obs`` records it and evaluates the updated weights."""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.pruning.obs import obs_reconstruct
from unipruning_cli.stages.reconstruction import output_error


def _layer(seed: int = 0, out: int = 24, inp: int = 40, tokens: int = 400):
    gen = torch.Generator().manual_seed(seed)
    # correlated channels of different scales, as a layer's inputs are (with independent channels the OBS update
    # has nothing to compensate with: H is diagonal)
    x = (torch.randn(tokens, inp, generator=gen) @ (torch.eye(inp) + 0.5 * torch.randn(inp, inp, generator=gen))
         * torch.linspace(0.2, 3.0, inp))
    x[:, 5] = 0  # a channel that never fires
    w = torch.randn(out, inp, generator=gen)
    return w, x, x.t() @ x


def test_an_all_ones_mask_leaves_the_weights_unchanged():
    w, _, xtx = _layer()
    keep = torch.ones_like(w, dtype=torch.bool)
    assert torch.equal(obs_reconstruct(w, 2 * xtx / 400, keep), w)


@pytest.mark.parametrize("kind", ["random", "wanda", "2:4"])
def test_a_given_mask_is_kept_exactly_and_the_output_error_drops(kind):
    w, x, xtx = _layer(1)
    score = {"random": torch.rand(w.shape, generator=torch.Generator().manual_seed(2)),
             "wanda": w.abs() * x.norm(dim=0)}.get(kind, w.abs())
    if kind == "2:4":
        groups = score.view(w.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        keep = keep.view(w.shape)
    else:
        keep = score >= score.flatten().kthvalue(w.numel() // 2).values
    new = obs_reconstruct(w, 2 * xtx / 400, keep)
    assert torch.equal(new != 0, keep & (w != 0))  # exactly the mask: zero where pruned, kept weights nonzero
    masked_error = float(((w * keep - w) @ x.t()).pow(2).sum())
    rebuilt_error = float(((new - w) @ x.t()).pow(2).sum())
    assert rebuilt_error < 0.95 * masked_error, (rebuilt_error, masked_error)
    # and no better than the least-squares optimum on that mask, row by row: w_K + H_KK⁻¹ H_KP w_P
    best = 0.0
    for r in range(w.shape[0]):
        k, p = keep[r], ~keep[r]
        opt = w[r, k] + torch.linalg.solve(xtx[k][:, k] + 1e-6 * torch.eye(int(k.sum())), xtx[k][:, p] @ w[r, p])
        row = torch.zeros_like(w[r])
        row[k] = opt
        best += float(((row - w[r]) @ x.t()).pow(2).sum())
    assert best <= rebuilt_error * 1.001
    assert output_error(new - w, xtx) == pytest.approx(rebuilt_error, rel=1e-4)
    assert torch.equal(new[:, 5], (w * keep)[:, 5])  # the dead channel's kept weights as they were


def test_on_sparsegpts_own_mask_it_gives_sparsegpts_weights():
    """The same sweep as SparseGPT's, the mask given instead of chosen: on the mask SparseGPT chose, the same
    weights, bit for bit (no dead channel here: SparseGPT zeroes those, reconstruction keeps them)."""
    from unipruning_cli.pruning.obs import sparsegpt_prune

    w, x, _ = _layer(3)
    x[:, 5] = 1.0
    h = 2 * x.t() @ x / 400
    for kw in ({"sparsity": 0.6}, {"n": 2, "m": 4}):
        chosen, keep = sparsegpt_prune(w, h, blocksize=16, **kw)
        assert torch.equal(obs_reconstruct(w, h, keep, blocksize=16), chosen)


def test_a_run_with_reconstruction_keeps_the_methods_mask_and_records_the_update(tmp_path, tiny_llama_dir,
                                                                             corpus_files, monkeypatch):
    from _helpers import tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.pruning.mask_files import load_masks
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    base = [*tiny_overrides(tiny_llama_dir, corpus_files), "eval.dense=false", "calibration.nsamples=16"]
    plain = run_prune(compose_prune(base), tmp_path / "plain")
    obs = run_prune(compose_prune([*base, "reconstruct=obs"]), tmp_path / "obs")
    tag = "s0.50_per_row"
    assert "reconstruction" not in plain["results"][tag]
    record = obs["results"][tag]["reconstruction"]
    assert record["method"] == "obs" and record["layers"] == 21 and record["error_ratio"] < 1
    assert obs["results"][tag]["measured_sparsity"] == plain["results"][tag]["measured_sparsity"]
    a, b = load_masks(tmp_path / "plain/masks" / f"{tag}.safetensors"), load_masks(tmp_path / "obs/masks" / f"{tag}.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)  # Wanda's own mask, then the weights updated on it
    (corpus,) = obs["results"][tag]["ppl"]  # the updated weights were evaluated (a random model's PPL says no more)
    assert obs["results"][tag]["ppl"][corpus] != plain["results"][tag]["ppl"][corpus]


def test_export_of_a_reconstructing_run_redoes_the_update_and_apply_refuses_its_masks(tmp_path, tiny_llama_dir,
                                                                                      corpus_files, monkeypatch):
    """Export writes the model the run evaluated (the update redone on the run's calibration samples: the same
    perplexity); a masks file of such a run cannot stand for it, and apply says so."""
    from transformers import AutoModelForCausalLM

    from _helpers import eval_windows_of, tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.stages.export.apply import apply_masks_file, export_run
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    run = tmp_path / "run"
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    metrics = run_prune(compose_prune([*base, "method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3",
                                       "reconstruct=obs", "eval.dense=false"]), run)
    out = export_run(run, out=tmp_path / "export")
    windows, batch_size, corpus = eval_windows_of(run)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
    assert got == pytest.approx(metrics["results"][out["tag"]]["ppl"][corpus], rel=1e-6)
    with pytest.raises(UserError, match="reconstruct=obs.*unipruning export"):
        apply_masks_file(run / "masks" / f"{out['tag']}.safetensors", str(tiny_llama_dir), tmp_path / "applied")
