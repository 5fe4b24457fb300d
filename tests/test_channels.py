"""pattern=channels (issue 28): whole MLP channels cut from per-weight scores, the least-squares refit of the
projection after them (reconstruct=ls), and the export as a standard, smaller model, each against a slow reference
or a reload with plain transformers."""

from __future__ import annotations

import pytest
import torch

from _helpers import build_tiny_model, eval_windows_of, tiny_overrides, validate_overrides
from unipruning_cli.core.errors import UserError
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.pruning.channels import (channel_masks, channel_scores, channels_of_masks, kept_channels,
                                             ls_refit, mlp_channels, slice_channels)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 320


def _shapes(model) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()}


def test_mlps_are_found_by_the_names_of_their_matrices_and_experts_refused():
    llama = {f"model.layers.{i}.mlp.{p}": s for i in range(2)
             for p, s in (("gate_proj", (8, 4)), ("up_proj", (8, 4)), ("down_proj", (4, 8)))}
    found = mlp_channels({**llama, "model.layers.0.self_attn.o_proj": (4, 4)})
    assert [(m.parent, m.inputs, m.output, m.width) for m in found] == [
        (f"model.layers.{i}.mlp", (f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"),
         f"model.layers.{i}.mlp.down_proj", 8) for i in range(2)]
    gpt2 = {"transformer.h.0.mlp.c_fc": (16, 4), "transformer.h.0.mlp.c_proj": (4, 16),
            "transformer.h.0.attn.c_proj": (4, 4)}  # an attention c_proj is no MLP's
    assert [m.parent for m in mlp_channels(gpt2)] == ["transformer.h.0.mlp"]
    with pytest.raises(UserError, match="expert's MLP"):
        mlp_channels({"model.layers.0.mlp.experts.3.gate_proj": (8, 4), "model.layers.0.mlp.experts.3.up_proj": (8, 4),
                      "model.layers.0.mlp.experts.3.down_proj": (4, 8)})
    with pytest.raises(UserError, match="expert's MLP"):
        mlp_channels({"model.layers.0.mlp.shared_expert.gate_proj": (8, 4),
                      "model.layers.0.mlp.shared_expert.up_proj": (8, 4),
                      "model.layers.0.mlp.shared_expert.down_proj": (4, 8)})
    with pytest.raises(UserError, match="not one MLP"):
        mlp_channels({"a.mlp.gate_proj": (8, 4), "a.mlp.up_proj": (7, 4), "a.mlp.down_proj": (4, 8)})
    with pytest.raises(UserError, match="no MLP"):
        mlp_channels({"model.layers.0.self_attn.q_proj": (4, 4)})


def test_channel_scores_and_the_cut_match_a_loop_over_channels():
    g = torch.Generator().manual_seed(0)
    scores = {"b.mlp.gate_proj": torch.rand(10, 6, generator=g), "b.mlp.up_proj": torch.rand(10, 6, generator=g),
              "b.mlp.down_proj": torch.rand(6, 10, generator=g)}
    (mlp,) = mlp_channels({n: tuple(s.shape) for n, s in scores.items()})
    slow = [sum(float(scores["b.mlp.gate_proj"][j, i]) + float(scores["b.mlp.up_proj"][j, i]) for i in range(6))
            + sum(float(scores["b.mlp.down_proj"][o, j]) for o in range(6)) for j in range(10)]
    assert torch.allclose(channel_scores(mlp, scores), torch.tensor(slow, dtype=torch.float64))
    keep = kept_channels(channel_scores(mlp, scores), 0.3)
    assert int(keep.sum()) == 7
    assert set(torch.tensor(slow).argsort(descending=True)[:7].tolist()) == set(keep.nonzero().flatten().tolist())
    assert torch.equal(kept_channels(torch.ones(4), 0.5), torch.tensor([True, True, False, False]))  # ties: lower index
    with pytest.raises(UserError, match="removes all"):
        kept_channels(torch.ones(4), 0.9)
    masks = channel_masks(scores, 0.3)
    assert torch.equal(masks["b.mlp.gate_proj"], keep[:, None].expand(10, 6))
    assert torch.equal(masks["b.mlp.up_proj"], keep[:, None].expand(10, 6))
    assert torch.equal(masks["b.mlp.down_proj"], keep[None, :].expand(6, 10))
    assert torch.equal(channels_of_masks(masks, mlp), keep)
    broken = dict(masks, **{"b.mlp.down_proj": masks["b.mlp.down_proj"].clone()})
    broken["b.mlp.down_proj"][0, keep.nonzero()[0, 0]] = False
    with pytest.raises(ValueError, match="not whole channels"):
        channels_of_masks(broken, mlp)


def test_ls_refit_is_the_damped_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, True])
    xtx = x.T @ x
    got = ls_refit(w, xtx, keep, percdamp=0.01)
    # the reference: min ||X Wᵀ - X_K W'ᵀ||² + λ ||W_K - W'_K||² as one stacked least-squares problem
    lam = 0.01 * float(xtx.diagonal().mean())
    a = torch.cat([x[:, keep], lam ** 0.5 * torch.eye(int(keep.sum()), dtype=torch.float64)])
    b = torch.cat([x @ w.T, lam ** 0.5 * w[:, keep].T])
    ref = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(got[:, keep], ref, rtol=1e-8, atol=1e-10)
    assert bool((got[:, ~keep] == 0).all())
    masked_error = float(((x @ (w * keep).T - x @ w.T) ** 2).sum())
    assert float(((x @ got.T - x @ w.T) ** 2).sum()) < masked_error
    assert torch.allclose(ls_refit(w, xtx, torch.ones(12, dtype=torch.bool)), w, atol=1e-10)  # nothing removed


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_a_sliced_model_computes_what_the_masked_one_does_and_reloads_standard(arch, tmp_path):
    from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM

    if arch == "gemma":
        torch.manual_seed(0)
        model = GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16)).eval()
    else:
        model = build_tiny_model(arch, VOCAB)
    layers = prunable_layers(model)
    scores = {n: m.weight.detach().abs() for n, m in layers.items()}
    masks = channel_masks(scores, 0.25)
    width = model.config.intermediate_size
    with torch.no_grad():
        for n, m in masks.items():
            layers[n].weight.mul_(m)
    tokens = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(tokens).logits
    info = slice_channels(model, masks)
    assert info["width"] == (width, width - round(0.25 * width)) and model.config.intermediate_size == info["width"][1]
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, masked, rtol=1e-5, atol=1e-5)
    assert info["parameters"][1] == sum(p.numel() for p in model.parameters()) < info["parameters"][0]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_size == info["width"][1]
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_channels_are_refused_where_the_family_or_the_method_cannot_express_them(tiny_llama_dir, corpus_files):
    from _helpers import validate_overrides

    for extra, words in [(("method=sparsegpt", "pattern=channels", "sparsity=0.25"), "whole channels"),
                         (("pattern=channels", "sparsity=0.25", "refine=swap"), "refine=swap"),
                         (("reconstruct=ls",), "needs pattern=channels"),
                         (("pattern=channels", "pattern.allocation=per_row"), "drop pattern.allocation")]:
        with pytest.raises(UserError, match=words):
            validate_overrides(tiny_llama_dir, corpus_files, *extra)


@pytest.mark.e2e
def test_a_channels_run_exports_a_smaller_model_with_the_runs_perplexity(tmp_path, tiny_llama_dir, corpus_files,
                                                                        monkeypatch):
    """Γ cut into channels (and Wanda-sp beside it), with and without reconstruct=ls: the export is a standard folder
    with a smaller intermediate_size that plain from_pretrained loads at the perplexity the run measured."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.stages.export.apply import apply_masks_file, export_run

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    base += ["method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3", "pattern=channels",
             "sparsity=0.25", "eval.baselines=[wanda@one_shot]", "eval.dense=false"]
    for how in ("none", "ls"):
        run = tmp_path / how
        cfg = compose_prune([*base, f"reconstruct={how}"])
        metrics = run_prune(cfg, run)
        tag = "s0.25_channels"
        assert set(metrics["results"]) == {tag, f"wanda@one_shot:{tag}", "s0.25_channels-flap"}  # FLAP beside
        record = metrics["results"][tag].get("reconstruction")
        assert (record is None) if how == "none" else (record["method"] == "ls" and record["error_ratio"] < 1)
        out = export_run(run, out=tmp_path / f"export-{how}")
        assert out["tag"] == tag
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"export-{how}").eval()
        width = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config.intermediate_size
        assert reloaded.config.intermediate_size == width - round(0.25 * width)
        assert all(layer.mlp.down_proj.weight.shape[1] == reloaded.config.intermediate_size
                   for layer in reloaded.model.layers)
        windows, batch_size, corpus = eval_windows_of(run)
        got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
        assert got == pytest.approx(metrics["results"][tag]["ppl"][corpus], rel=1e-5)
        card = (tmp_path / f"export-{how}" / "README.md").read_text()
        assert "structural cut" in card and "intermediate_size=" in card
        # the run's own record of the parameters after the cut is the exported model's count
        assert metrics["results"][tag]["structure"]["parameters"][1] == sum(p.numel() for p in reloaded.parameters())
        from unipruning_cli.stages.plan.structural import exported_model  # the plan's count, from the shapes alone

        assert exported_model(cfg, torch.float32)["parameters"] == metrics["results"][tag]["structure"]["parameters"]
        summary = (run / "summary.md").read_text()
        assert "parameters instead of" in summary and "| 25% of channels |" in summary
        if how == "none":  # the masks file applied to the model: sliced as export slices it
            apply_masks_file(run / "masks" / f"{tag}.safetensors", str(tiny_llama_dir), tmp_path / "applied")
            applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
            assert applied.config.intermediate_size == reloaded.config.intermediate_size
            # a channels run's sparsity alone is a channels cut, cut from Γ at export
            assert export_run(run, sparsity=0.5, out=tmp_path / "half")["tag"] == "s0.50_channels"
        else:  # the masks of a refit cut do not hold the refit weights
            with pytest.raises(UserError, match="reconstruct=ls"):
                apply_masks_file(run / "masks" / f"{tag}.safetensors", str(tiny_llama_dir), tmp_path / "applied-ls")


@pytest.mark.e2e
def test_wanda_sp_is_wandas_scores_summed_per_channel(tmp_path, tiny_llama_dir, corpus_files, monkeypatch):
    """``method=local local_metric=wanda pattern=channels``, one-shot: the masks are those of |W|·‖X‖ (the run's own
    calibration statistics) summed per channel, computed here by hand; the sequential protocol (block i scored on
    the pruned blocks < i) gives whole channels, the same share in every MLP."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.pruning.mask_files import load_masks

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    base += ["pattern=channels", "sparsity=0.25", "eval.dense=false", "method=local", "local_metric=wanda"]
    tag = "s0.25_channels"
    run_prune(compose_prune([*base, "calibration.mode=one_shot"]), tmp_path / "l")
    got = load_masks(tmp_path / "l" / "masks" / f"{tag}.safetensors")
    with safe_open(str(tmp_path / "l" / "calibration.safetensors"), "pt") as f:
        sq = {k[: -len(".sq_sum")]: f.get_tensor(k) for k in f.keys()}
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    weights = {n: m.weight.detach() for n, m in prunable_layers(dense).items()}
    wanda = {n: weights[n].abs().float() * sq[n].sqrt().float()[None, :] for n in got}
    want = channel_masks(wanda, 0.25)
    assert set(got) == set(want) and all(n.rsplit(".", 1)[1] in ("gate_proj", "up_proj", "down_proj") for n in got)
    assert all(torch.equal(got[n], want[n]) for n in got)
    run_prune(compose_prune([*base, "calibration.mode=sequential"]), tmp_path / "s")
    sequential = load_masks(tmp_path / "s" / "masks" / f"{tag}.safetensors")
    for mlp in mlp_channels({n: tuple(m.shape) for n, m in sequential.items()}):
        assert int(channels_of_masks(sequential, mlp).sum()) == mlp.width - round(0.25 * mlp.width)


def test_a_model_whose_channels_cannot_be_sliced_is_refused_before_any_weight_is_read():
    """GPT-2: its MLP is HF Conv1D (taken as a Linear view for masks) and its config's n_inner is None."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unipruning_cli.models.layouts import as_linears
    from unipruning_cli.pruning.channels import check_channels_fit

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2))
    as_linears(model)
    with pytest.raises(UserError, match="not an nn.Linear"):
        check_channels_fit(model, prunable_layers(model))


def test_the_functions_a_model_card_names_import():
    from unipruning_cli.stages.export import load_compressed, to_semi_structured  # noqa: F401  (cards name them)


def test_flap_scores_and_bias_match_their_formulas_on_hand_made_inputs():
    """FLAP (An et al. 2024): a channel's score is the sample variance of its input times the squared norm of its
    column of down_proj (Eq. 5), its compensation the removed columns times their mean input (Eq. 8); recomputed
    here from the inputs themselves, token by token."""
    from unipruning_cli.data.calibration import InputCollector
    from unipruning_cli.pruning.channels import bias_shift, flap_scores

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 10, generator=g) * torch.linspace(0.1, 2, 10) + torch.linspace(-1, 1, 10)
    weights = {"b.mlp.gate_proj": torch.randn(10, 6, generator=g), "b.mlp.up_proj": torch.randn(10, 6, generator=g),
               "b.mlp.down_proj": torch.randn(6, 10, generator=g)}
    collector = InputCollector(10, want_hessian=False, want_per_sample=False)
    for sample in x:
        collector(None, (sample[None],))
    stats = {"b.mlp.down_proj": collector.stats()}
    flat = x.reshape(-1, 10).double()
    n = flat.shape[0]
    mean = [sum(float(flat[t, j]) for t in range(n)) / n for j in range(10)]
    var = [sum((float(flat[t, j]) - mean[j]) ** 2 for t in range(n)) / (n - 1) for j in range(10)]
    w = weights["b.mlp.down_proj"].double()
    slow = torch.tensor([var[j] * sum(float(w[o, j]) ** 2 for o in range(6)) for j in range(10)], dtype=torch.float64)
    scores = flap_scores(weights, stats)
    (mlp,) = mlp_channels({k: tuple(v.shape) for k, v in weights.items()})
    assert torch.allclose(channel_scores(mlp, scores), slow, rtol=1e-5)
    assert not scores["b.mlp.gate_proj"].any() and not scores["b.mlp.up_proj"].any()  # FLAP reads the column only
    keep = kept_channels(slow, 0.3)
    want = [sum(float(w[o, j]) * mean[j] for j in range(10) if not keep[j]) for o in range(6)]
    assert torch.allclose(bias_shift(weights["b.mlp.down_proj"], stats["b.mlp.down_proj"].mean, keep).double(),
                          torch.tensor(want, dtype=torch.float64), atol=1e-5)


@pytest.mark.e2e
def test_flap_with_its_bias_exports_a_standard_model_with_mlp_bias_at_the_runs_perplexity(
        tmp_path, tiny_llama_dir, corpus_files, monkeypatch):
    """``pattern=channels pattern.channel_score=flap reconstruct=bias`` (FLAP with its compensation), and Wanda-sp
    compensated the same way: the export is a Llama with mlp_bias=true and a smaller intermediate_size that plain
    from_pretrained loads at the run's perplexity and parameter count; Qwen2, whose MLP has no bias, is refused."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.stages.export.apply import export_run

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [*tiny_overrides(tiny_llama_dir, corpus_files), "pattern=channels", "sparsity=0.25", "eval.dense=false",
            "reconstruct=bias"]
    windows = None
    for score, tag in (("flap", "s0.25_channels-flap"), ("weights", "s0.25_channels")):
        run = tmp_path / score
        cfg = compose_prune([*base, f"pattern.channel_score={score}"])
        metrics = run_prune(cfg, run)
        assert list(metrics["results"]) == [tag] and metrics["results"][tag]["reconstruction"]["method"] == "bias"
        export_run(run, out=tmp_path / f"export-{score}")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"export-{score}").eval()
        assert reloaded.config.mlp_bias and reloaded.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
        assert not reloaded.model.layers[0].mlp.gate_proj.bias.any()
        windows, batch_size, corpus = eval_windows_of(run)
        got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
        assert got == pytest.approx(metrics["results"][tag]["ppl"][corpus], rel=1e-5)
        assert metrics["results"][tag]["structure"]["parameters"][1] == sum(p.numel() for p in reloaded.parameters())
        from unipruning_cli.stages.plan.structural import exported_model

        assert exported_model(cfg, torch.float32)["parameters"] == metrics["results"][tag]["structure"]["parameters"]
    qwen2 = build_tiny_model("qwen2", VOCAB)
    qwen2.save_pretrained(tmp_path / "qwen2")
    from unipruning_cli.core.errors import UserError as Refused

    with pytest.raises(Refused, match="mlp_bias"):
        validate_overrides(tmp_path / "qwen2", corpus_files, "pattern=channels", "reconstruct=bias")
