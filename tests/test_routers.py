"""Routers and gates of a mixture of experts are never pruned, whatever their class or attribute name, and experts
held as a list of Linear modules pool the statistics of a rarely routed expert as fused experts do (issue 26).
Tiny random models on the CPU: Qwen2-MoE from its transformers config, and a remote-code-like MoE (a Linear router
under an unusual name, a ``ModuleList`` of Linear experts) put into a tiny Llama."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from _helpers import moe_folder, moe_model, tiny_overrides

E, TOP_K = 4, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))


def never_expert_3(module, args, out):
    """A router forward hook: expert 3's logit is -inf, so the router never picks it."""
    out = out.clone()
    out[..., 3] = -math.inf
    return out


class _Expert(nn.Module):
    """A SwiGLU expert whose three Linears carry the names ``names`` (gate, up, down)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int) -> None:
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, name, nn.Linear(i, o, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(nn.functional.silu(gate(x)) * up(x))


class _ListMoE(nn.Module):
    """A remote-code MoE layout: the router a Linear called ``dispatch``, the experts an ``nn.ModuleList``."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.dispatch = nn.Linear(hidden, E, bias=False)
        self.experts = nn.ModuleList(_Expert(names, hidden, inter) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = torch.softmax(self.dispatch(flat).float(), -1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if len(token):
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None].to(flat.dtype))
        return out.reshape(x.shape)


def _list_moe(names=("gate_proj", "up_proj", "down_proj")):
    """A tiny Llama whose MLPs are :class:`_ListMoE`, its config naming the expert count as a remote-code one does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_local_experts=E)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.mlp = _ListMoE(64, 32, names)
    return model.requires_grad_(False)


def _sparsegpt_on_block(seen: dict):
    """A block callback that prunes each block with SparseGPT at 50 % (weights updated in place, as in a run) and
    records the layers it was handed."""
    from unipruning_cli.pruning.blockwise import SparseGPTPruning
    from unipruning_cli.pruning.targets import Target
    from unipruning_cli.pruning.weights import apply_masks

    method = SparseGPTPruning()

    def on_block(i, layers, stats):
        seen.update(layers)
        masks = method.prune_block(layers, stats, Target(sparsity=0.5, allocation="per_row"))
        if not method.updates_weights:
            apply_masks(layers, masks)

    return on_block


def test_qwen2_moe_shared_expert_gate_is_no_prunable_layer_and_is_listed_as_a_router():
    from unipruning_cli.models.layouts import as_linears
    from unipruning_cli.models.loading import prunable_layers, report_unprunable

    model = moe_model("qwen2_moe")
    as_linears(model)
    layers = prunable_layers(model)
    for i in range(2):
        assert f"model.layers.{i}.mlp.shared_expert_gate" not in layers
        assert {f"model.layers.{i}.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= set(layers)
        assert sum(f"model.layers.{i}.mlp.experts." in n for n in layers) == E * 2
    coverage = report_unprunable(model, layers)
    routers = [f"model.layers.{i}.mlp.{r}" for i in range(2) for r in ("shared_expert_gate", "gate")]
    assert coverage["routers"] == routers  # the Linear gate, and transformers' TopKRouter (a weight of its own)
    assert coverage["dense_in_blocks"] == {}


def test_a_prune_run_leaves_qwen2_moe_shared_expert_gate_bit_for_bit_dense(tmp_path, tiny_tokenizer, corpus_files):
    """A Wanda run at 50 % on a tiny Qwen2-MoE, exported and reloaded with plain transformers: every expert and
    projection cut, the shared expert's gate (Linear hidden -> 1) the dense model's, bit for bit, and listed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.commands.export import export_command
    from unipruning_cli.commands.prune import run_prune

    folder = moe_folder("qwen2_moe", tiny_tokenizer, tmp_path)
    run_dir = tmp_path / "run"
    metrics = run_prune(compose_prune([*tiny_overrides(folder, corpus_files), "eval.dense=false"]), run_dir)
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
    out = tmp_path / "export"
    export_command([str(run_dir), "--out", str(out)])
    dense = load_file(str(folder / "model.safetensors"))
    pruned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for gate in gates:
        assert torch.equal(pruned[f"{gate}.weight"], dense[f"{gate}.weight"])
    down = "model.layers.0.mlp.shared_expert.down_proj.weight"
    assert (pruned[down] == 0).float().mean() == 0.5  # the projection beside it is cut
    per = metrics["results"]["s0.50_per_row"]["per_layer_sparsity"]
    assert not set(gates) & set(per) and set(per.values()) == {0.5}
    assert set(gates) <= set(metrics["coverage"]["routers"])

    # the memory plan counts, on the meta device, the weights the run pruned
    from unipruning_cli.commands.plan import plan_command

    plan_command([*tiny_overrides(folder, corpus_files), "--json", str(tmp_path / "plan.json")])
    planned = json.loads((tmp_path / "plan.json").read_text())["prunable_weights"]
    assert planned == sum(pruned[f"{n}.weight"].numel() for n in per if ".experts." not in n) + sum(
        pruned[k].numel() for k in pruned if ".mlp.experts." in k and k.endswith("_proj"))


def test_a_linear_router_under_any_name_stays_dense_when_its_block_is_pruned():
    """The router of a remote-code MoE is an ``nn.Linear`` hidden -> experts called ``dispatch``: found by its width,
    it is no prunable layer, SparseGPT (which rewrites every weight it is handed) leaves it bit for bit, and the
    coverage lists it."""
    from unipruning_cli.data.calibration import calibrate_blockwise
    from unipruning_cli.models.loading import prunable_layers, report_unprunable

    model = _list_moe()
    layers = prunable_layers(model)
    routers = [f"model.layers.{i}.mlp.dispatch" for i in range(2)]
    assert not set(routers) & set(layers)
    assert len(layers) == 2 * (4 + E * 3)  # attention, and every expert's three projections
    assert report_unprunable(model, layers)["routers"] == routers
    before = {n: model.get_submodule(n).weight.clone() for n in routers}
    experts_before = model.model.layers[0].mlp.experts[0].down_proj.weight.clone()
    seen: dict = {}
    calibrate_blockwise(model, torch.randint(0, 320, (3, 16)), want_hessian=True, on_block=_sparsegpt_on_block(seen))
    assert set(seen) == set(layers)
    for n in routers:
        assert torch.equal(model.get_submodule(n).weight, before[n])
    assert not torch.equal(model.model.layers[0].mlp.experts[0].down_proj.weight, experts_before)


def test_a_dense_llama_keeps_every_projection_prunable_even_one_of_width_one():
    """No experts in the config: no routers. All seven projections of each block are prunable, and so is a Linear
    hidden -> 1 put into a block (a router only where there are experts to route to)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from unipruning_cli.models.loading import prunable_layers, report_unprunable

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.model.layers[1].mlp.score = nn.Linear(64, 1, bias=False)
    layers = prunable_layers(model)
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert set(layers) == {f"model.layers.{i}.{p}" for i in range(2) for p in projections} | {
        "model.layers.1.mlp.score"}
    assert report_unprunable(model, layers)["routers"] == []


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_a_list_of_linear_experts_pools_a_rarely_routed_experts_statistics(names, caplog):
    """Layer 0's router never picks expert 3: in calibration it gets the pooled statistics of its projection over
    the layer's experts (Σx², token count and XᵀX summed by hand over experts 0-2), with the log line fused experts
    get; the drift search's step statistics pool by the same groups."""
    from unipruning_cli.data.calibration import calibrate_blockwise

    model = _list_moe(names)

    model.model.layers[0].mlp.dispatch.register_forward_hook(never_expert_3)
    windows = torch.randint(0, 320, (3, 16))
    hessians = {}
    with caplog.at_level(logging.WARNING):
        stats = calibrate_blockwise(model, windows, want_hessian=True, min_expert_tokens=1,
                                    on_block=lambda i, layers, st: hessians.update({n: s.xtx for n, s in st.items()}))
    for proj in names:
        name = f"model.layers.0.mlp.experts.{{}}.{proj}"
        rare, others = stats[name.format(3)], [stats[name.format(e)] for e in range(3)]
        assert rare.own_count == 0
        assert rare.count == sum(s.count for s in others) == 3 * 16 * TOP_K
        torch.testing.assert_close(rare.sq_sum, sum(s.sq_sum for s in others))
        torch.testing.assert_close(hessians[name.format(3)], sum(hessians[name.format(e)] for e in range(3)))
        assert all(s.own_count is None for s in others)
    assert f"model.layers.0.mlp.experts.3.{names[0]} (0)" in caplog.text
    assert "calibration.min_expert_tokens=1" in caplog.text
    assert all(s.own_count is None for n, s in stats.items() if n.startswith("model.layers.1."))  # all routed there

    from unipruning_cli.models.loading import model_expert_groups, prunable_layers
    from unipruning_cli.search.recompute import StepStats

    groups = model_expert_groups(model)
    assert len(groups) == 2 * 3 and [f"model.layers.0.mlp.experts.{e}.{names[0]}" for e in range(E)] in groups
    hooks = StepStats(prunable_layers(model), groups, 1)
    with torch.no_grad():
        model(windows[:1], use_cache=False)
    step = hooks.take()
    hooks.remove()
    rare = step[f"model.layers.0.mlp.experts.3.{names[1]}"]
    assert rare.own_count == 0 and rare.count == 16 * TOP_K


class _LinearListMoE(nn.Module):
    """Experts held as ``nn.ModuleList`` s of plain Linears, one list per projection (``w1``, ``w2``)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, E, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(hidden, inter, bias=False) for _ in range(E))
        self.w2 = nn.ModuleList(nn.Linear(inter, hidden, bias=False) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = torch.softmax(self.router(flat).float(), -1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(E):
            token, slot = torch.where(index == e)
            if len(token):
                h = self.w2[e](nn.functional.silu(self.w1[e](flat[token])))
                out.index_add_(0, token, h * weights[token, slot, None].to(flat.dtype))
        return out.reshape(x.shape)


def test_lists_of_plain_linear_experts_pool_by_their_own_names():
    """``nn.ModuleList(nn.Linear ...)`` per projection: groups named ``<list>.<e>`` (no trailing dot), calibration
    runs and pools a never-routed expert."""
    from unipruning_cli.data.calibration import calibrate_blockwise
    from unipruning_cli.models.loading import model_expert_groups, prunable_layers

    model = _list_moe()
    for layer in model.model.layers:
        layer.mlp = _LinearListMoE(64, 32)

    model.model.layers[0].mlp.router.register_forward_hook(never_expert_3)
    groups = model_expert_groups(model)
    assert [f"model.layers.0.mlp.w1.{e}" for e in range(E)] in groups
    assert all(n in prunable_layers(model) for g in groups for n in g)
    stats = calibrate_blockwise(model, torch.randint(0, 320, (2, 16)), min_expert_tokens=1)
    rare, others = stats["model.layers.0.mlp.w2.3"], [stats[f"model.layers.0.mlp.w2.{e}"] for e in range(3)]
    assert rare.own_count == 0 and rare.count == sum(s.count for s in others)
