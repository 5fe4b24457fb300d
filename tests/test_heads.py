"""pattern=heads (issue 28): whole KV groups of attention heads (with their query heads) cut from per-weight scores,
against a slow reference; the sliced model against the masked one and a plain reload; a run exported as a standard
model with fewer heads at the run's perplexity."""

from __future__ import annotations

import pytest
import torch

from _helpers import build_tiny_model, eval_windows_of, tiny_overrides, validate_overrides
from unipruning_cli.core.errors import UserError
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.pruning.heads import attention_heads, group_scores, head_masks, heads_of_masks, slice_heads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 320


def test_group_scores_and_the_cut_match_a_loop_over_heads():
    """4 query heads of size 3 over 2 KV groups (GQA, 2 query heads per group): group g is rows 6g..6g+5 of q,
    rows 3g..3g+2 of k and v, columns 6g..6g+5 of o."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.q_proj": (12, 8), "a.k_proj": (6, 8), "a.v_proj": (6, 8), "a.o_proj": (8, 12), "a.up_proj": (5, 8)}
    scores = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    (att,) = attention_heads({n: s for n, s in shapes.items() if n != "a.up_proj"}, 4, 2)
    slow = []
    for grp in range(2):
        total = sum(float(scores["a.q_proj"][r, c]) for r in range(6 * grp, 6 * grp + 6) for c in range(8))
        total += sum(float(scores[m][r, c]) for m in ("a.k_proj", "a.v_proj") for r in range(3 * grp, 3 * grp + 3)
                     for c in range(8))
        total += sum(float(scores["a.o_proj"][r, c]) for r in range(8) for c in range(6 * grp, 6 * grp + 6))
        slow.append(total)
    assert torch.allclose(group_scores(att, scores), torch.tensor(slow, dtype=torch.float64))
    masks = head_masks(scores, 0.5, 4, 2)
    assert set(masks) == {"a.q_proj", "a.k_proj", "a.v_proj", "a.o_proj"}  # the MLP's scores are never read
    keep = torch.tensor(slow).argmax()
    assert masks["a.k_proj"][3 * keep: 3 * keep + 3].all() and int(masks["a.k_proj"].sum()) == 3 * 8
    assert masks["a.o_proj"][:, 6 * keep: 6 * keep + 6].all() and int(masks["a.o_proj"].sum()) == 8 * 6
    assert torch.equal(heads_of_masks(masks, att), torch.arange(2) == keep)
    broken = dict(masks, **{"a.q_proj": masks["a.q_proj"].clone()})
    broken["a.q_proj"][0, 0] = ~broken["a.q_proj"][0, 0]
    with pytest.raises(ValueError, match="not whole KV groups"):
        heads_of_masks(broken, att)
    with pytest.raises(UserError, match="not 4 query and 2 KV heads"):
        attention_heads({"a.q_proj": (12, 8), "a.k_proj": (5, 8), "a.v_proj": (6, 8), "a.o_proj": (8, 12)}, 4, 2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_a_sliced_model_computes_what_the_masked_one_does_and_reloads_standard(arch, tmp_path):
    """One of two KV groups removed in every layer: the masked model (its heads' o_proj columns zero) and the sliced
    one compute the same logits; the sliced one saves and reloads with plain transformers, with fewer heads in its
    config and the same head_dim (Qwen2's q/k/v biases sliced with their rows)."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.pruning.weights import apply_masks

    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = build_tiny_model(arch, VOCAB) if arch != "gemma" else GemmaForCausalLM(GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24)).eval()  # a head_dim that is not hidden / heads: written out, kept
    layers = prunable_layers(model)
    config = model.config
    scores = {n: torch.rand(m.weight.shape) for n, m in layers.items()}
    masks = head_masks(scores, 0.5, config.num_attention_heads, config.num_key_value_heads)
    tokens = torch.randint(0, VOCAB, (1, 12))
    apply_masks(layers, masks)
    with torch.no_grad():
        masked = model(tokens).logits
    head_dim = model.model.layers[0].self_attn.head_dim
    structure = slice_heads(model, masks)
    assert structure["kv_heads"] == (2, 1) and structure["heads"] == (4, 2)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, masked, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (again.config.num_attention_heads, again.config.num_key_value_heads) == (2, 1)
    assert again.model.layers[0].self_attn.head_dim == head_dim
    assert again.model.layers[0].self_attn.k_proj.weight.shape[0] == head_dim
    with torch.no_grad():
        assert torch.allclose(again(tokens).logits, masked, atol=1e-5)


def test_heads_are_refused_where_the_family_or_the_options_cannot_take_them(tiny_llama_dir, corpus_files):
    for extra, match in [(["pattern=heads", "sparsity=0.9"], "all 2 KV heads"),
                         (["pattern=heads", "sparsity=0.2"], "removes none"),
                         (["pattern.channel_score=flap"], "not read with pattern=unstructured"),
                         (["pattern=heads", "reconstruct=bias"], "pattern=channels"),
                         (["pattern=heads", "method=sparsegpt"], "whole heads"),
                         (["pattern=heads", "method=unipruning", "refine=swap"], "whole heads")]:
        with pytest.raises(UserError, match=match):
            validate_overrides(tiny_llama_dir, corpus_files, *extra)


@pytest.mark.e2e
def test_a_heads_run_exports_a_model_with_fewer_heads_at_the_runs_perplexity(tmp_path, tiny_llama_dir, corpus_files,
                                                                             monkeypatch):
    """Γ cut into KV groups (FLAP's and Wanda-sp's beside it), with reconstruct=ls: the export is a standard folder
    with half the heads that plain from_pretrained loads at the perplexity and parameter count the run measured."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.commands.prune import run_prune
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.stages.export.apply import export_run

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    run = tmp_path / "run"
    cfg = compose_prune([*base, "method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3",
                         "pattern=heads", "sparsity=0.5", "eval.baselines=[wanda@one_shot]", "eval.dense=false",
                         "reconstruct=ls"])
    metrics = run_prune(cfg, run)
    tag = "s0.50_heads"
    assert set(metrics["results"]) == {tag, "s0.50_heads-flap", f"wanda@one_shot:{tag}"}
    assert metrics["results"][tag]["reconstruction"]["error_ratio"] < 1
    export_run(run, out=tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 1)
    windows, batch_size, corpus = eval_windows_of(run)
    got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
    assert got == pytest.approx(metrics["results"][tag]["ppl"][corpus], rel=1e-5)
    assert metrics["results"][tag]["structure"]["parameters"][1] == sum(p.numel() for p in reloaded.parameters())
    # the plan's count of the export, from the shapes alone (unipruning plan)
    from unipruning_cli.stages.plan.structural import exported_model

    assert exported_model(cfg, torch.float32)["parameters"] == metrics["results"][tag]["structure"]["parameters"]
    assert "| 50% of heads |" in (run / "summary.md").read_text()


def test_a_family_with_per_head_tensors_beside_the_projections_is_refused():
    """gpt-oss holds one attention sink per query head (``sinks [H]``): slicing q/k/v/o alone would leave it at the
    old head count and the export would not reload, so the heads cut is refused (on the meta device, before any
    weight is read), naming the tensor."""
    from _helpers import moe_config
    from transformers import AutoModelForCausalLM

    from unipruning_cli.models.layouts import as_linears
    from unipruning_cli.pruning.heads import check_heads_fit

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(moe_config("gpt_oss", VOCAB))
    as_linears(model)
    with pytest.raises(UserError, match="sinks"):
        check_heads_fit(model, prunable_layers(model), 1)
