"""Every dense model family the README lists, end to end on a tiny random model of its transformers config: the
decoder blocks found by role, every projection prunable (HF Conv1D included), nothing left dense, each matrix at
the asked sparsity, and the export reloading with plain transformers at the run's perplexity. The mixture-of-experts
families are in tests/test_moe.py."""

from __future__ import annotations

import pytest
import torch

from _helpers import eval_windows_of, tiny_overrides

#: model_type -> the fields its tiny config needs beyond the common ones (README "Model families").
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "gemma2": dict(num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16),
    "phi3": dict(num_key_value_heads=2, pad_token_id=0),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2),
    "gpt_neox": {},
    "falcon": {},
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": {},  # HF Conv1D projections, stored [in, out]
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_prunes_every_projection_and_its_export_reloads_at_the_runs_perplexity(
        family, tmp_path, tiny_tokenizer, corpus_files):
    from transformers import AutoConfig, AutoModelForCausalLM

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.evaluation.perplexity import perplexity
    from unipruning_cli.commands.export import export_command
    from unipruning_cli.commands.prune import run_prune

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = AutoConfig.for_model(family, vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                  **FAMILIES[family])
    folder = tmp_path / family
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    run_dir = tmp_path / "run"
    metrics = run_prune(compose_prune([*tiny_overrides(folder, corpus_files), "eval.dense=false"]), run_dir)

    assert metrics["coverage"]["dense_in_blocks"] == {}
    per = metrics["results"]["s0.50_per_row"]["per_layer_sparsity"]
    assert len(per) >= 8 and set(per.values()) == {0.5}, per
    out = tmp_path / "export"
    export_command([str(run_dir), "--out", str(out)])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(AutoModelForCausalLM.from_config(config)).__name__
    windows, batch_size, corpus = eval_windows_of(run_dir)
    got = perplexity(reloaded, windows, batch_size, "reload").to_dict()["ppl"]
    assert got == metrics["results"]["s0.50_per_row"]["ppl"][corpus]
