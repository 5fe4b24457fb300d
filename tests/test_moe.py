"""Mixture-of-experts models (issue: every model family): fused 3-D expert tensors pruned as one matrix per expert,
each expert calibrated on the tokens its router sent it, every method end to end, export reloading with plain
transformers. Tiny random models of each transformers MoE layout, built in seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _helpers import (
    assert_same_run,
    eval_windows_of,
    moe_folder,
    moe_model,
    save_model,
    sharded_overrides,
    single_and_sharded,
    tiny_llama,
    tiny_overrides,
    validate_overrides,
)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_one_linear_per_expert_computes_what_transformers_does_and_shares_its_storage(family):
    """The per-expert Linears give transformers' eager logits (bit for bit where transformers' eager loop uses
    F.linear, as every concatenated-gate layout does), hold no copy of the weights, and pruning one expert's
    Linear prunes that expert's slice of the fused tensor that ``save_pretrained`` writes."""
    from unipruning_cli.models.layouts import as_linears, hf_layout
    from unipruning_cli.models.loading import prunable_layers, unprunable_in_blocks

    model = moe_model(family)
    model.set_experts_implementation("eager")
    x = torch.randint(0, 320, (2, 12))
    want = model(x).logits
    n_params = sum(p.numel() for p in model.parameters())
    assert unprunable_in_blocks(model)  # 3-D expert tensors, not Linear: before the conversion they are left out
    assert as_linears(model) == 2
    got = model(x).logits
    if family == "gpt_oss":  # its eager loop computes x @ W + b, ours F.linear: the same sums, other rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert unprunable_in_blocks(model) == {}
    layers = prunable_layers(model)
    experts = [n for n in layers if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (gate_up, down)
    one = "model.layers.1.mlp.experts.2.down_proj"
    with torch.no_grad():
        layers[one].weight[0, :5] = 0
    with hf_layout(model):
        state = model.state_dict()
    fused_down = state["model.layers.1.mlp.experts.down_proj"]
    row = fused_down[2, :, 0] if family == "gpt_oss" else fused_down[2, 0]  # gpt-oss stores [E, in, out]
    assert (row[:5] == 0).all() and (row[5:] != 0).all()
    assert ".mlp.experts.2.down_proj.weight" not in "".join(state)  # transformers' own keys only


def _routed_reference(model, layer: int, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Slow reference: Σx² of the tokens the router of ``layer`` sends each expert, from the hidden states the
    dense model feeds that layer's MoE block (hooked input, the router's own top-k)."""
    moe = model.model.layers[layer].mlp
    seen: list[torch.Tensor] = []
    handle = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            model(w[None], use_cache=False)
    handle.remove()
    out: dict[int, torch.Tensor] = {}
    for h in seen:
        _, _, top = moe.gate(h)
        for e in range(4):
            rows = h[(top == e).any(-1)].double()
            out[e] = out.get(e, torch.zeros(h.shape[-1], dtype=torch.float64)) + (rows * rows).sum(0)
            out[f"n{e}"] = out.get(f"n{e}", 0) + rows.shape[0]
    return out


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it():
    from unipruning_cli.data.calibration import calibrate_blockwise
    from unipruning_cli.models.layouts import as_linears

    model = moe_model("mixtral")
    windows = torch.randint(0, 320, (3, 16))
    ref = _routed_reference(model, 1, windows)
    as_linears(model)
    stats = calibrate_blockwise(model, windows, min_expert_tokens=1)
    for e in range(4):
        s = stats[f"model.layers.1.mlp.experts.{e}.gate_up_proj"]
        assert s.count == ref[f"n{e}"] and s.own_count is None
        torch.testing.assert_close(s.sq_sum, ref[e], rtol=1e-6, atol=1e-9)
    total = sum(stats[f"model.layers.1.mlp.experts.{e}.down_proj"].count for e in range(4))
    assert total == 3 * 16 * 2  # every token to its top-2 experts


def test_an_expert_with_too_few_routed_tokens_gets_the_pooled_statistics_and_is_listed(caplog):
    from unipruning_cli.data.calibration import calibrate_blockwise
    from unipruning_cli.models.layouts import as_linears

    model = moe_model("mixtral")

    def never_expert_3(module, args, out):  # the router of layer 0, with expert 3's logit at -inf
        logits = out[0].clone()
        logits[:, 3] = -math.inf
        weights, index = torch.softmax(logits.float(), -1).topk(2, dim=-1)
        return logits, (weights / weights.sum(-1, keepdim=True)).to(out[1].dtype), index

    model.model.layers[0].mlp.gate.register_forward_hook(never_expert_3)
    as_linears(model)
    windows = torch.randint(0, 320, (3, 16))
    hessians = {}  # Hessians live until the block's callback (SparseGPT's solve)
    stats = calibrate_blockwise(model, windows, want_hessian=True, min_expert_tokens=1,
                                on_block=lambda i, layers, st: hessians.update({n: s.xtx for n, s in st.items()}))
    name = "model.layers.0.mlp.experts.{}.gate_up_proj"
    rare = stats[name.format(3)]
    assert rare.own_count == 0
    assert rare.count == sum(stats[name.format(e)].count for e in range(3)) == 3 * 16 * 2
    torch.testing.assert_close(rare.sq_sum, sum(stats[name.format(e)].sq_sum for e in range(3)))
    torch.testing.assert_close(hessians[name.format(3)], sum(hessians[name.format(e)] for e in range(3)))
    assert "model.layers.0.mlp.experts.3.gate_up_proj (0)" in caplog.text
    everyone = calibrate_blockwise(model, windows, min_expert_tokens=10**6)
    assert all(s.own_count is not None for n, s in everyone.items() if ".experts." in n)

    # the drift search's statistics of each step, by the same rule
    from unipruning_cli.models.layouts import expert_groups
    from unipruning_cli.models.loading import prunable_layers
    from unipruning_cli.search.recompute import StepStats

    hooks = StepStats(prunable_layers(model), expert_groups(model, ""), 1)
    with torch.no_grad():
        model(windows[:1], use_cache=False)
    step = hooks.take()
    hooks.remove()
    assert step[name.format(3)].own_count == 0 and step[name.format(3)].count == 16 * 2
    torch.testing.assert_close(step[name.format(3)].sq_sum, sum(step[name.format(e)].sq_sum for e in range(3)))


def _run(tmp_path, folder: Path, corpus_files, name: str, *extra: str) -> tuple[Path, dict]:
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.commands.prune import run_prune

    torch.set_num_threads(1)
    cfg = compose_prune([*tiny_overrides(folder, corpus_files), "calibration.min_expert_tokens=4", *extra])
    run_dir = tmp_path / name
    return run_dir, run_prune(cfg, run_dir)


def _expert_sparsity(metrics: dict, tag: str) -> float:
    per = metrics["results"][tag]["per_layer_sparsity"]
    experts = [v for n, v in per.items() if ".mlp.experts." in n]
    assert len(experts) == 16
    return sum(experts) / len(experts)


METHODS = {
    "wanda": ("method=local", "local_metric=wanda"),
    "sparsegpt": ("method=sparsegpt",),
    # per row: every expert matrix at exactly the target (OWL's layer budgets would move them)
    "uni_drift": ("method=unipruning", "schedule.steps=4", "export.patterns=[2:4]", "pattern.allocation=per_row"),
    "uni_frozen": ("method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3", "export.patterns=[2:4]",
                   "pattern.allocation=per_row"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_prunes_the_experts_of_a_tiny_mixtral(method, tmp_path, tiny_tokenizer, corpus_files):
    folder = moe_folder("mixtral", tiny_tokenizer, tmp_path)
    _, metrics = _run(tmp_path, folder, corpus_files, method, *METHODS[method], "eval.dense=false")
    assert metrics["coverage"]["dense_in_blocks"] == {}
    assert metrics["coverage"]["prunable_fraction"] > 0.8
    assert abs(_expert_sparsity(metrics, metrics["pattern"]) - 0.5) < 1e-6
    if method.startswith("uni"):
        per = metrics["results"]["2of4"]["per_layer_sparsity"]
        assert all(v == 0.5 for n, v in per.items() if ".mlp.experts." in n)
    for r in metrics["results"].values():
        assert all(math.isfinite(v["ppl"] if isinstance(v, dict) else v) for v in r["ppl"].values())


RELOAD = """
import json, math, sys
import torch
from transformers import AutoModelForCausalLM
from unipruning_cli.evaluation.perplexity import perplexity
spec = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(spec["folder"], experts_implementation="eager").eval()
zeros = {k: [int((p == 0).sum()), p.numel()] for k, p in model.state_dict().items()
         if ".mlp.experts." in k and p.dim() == 3}
ppl = perplexity(model, torch.tensor(spec["windows"]), spec["batch_size"], "reload").to_dict()["ppl"]
print(json.dumps({"ppl": ppl, "zeros": zeros}))
"""


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.e2e
def test_export_reloads_with_plain_transformers_at_the_runs_perplexity(family, tmp_path, tiny_tokenizer, corpus_files):
    """A UniPruning run on each tiny MoE layout, its 2:4 cut exported and reloaded in a fresh process by plain
    ``from_pretrained`` (transformers' eager experts, the loop the run computed with): the same perplexity, bit for
    bit, and half of every fused expert tensor zero."""
    import subprocess
    import sys

    from unipruning_cli.commands.export import export_command

    folder = moe_folder(family, tiny_tokenizer, tmp_path)
    run_dir, metrics = _run(tmp_path, folder, corpus_files, "run", *METHODS["uni_drift"], "eval.dense=false")
    assert abs(_expert_sparsity(metrics, "s0.50_per_row") - 0.5) < 1e-6
    out = tmp_path / "export"
    export_command([str(run_dir), "pattern=2:4", "--out", str(out)])
    windows, batch_size, corpus = eval_windows_of(run_dir)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"folder": str(out), "windows": windows.tolist(), "batch_size": batch_size}))
    (tmp_path / "reload.py").write_text(RELOAD)
    proc = subprocess.run([sys.executable, str(tmp_path / "reload.py"), str(spec)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["ppl"] == metrics["results"]["2of4"]["ppl"][corpus]
    assert len(got["zeros"]) == 4 and all(2 * z == n for z, n in got["zeros"].values()), got["zeros"]


def test_the_router_loss_enters_the_drift_loss_only_when_asked(tmp_path, tiny_tokenizer, corpus_files, no_weights_read):
    """``schedule.router_aux_loss=true``: the loss W drifts on is the LM loss plus the config's coefficient times the
    router's load-balancing loss (transformers' own); false (the default): the LM loss alone. Asked of a dense model,
    it is refused before any weight is read."""
    from unipruning_cli.models.layouts import as_linears
    from unipruning_cli.search.mirror_descent import _lm_backward
    from unipruning_cli.search.settings import SearchSettings

    model = moe_model("mixtral")
    as_linears(model)
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
    lm = float(out.loss) - model.config.router_aux_loss_coef * float(out.aux_loss)
    losses = {on: _lm_backward(model, x, 0, SearchSettings(router_aux_loss=on)) for on in (False, True)}
    assert math.isclose(losses[False], lm, rel_tol=1e-6) and math.isclose(losses[True], float(out.loss), rel_tol=1e-6)
    assert float(out.aux_loss) > 0

    from unipruning_cli.core.errors import UserError

    folder = save_model(tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "llama")
    with pytest.raises(UserError, match="schedule.router_aux_loss=true.*not a mixture of experts"):
        validate_overrides(folder, corpus_files, "method=unipruning", "schedule.router_aux_loss=true")


def test_a_compressed_nm_export_of_a_moe_model_rebuilds_its_weights(tmp_path, tiny_tokenizer, corpus_files):
    from transformers import AutoModelForCausalLM

    from unipruning_cli.commands.export import export_command
    from unipruning_cli.stages.export.nm import load_compressed

    folder = moe_folder("qwen3_moe", tiny_tokenizer, tmp_path)
    run_dir, _ = _run(tmp_path, folder, corpus_files, "run", *METHODS["uni_frozen"], "eval.dense=false")
    out = tmp_path / "export"
    export_command([str(run_dir), "pattern=2:4", "--compressed", "--out", str(out)])
    rebuilt = load_compressed(out).state_dict()
    plain = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert rebuilt.keys() == plain.keys()
    assert all(torch.equal(rebuilt[k], plain[k]) for k in plain)


@pytest.mark.slow
@pytest.mark.e2e
def test_two_ranks_give_the_single_process_gamma_and_masks_on_a_moe_model(tmp_path, tiny_tokenizer, corpus_files):
    """The drift search sharded by FSDP2 over 2 gloo ranks: each expert's Linear is sharded by rows like any other
    matrix, and Γ and the masks are the single process's."""

    folder = moe_folder("mixtral", tiny_tokenizer, tmp_path)
    single, sharded, t1, t2 = single_and_sharded(tmp_path, sharded_overrides(folder, corpus_files, "local_metric=ria"))
    print(f"mixtral: one process {t1:.1f} s, 2 ranks {t2:.1f} s")
    assert_same_run(single, sharded)



def _experts(family: str, dtype: torch.dtype):
    """The fused-experts module of layer 0 of a tiny random ``family`` model (4 experts, hidden 64), in ``dtype``,
    with transformers' eager loop, and its :class:`ExpertLinears` (views of the same tensors)."""
    from unipruning_cli.models.layouts import ExpertLinears

    model = moe_model(family).to(dtype)
    model.set_experts_implementation("eager")
    fused = model.model.layers[0].mlp.experts
    return fused, ExpertLinears(fused)


def _where_routes(top_k_index: torch.Tensor, n_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Slow reference: the routing of transformers' eager loop, one ``torch.where`` per hit expert of the one-hot
    ``[E + 1, k, T]`` mask, index E (dropped tokens) skipped."""
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    return [(e, *torch.where(mask[e])) for e in hit if e != n_experts]


def _where_loop(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Slow reference: ``ExpertLinears.forward`` as it was, the per-expert ``torch.where`` loop."""
    out = torch.zeros_like(hidden_states)
    for e, top_k_pos, token_idx in _where_routes(top_k_index, len(experts)):
        h = getattr(experts[e], experts.up_name)(hidden_states[token_idx])
        h = experts.fused_module._apply_gate(h) if experts.has_gate else experts.fused_module.act_fn(h)
        h = experts[e].down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def _routings(n_tokens: int = 40, k: int = 3, n_experts: int = 4) -> dict[str, torch.Tensor]:
    """Top-k indices ``int64 [T, k]``: distinct experts per token; experts 1 and 3 never hit; an expert hit from
    several slots, a token sent twice to one expert, and index E (a dropped token) in several slots."""
    gen = torch.Generator().manual_seed(1)
    distinct = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(n_tokens)])
    repeats = torch.randint(0, n_experts + 1, (n_tokens, k), generator=gen)  # duplicates in a row, and E
    repeats[0] = torch.tensor([2, 2, 2])
    repeats[1] = n_experts
    return {"distinct": distinct, "some_experts_idle": torch.where(distinct % 2 == 1, 0, distinct),
            "repeats_and_dropped": repeats, "all_dropped": torch.full((n_tokens, k), n_experts),
            "no_tokens": distinct[:0]}


def test_the_sorted_routing_visits_each_experts_tokens_in_the_order_of_torch_where():
    """``ExpertLinears.routes`` (one stable sort per layer) gives, expert by expert, the very (slot, token) lists
    that a ``torch.where`` per expert gives, in the same order: the order ``index_add_`` sums in."""
    _, experts = _experts("mixtral", torch.float32)
    for case, index in _routings().items():
        got = experts.routes(index)
        want = _where_routes(index, len(experts))
        assert [e for e, *_ in got] == [e for e, *_ in want], case
        for (_, pos, tok), (_, want_pos, want_tok) in zip(got, want):
            assert torch.equal(pos, want_pos) and torch.equal(tok, want_tok), case
    assert [e for e, *_ in experts.routes(_routings()["some_experts_idle"])] == [0, 2]
    assert experts.routes(_routings()["all_dropped"]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_the_sorted_expert_loop_is_the_torch_where_loop_bit_for_bit(family, dtype):
    """``ExpertLinears.forward`` equals, bit for bit, the per-expert ``torch.where`` loop it replaced, and
    transformers' own eager loop where that uses F.linear too (not gpt-oss: ``x @ W + b``), on routings with idle
    experts, repeated experts in one token's slots and dropped tokens (index E)."""
    fused, experts = _experts(family, dtype)
    gen = torch.Generator().manual_seed(2)
    for case, index in _routings().items():
        x = torch.randn(index.shape[0], 64, generator=gen).to(dtype)
        w = torch.rand(index.shape, generator=gen).to(dtype)
        with torch.no_grad():
            got = experts(x, index, w)
            assert torch.equal(got, _where_loop(experts, x, index, w)), case
            if family != "gpt_oss":
                assert torch.equal(got, fused(x, index, w)), case
        if case == "repeats_and_dropped":
            assert (got[1] == 0).all() and (got[0] != 0).any()  # token 1: every slot dropped; token 0: 3 x expert 2
