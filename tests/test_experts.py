"""pattern=experts (issue 28): whole experts removed with their router rows, each score against a slow reference, the
removal against a hand-written MoE block, and the export as a standard model with fewer experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import eval_windows_of, moe_folder, moe_model, tiny_overrides, validate_overrides
from unipruning_cli.core.errors import UserError
from unipruning_cli.models.layouts import as_linears
from unipruning_cli.pruning.experts import (ExpertRouting, RoutingObserver, RoutingStats, expert_scores, kept_experts,
                                            moe_layers, remove_experts)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _observed(family: str, tokens: torch.Tensor):
    model = moe_model(family)
    as_linears(model)
    layers = moe_layers(model)
    with torch.no_grad(), RoutingObserver(layers, model) as observer:
        model(tokens)
    return model, layers, observer.stats


def test_reap_and_frequency_match_a_loop_over_tokens():
    """REAP (Lasby et al. 2025, Eq. 6): per expert, the mean over the tokens routed to it of the router weight times
    the norm of its output; frequency: its share of the routed slots. Recomputed here token by token from the router
    and the experts' own weights (Mixtral: softmax, top-2, renormalised)."""
    tokens = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    model, layers, stats = _observed("mixtral", tokens)
    block = model.model.layers[0]
    captured = {}
    handle = block.mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    router = block.mlp.gate.weight.double()
    fused = block.mlp.experts.fused_module
    sums, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.T, -1)
        top = torch.topk(probs, 2)
        weights = top.values / top.values.sum()
        for w, e in zip(weights.tolist(), top.indices.tolist()):
            gate, up = (fused.gate_up_proj[e].double() @ x[t]).chunk(2)
            out = fused.down_proj[e].double() @ (F.silu(gate) * up)
            sums[e] += w * float(out.detach().norm())
            counts[e] += 1
    st = stats[layers[0].experts]
    assert torch.equal(st.tokens, counts.long())
    assert torch.allclose(expert_scores(layers[0], "reap", st), sums / counts.clamp(min=1), rtol=1e-4)
    assert torch.allclose(expert_scores(layers[0], "frequency", st), counts / counts.sum())


def test_saliency_is_the_experts_score_sum_times_its_frequency():
    model = moe_model("mixtral")
    as_linears(model)
    layer = moe_layers(model)[0]
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(model.get_submodule(n).weight.shape, generator=g) for names in layer.matrices for n in names}
    st = RoutingStats(torch.tensor([5, 0, 10, 5]))
    slow = [sum(float(scores[n].double().sum()) for n in layer.matrices[e]) * [5, 0, 10, 5][e] / 20 for e in range(4)]
    assert torch.allclose(expert_scores(layer, "saliency", st, scores), torch.tensor(slow, dtype=torch.float64))
    assert torch.equal(kept_experts(torch.tensor([3.0, 1.0, 2.0, 0.5]), 0.5), torch.tensor([True, False, True, False]))
    assert torch.equal(kept_experts(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.0, removed=1),
                       torch.tensor([True, True, True, False]))  # ties: the lower index is kept
    with pytest.raises(UserError, match="num_experts_per_tok"):
        kept_experts(torch.ones(4), 0.75, top_k=2)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_removed_experts_are_routed_around_as_a_hand_written_block_would(family):
    """The model without experts 1 and 3 of each layer computes, in its MoE blocks, the router's softmax and top-k over
    the kept experts only (the kept rows of the original router), the kept experts' outputs, and (Qwen2-MoE) the
    shared expert with its gate untouched; restore() gives the original model back bit for bit."""
    tokens = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    model = moe_model(family)
    as_linears(model)
    with torch.no_grad():
        before = model(tokens).logits
    mlp = model.model.layers[1].mlp
    router = mlp.gate.weight.detach().clone()
    gate_up = mlp.experts.fused_module.gate_up_proj.detach().clone()
    down = mlp.experts.fused_module.down_proj.detach().clone()
    shared = {n: p.detach().clone() for n, p in mlp.named_parameters() if "shared_expert" in n}
    keep = torch.tensor([True, False, True, False])
    handle = remove_experts(model, {layer.experts: keep for layer in moe_layers(model)})
    mlp = model.model.layers[1].mlp
    assert torch.equal(mlp.gate.weight, router[keep]) and len(mlp.experts) == 2
    assert all(torch.equal(p, shared[n]) for n, p in mlp.named_parameters() if "shared_expert" in n)
    assert handle.structure["experts"] == [4, 2]
    captured = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach())),
             mlp.register_forward_hook(lambda m, a, out: captured.setdefault("y", out[0] if isinstance(out, tuple)
                                                                               else out))]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    kept = keep.nonzero().flatten().tolist()
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router[kept].double().T, -1)
        top = torch.topk(probs, 2)
        weights = top.values / top.values.sum() if family == "mixtral" or model.config.norm_topk_prob else top.values
        for w, j in zip(weights.tolist(), top.indices.tolist()):
            g, u = (gate_up[kept[j]].double() @ x[t]).chunk(2)
            want[t] += w * (down[kept[j]].double() @ (F.silu(g) * u))
        if family == "qwen2_moe":
            sh = {n.removeprefix("shared_expert."): p.double() for n, p in shared.items() if "gate." not in n[:20]}
            g = F.silu(sh["gate_proj.weight"] @ x[t]) * (sh["up_proj.weight"] @ x[t])
            want[t] += torch.sigmoid(shared["shared_expert_gate.weight"].double() @ x[t]) * (sh["down_proj.weight"] @ g)
    assert torch.allclose(captured["y"].reshape(want.shape).double(), want, atol=1e-5)
    handle.restore()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)


def test_experts_are_refused_where_the_model_or_the_options_cannot_take_them(tmp_path, tiny_llama_dir, tiny_tokenizer,
                                                                            corpus_files):
    mixtral = moe_folder("mixtral", tiny_tokenizer, tmp_path)
    for folder, extra, match in [
        (tiny_llama_dir, ["pattern=experts", "sparsity=0.25"], "no mixture-of-experts"),
        (mixtral, ["pattern=experts", "sparsity=0.75"], "num_experts_per_tok"),
        (mixtral, ["pattern=experts", "pattern.experts_removed=3"], "num_experts_per_tok"),
        (mixtral, ["pattern=experts", "pattern.experts_removed=1.5"], "whole count"),
        (mixtral, ["pattern=experts", "sparsity=0.25", "pattern.experts_removed=1"], "give one"),
        (mixtral, ["pattern=experts", "pattern.expert_score=gradients"], "expert_score"),
        (mixtral, ["pattern=experts", "reconstruct=obs"], "drop reconstruct"),
        (mixtral, ["pattern=experts", "method=sparsegpt"], "whole experts"),
        (mixtral, ["pattern=experts", "method=unipruning", "eval.baselines=[wanda]"], "one_shot"),
        (mixtral, ["pattern=experts", "pattern.experts_removed=0.1"], "removes none"),
        (mixtral, ["pattern=experts", "sparsity=0.25", "pattern.experts_floor=4"], "experts_floor=4"),
        (mixtral, ["pattern.expert_score=reap"], "not read with pattern=unstructured"),
        (mixtral, ["pattern=channels", "pattern.experts_floor=2"], "not read with pattern=channels"),
    ]:
        with pytest.raises(UserError, match=match):
            validate_overrides(folder, corpus_files, *extra)


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_an_experts_run_exports_a_model_with_fewer_experts_at_the_runs_perplexity(family, tmp_path, tiny_tokenizer,
                                                                                  corpus_files, monkeypatch):
    """UniPruning's Γ-saliency, REAP and frequency cuts at 25 % and 50 % of the experts in one run (Wanda-saliency
    beside): each export is a standard folder with fewer experts (config and router rows) that plain from_pretrained
    loads at the run's perplexity, whose weight files shrink by the experts' share."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.stages.export.apply import apply_masks_file, export_run
    from unipruning_cli.stages.export.folder import weights_bytes

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    folder = moe_folder(family, tiny_tokenizer, tmp_path)
    field = "num_local_experts" if family == "mixtral" else "num_experts"
    base = [o for o in tiny_overrides(folder, corpus_files) if not o.startswith(("method=", "local_metric=",
                                                                                 "export.sparsities"))]
    run = tmp_path / "run"
    cfg = compose_prune([*base, "method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3",
                         "pattern=experts", "sparsity=0.25", "export.sparsities=[0.5]", "eval.baselines=[wanda@one_shot]",
                         "eval.dense=false"])
    metrics = run_prune(cfg, run)
    tags = [f"s{s}_experts-{k}" for s in ("0.25", "0.50") for k in ("saliency", "reap", "frequency")]
    assert set(metrics["results"]) == {*tags, "wanda@one_shot:s0.25_experts-saliency",
                                       "wanda@one_shot:s0.50_experts-saliency"}
    assert (run / "routing.safetensors").is_file()
    dense_bytes = weights_bytes(folder)
    windows, batch_size, corpus = eval_windows_of(run)
    original = AutoModelForCausalLM.from_pretrained(folder)
    expert_params = sum(p.numel() for n, p in original.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in original.parameters())
    for tag, removed in (("s0.25_experts-reap", 1), ("s0.50_experts-saliency", 2)):
        out = tmp_path / tag
        sparsity = None if tag.endswith("reap") else 0.5
        if tag.endswith("reap"):
            apply_masks_file(run / "masks" / f"{tag}.safetensors", str(folder), out)
        else:
            assert export_run(run, sparsity=sparsity, out=out)["tag"] == tag
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert getattr(reloaded.config, field) == 4 - removed
        assert all(layer.mlp.gate.weight.shape[0] == 4 - removed for layer in reloaded.model.layers)
        got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
        assert got == pytest.approx(metrics["results"][tag]["ppl"][corpus], rel=1e-5)
        params = sum(p.numel() for p in reloaded.parameters())
        router_rows = removed * original.config.hidden_size * original.config.num_hidden_layers
        assert params == total - expert_params * removed // 4 - router_rows
        assert metrics["results"][tag]["structure"]["parameters"] == [total, params]
        assert weights_bytes(out) == pytest.approx(dense_bytes * params / total, rel=0.01)
    from unipruning_cli.stages.plan.structural import exported_model  # the plan's count, from the shapes alone

    assert exported_model(cfg, torch.float32)["parameters"] == metrics["results"]["s0.25_experts-saliency"][
        "structure"]["parameters"]
    with pytest.raises(UserError, match="made in the run"):
        export_run(run, sparsity=0.75, out=tmp_path / "no")


def test_the_routing_of_a_list_of_linear_experts_is_counted_and_reap_refused():
    """Experts held as a ModuleList of Linear experts (older and remote-code layouts): their token counts are seen,
    REAP (whose router weights are applied outside the list) is refused by name."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(4))

        def forward(self, x):
            top = self.gate(x).topk(1, -1).indices[..., 0]
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                sel = top == e
                if sel.any():
                    out[sel] = expert(x[sel])
            return out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "num_local_experts": 4})()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    model = Model()
    layers = moe_layers(model)
    assert [(layer.router, layer.count, layer.fused) for layer in layers] == [
        ("layers.0.gate", 4, False), ("layers.1.gate", 4, False)]
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    with RoutingObserver(layers, model) as observer:
        model.layers[0](x)
    want = torch.bincount(model.layers[0].gate(x).topk(1, -1).indices[:, 0], minlength=4)
    assert torch.equal(observer.stats["layers.0.experts"].tokens, want)
    with pytest.raises(UserError, match="reap"):
        ExpertRouting(layers, observer.stats, {}, 1).masks(0.25, 0, "reap")
    from unipruning_cli.pruning.targets import Target
    from unipruning_cli.stages.routing import drop_unscored

    primary = Target(0.25, "experts", score="saliency")
    cuts = [primary, Target(0.25, "experts", score="reap"), Target(0.25, "experts", score="frequency")]
    assert [t.score for t in drop_unscored(cuts, primary, model)] == ["saliency", "frequency"]  # REAP left out
    handle = remove_experts(model, {layer.experts: torch.tensor([True, True, False, True]) for layer in layers})
    assert len(model.layers[0].experts) == 3 and model.layers[0].gate.weight.shape == (3, 8)
    handle.restore()
    assert len(model.layers[0].experts) == 4 and model.layers[0].gate.out_features == 4


@pytest.mark.e2e
def test_wanda_saliency_of_experts_is_wandas_scores_summed_per_expert_times_frequency(tmp_path, tiny_tokenizer,
                                                                                    corpus_files, monkeypatch):
    """``method=local local_metric=wanda pattern=experts``: each layer keeps the experts of highest Σ|W|·‖X‖ over their
    matrices (the run's own calibration statistics) times their routing frequency (the run's routing.safetensors),
    recomputed here by hand; the run is evaluated with the experts removed, never as zeroed experts."""
    from transformers import AutoModelForCausalLM

    from _helpers import load_tensors
    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    folder = moe_folder("mixtral", tiny_tokenizer, tmp_path)
    run = tmp_path / "run"
    metrics = run_prune(compose_prune([*tiny_overrides(folder, corpus_files), "pattern=experts", "sparsity=0.5",
                                       "eval.dense=false"]), run)
    tag = "s0.50_experts-saliency"
    assert list(metrics["results"]) == [tag] and metrics["results"][tag]["structure"]["experts"] == [4, 2]
    masks = load_tensors(run / "masks" / f"{tag}.safetensors")
    stats, routing = load_tensors(run / "calibration.safetensors"), load_tensors(run / "routing.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts"
        tokens = routing[f"{prefix}.tokens"].double()
        fused = {p: getattr(layer.mlp.experts, p).detach() for p in ("gate_up_proj", "down_proj")}
        score = [sum(float((fused[p][e].double().abs() * stats[f"{prefix}.{e}.{p}.sq_sum"].sqrt()).sum())
                     for p in fused) * float(tokens[e] / tokens.sum()) for e in range(4)]
        want = set(torch.tensor(score).argsort(descending=True)[:2].tolist())
        kept = {e for e in range(4) if bool(masks[f"{prefix}.{e}.down_proj"].any())}
        assert kept == want


def test_one_budget_over_the_layers_keeps_a_floor_and_ranks_scores_within_their_layer():
    """``pattern.experts_floor``: k per layer times the layers removed where the scores, each divided by its layer's
    mean, are lowest, never below the floor; a hand-worked case."""
    from unipruning_cli.pruning.experts import global_keeps

    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([4.0, 0.1, 0.1, 3.8])]
    keeps = global_keeps(scores, 0.25, 0, floor=2)  # budget 2: both from layer 1 (0.1 / 2.0 = 0.05 each)
    assert [k.tolist() for k in keeps] == [[True] * 4, [True, False, False, True]]
    keeps = global_keeps(scores, 0.5, 0, floor=2)  # budget 4: layer 1 stops at its floor, layer 0 gives the rest
    assert [int(k.sum()) for k in keeps] == [2, 2]
    with pytest.raises(UserError, match="experts_floor=3"):
        global_keeps(scores, 0.5, 0, floor=3)


@pytest.mark.e2e
def test_a_run_under_one_budget_is_measured_with_its_layers_own_counts_and_never_exported(tmp_path, tiny_tokenizer,
                                                                                         corpus_files, monkeypatch):
    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.export.apply import export_run

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    folder = moe_folder("qwen2_moe", tiny_tokenizer, tmp_path)
    run = tmp_path / "run"
    metrics = run_prune(compose_prune([*tiny_overrides(folder, corpus_files), "pattern=experts", "sparsity=0.25",
                                       "pattern.expert_score=reap", "pattern.experts_floor=2", "eval.dense=false"]), run)
    (tag,) = metrics["results"]
    assert tag == "s0.25_experts-reap-floor2"
    before, after = metrics["results"][tag]["structure"]["experts"]
    assert before == 4 and (after == 3 or sorted(after) == [2, 4])  # 2 experts removed in all, 2 kept at least
    assert metrics["results"][tag]["measured_sparsity"] > 0
    with pytest.raises(UserError, match="no standard config"):
        export_run(run, out=tmp_path / "out")


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_experts_leave_every_fused_family_as_a_model_that_reloads_with_its_outputs(family, tmp_path):
    """gpt-oss (a router bias), Qwen3-MoE, OLMoE and DeepSeek-V3 (a score-correction bias, one expert group, shared
    experts): one expert of four removed in every layer, the model saved and reloaded with plain transformers computes
    what the model did in memory, with the smaller expert count in its config and every [E] router tensor."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from _helpers import MOE_SHAPE, moe_config
    from unipruning_cli.models.layouts import EXPERT_FIELDS, hf_layout

    if family == "olmoe":
        config = tf.OlmoeConfig(vocab_size=320, intermediate_size=64, num_experts=4, num_experts_per_tok=2, **MOE_SHAPE)
    elif family == "deepseek_v3":
        config = tf.DeepseekV3Config(vocab_size=320, intermediate_size=128, moe_intermediate_size=32,
                                     n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                     n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **MOE_SHAPE)
    else:
        config = moe_config(family, 320)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    as_linears(model)
    layers = moe_layers(model)
    assert layers and all(layer.fused for layer in layers)
    keep = torch.tensor([True, False, True, True])
    removed = remove_experts(model, {layer.experts: keep for layer in layers})
    tokens = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(tokens).logits
    with hf_layout(model):
        model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {getattr(again.config, f) for f in EXPERT_FIELDS if isinstance(getattr(again.config, f, None), int)} == {3}
    router = again.get_submodule(layers[0].router)
    assert all(t.shape[0] == 3 for t in [*router.parameters(), *router.buffers()] if t.dim() >= 1)
    with torch.no_grad():
        assert torch.allclose(again(tokens).logits, want, atol=1e-5)
    assert removed.structure["parameters"][1] == sum(p.numel() for p in again.parameters())
