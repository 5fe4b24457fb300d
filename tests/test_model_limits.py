"""What a model's architecture allows, refused before any weight is read (issue: every model family): windows past
its position limit (learned positions never; RoPE without scaling only when asked), N:M patterns its matrices
cannot take."""

from __future__ import annotations

import pytest

from _helpers import save_model, tiny_llama, tiny_overrides, validate_overrides
from unipruning_cli.core.errors import UserError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test here keeps its caches (dense results, statistics) under its own tmp_path."""
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))


def test_a_window_past_a_learned_position_table_is_refused_before_loading(tmp_path, tiny_tokenizer, corpus_files,
                                                                          no_weights_read):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, word_embed_proj_dim=32)
    folder = save_model(OPTForCausalLM(config), tiny_tokenizer, tmp_path / "opt")
    with pytest.raises(UserError, match=r"calibration\.seqlen=32 is longer than the 16 positions.*learned"):
        validate_overrides(folder, corpus_files)  # tiny_overrides: model.seqlen=32
    with pytest.raises(UserError, match="learned"):  # no way around a learned table
        validate_overrides(folder, corpus_files, "model.allow_long_context=true")
    validate_overrides(folder, corpus_files, "model.seqlen=16")


def test_a_rope_model_past_its_trained_length_needs_to_be_asked(tmp_path, tiny_tokenizer, corpus_files, caplog,
                                                                no_weights_read):
    model = tiny_llama(tiny_tokenizer, hidden_size=32, intermediate_size=64, max_position_embeddings=16)
    folder = save_model(model, tiny_tokenizer, tmp_path / "llama16")
    with pytest.raises(UserError, match=r"model\.allow_long_context=true"):
        validate_overrides(folder, corpus_files)
    validate_overrides(folder, corpus_files, "model.allow_long_context=true")
    assert "past the trained length" in caplog.text
    validate_overrides(folder, corpus_files, "model.seqlen=16", "eval.seqlen=8")


@pytest.mark.parametrize("extra", [["pattern=4:8"], ["method=unipruning", "export.patterns=[4:8]"]])
def test_an_nm_pattern_a_matrix_cannot_take_is_refused_before_loading(extra, tmp_path, tiny_tokenizer, corpus_files,
                                                                      no_weights_read):
    model = tiny_llama(tiny_tokenizer, hidden_size=32, intermediate_size=100, max_position_embeddings=64)
    folder = save_model(model, tiny_tokenizer, tmp_path / "llama100")
    base = [e for e in extra if e.startswith("method=")]
    with pytest.raises(UserError, match=r"4:8.*model\.layers\.0\.mlp\.down_proj \(in=100\)"):
        validate_overrides(folder, corpus_files, *extra, *(["local_metric=stochria"] if base else []))
    validate_overrides(folder, corpus_files, "pattern=2:4")  # 100 is a multiple of 4


def test_a_float16_overflow_stops_the_run_at_the_first_non_finite_module_and_caches_nothing(tmp_path, tiny_tokenizer,
                                                                                            corpus_files):
    import torch

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.commands.prune import run_prune

    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer, hidden_size=64, intermediate_size=128, max_position_embeddings=64)
    with torch.no_grad():  # the first MLP's product silu(gate)·up far above float16's 65504
        model.model.layers[0].mlp.gate_proj.weight.mul_(2e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(2e5)
    folder = save_model(model.to(torch.float16), tiny_tokenizer, tmp_path / "fp16")
    cfg = compose_prune([*tiny_overrides(folder, corpus_files), "model.dtype=float16"])
    validate(cfg)
    with pytest.raises(UserError, match=r"not finite.*float16.*model\.layers\.0\.mlp.*model\.dtype=bfloat16"):
        run_prune(cfg, tmp_path / "run")
    assert not list((tmp_path / "cache").rglob("dense/*.json"))  # a NaN is never cached as the dense result
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_activation_statistics_with_inf_are_refused_like_nan_ones():
    import torch

    from unipruning_cli.metrics import build_metric
    from unipruning_cli.data.stats import ActivationStats

    weight = torch.rand(4, 8)
    for name in ("wanda", "ria", "stochria"):
        for bad in (float("nan"), float("inf")):
            sq = torch.rand(8, dtype=torch.float64)
            sq[3] = bad
            with pytest.raises(ValueError, match=f"local metric '{name}': activation statistics hold (NaN|inf)"):
                build_metric(name).score(weight, ActivationStats(sq_sum=sq, count=10))


def test_a_global_cut_caps_each_matrix_and_still_hits_the_budget_and_nests():
    import torch

    from unipruning_cli.pruning.masks import global_masks, num_pruned

    g = torch.Generator().manual_seed(0)
    scores = {"tiny_v_proj": torch.rand(8, 64, generator=g) * 1e-6, "a": torch.rand(32, 64, generator=g),
              "b": torch.rand(16, 64, generator=g) + 0.5}
    total = sum(s.numel() for s in scores.values())
    uncapped = global_masks(scores, 0.5)
    assert int(uncapped["tiny_v_proj"].sum()) == 0  # without a cap the whole matrix goes
    previous = None
    for sparsity in (0.3, 0.4, 0.5, 0.6):
        capped: list[str] = []
        masks = global_masks(scores, sparsity, cap=0.99, capped=capped)
        pruned = {n: m.numel() - int(m.sum()) for n, m in masks.items()}
        assert sum(pruned.values()) == num_pruned(total, sparsity)  # the budget, exactly
        assert all(pruned[n] <= num_pruned(scores[n].numel(), 0.99) for n in scores)
        assert capped == ["tiny_v_proj"]
        # the capped matrix keeps its best entries: the same as cutting it alone at the cap
        assert int(masks["tiny_v_proj"].sum()) == 512 - num_pruned(512, 0.99)
        if previous is not None:  # nested: every weight kept at a higher sparsity was kept at a lower one
            assert all(bool((masks[n] & ~previous[n]).sum() == 0) for n in scores)
        previous = masks
    with pytest.raises(ValueError, match="cap of 0.5"):
        global_masks(scores, 0.6, cap=0.5)


def test_a_global_run_lists_its_capped_matrix_in_metrics(tmp_path, tiny_tokenizer, corpus_files):
    import json

    import torch

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.commands.prune import run_prune

    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer, hidden_size=64, intermediate_size=128, max_position_embeddings=64)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(1e-6)  # the smallest magnitudes of the model, by far
    folder = save_model(model, tiny_tokenizer, tmp_path / "tinyv")
    cfg = compose_prune([*tiny_overrides(folder, corpus_files), "local_metric=magnitude", "pattern.allocation=global",
                         "sparsity=0.6", "eval.dense=false"])
    validate(cfg)
    metrics = run_prune(cfg, tmp_path / "run")
    v = "model.layers.1.self_attn.v_proj"
    assert metrics["matrices_at_cap"] == {"cap": 0.99, "names": [v]}
    from unipruning_cli.pruning.masks import num_pruned

    n = 32 * 64  # v_proj: 2 kv heads x 16 x hidden 64; cut at the cap, num_pruned's nearest count
    assert round(metrics["results"]["s0.60_global"]["per_layer_sparsity"][v] * n) == num_pruned(n, 0.99) < n
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["matrices_at_cap"]["names"] == [v]


def _bos_tokenizer(tiny_tokenizer, adds_bos: bool, has_bos: bool = True):
    """The tiny tokenizer as one that puts BOS first when it encodes (Llama, Gemma) or not (GPT-2, Qwen)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    if not has_bos:
        tok.bos_token = None
    return tok


def test_bos_follows_the_tokenizer_in_calibration_search_and_evaluation(tmp_path, tiny_tokenizer, corpus_files):
    from _helpers import build_tiny_model
    from unipruning_cli.data.calibration_set import calibration_set
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.evaluation import eval_windows_of

    for adds in (True, False):
        tok = _bos_tokenizer(tiny_tokenizer, adds)
        folder = save_model(build_tiny_model("llama", len(tok)), tok, tmp_path / f"bos{adds}")
        cfg = compose_prune([*tiny_overrides(folder, corpus_files), "method=unipruning"])  # model.add_bos: auto
        samples, info = calibration_set(cfg, tok)  # the drift search's batches are these samples
        windows = next(iter(eval_windows_of(cfg, tok).values()))
        bos = tok.bos_token_id
        assert info["bos"] is adds
        assert all((int(r[0]) == bos) is adds for r in samples)
        assert bool((windows[:, 0] == bos).all()) is adds
        forced = compose_prune([*tiny_overrides(folder, corpus_files), "model.add_bos=true"])
        assert bool((next(iter(eval_windows_of(forced, tok).values()))[:, 0] == bos).all())


def test_add_bos_true_without_a_bos_token_is_refused_before_loading(tmp_path, tiny_tokenizer, corpus_files,
                                                                    no_weights_read):
    from _helpers import build_tiny_model

    tok = _bos_tokenizer(tiny_tokenizer, adds_bos=False, has_bos=False)
    folder = save_model(build_tiny_model("llama", len(tiny_tokenizer)), tok, tmp_path / "nobos")
    with pytest.raises(UserError, match="model.add_bos=true, but the tokenizer .* has no BOS token"):
        validate_overrides(folder, corpus_files, "model.add_bos=true")
    validate_overrides(folder, corpus_files)  # auto: no BOS, no error


def test_expert_tensors_left_dense_are_said_loudly_and_recorded(tmp_path, tiny_tokenizer, corpus_files, caplog,
                                                                monkeypatch):
    """Mixtral's experts are 3-D parameters in transformers 5 (75 % of this model's weights). They are pruned as one
    Linear per expert (tests/test_moe.py); a layout that cannot be taken apart (here: the conversion switched off, as
    for experts with a norm after each one) stays dense, and the run says so and records how much it could prune."""
    import torch

    import unipruning_cli.models.layouts as layouts

    monkeypatch.setattr(layouts, "_LAYOUTS", ())
    from transformers import MixtralConfig, MixtralForCausalLM

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.commands.prune import run_prune

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    folder = save_model(MixtralForCausalLM(config), tiny_tokenizer, tmp_path / "mixtral")
    cfg = compose_prune([*tiny_overrides(folder, corpus_files), "eval.dense=false"])
    metrics = run_prune(cfg, tmp_path / "run")
    dense = metrics["coverage"]["dense_in_blocks"]
    assert sorted(dense) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    assert metrics["coverage"]["prunable_fraction"] < 0.2
    assert "stay DENSE" in caplog.text


def test_decoder_blocks_are_found_by_role_not_as_the_longest_list():
    """A remote-code MoE layout: 2 decoder layers, each with a list of 8 experts. The longest list is the experts
    of layer 0; the blocks are the list of config.num_hidden_layers decoder layers."""
    from types import SimpleNamespace

    from torch import nn

    from unipruning_cli.models.loading import find_blocks, prunable_layers

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    class DecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.experts = nn.ModuleList(Expert() for _ in range(8))

    class Model(nn.Module):
        _no_split_modules = ["DecoderLayer"]

        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2)
            self.layers = nn.ModuleList(DecoderLayer() for _ in range(2))

    model = Model()
    assert find_blocks(model)[0] == "layers"
    layers = prunable_layers(model)
    assert len(layers) == 2 * (1 + 8 * 2)  # every Linear of both layers, every expert's
    assert "layers.1.experts.7.down" in layers


@pytest.mark.parametrize("key", ["calibration.source", "eval.corpora"])
def test_a_corpus_shorter_than_one_window_is_refused_before_loading(key, tmp_path, tiny_llama_dir, corpus_files,
                                                                    no_weights_read):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")  # 16 bytes, at most 17 tokens: no window of 32
    value = str(short) if key == "calibration.source" else f"[{short}]"
    with pytest.raises(UserError, match=rf"{key}: .*short.txt holds 16 bytes, fewer than the \d+ tokens of one window"):
        validate_overrides(tiny_llama_dir, corpus_files, f"{key}={value}")


def test_lm_eval_requests_longer_than_max_length_are_refused_before_loading(tiny_llama_dir, corpus_files, monkeypatch,
                                                                            no_weights_read):
    """HFLM cuts a request longer than its max_length from the left, silently: the offline tasks' requests are
    counted with the model's tokenizer before any weight is read, and a max_length that would cut one is refused."""
    from _helpers import REAL_CACHE
    from unipruning_cli.evaluation.zeroshot import request_lengths

    if not (REAL_CACHE / "tasks" / "quartz_offline.yaml").exists():
        pytest.skip("the offline tasks are not prepared (unipruning prepare)")
    monkeypatch.setenv("UNIPRUNING_CACHE", str(REAL_CACHE))  # read only: validate() writes nothing
    from transformers import AutoTokenizer

    lengths = request_lengths(AutoTokenizer.from_pretrained(tiny_llama_dir), ["quartz_offline"], 20)["quartz_offline"]
    longest = max(lengths)
    with pytest.raises(UserError, match=rf"eval.max_length={longest - 1}: .*quartz_offline: \d+ of {len(lengths)} "
                                        rf"requests, the longest {longest} tokens"):
        validate_overrides(tiny_llama_dir, corpus_files, "eval.tasks=[quartz_offline]", "eval.task_limit=20",
                  f"eval.max_length={longest - 1}", "model.seqlen=256")
    validate_overrides(tiny_llama_dir, corpus_files, "eval.tasks=[quartz_offline]", "eval.task_limit=20",
              f"eval.max_length={longest}", "model.seqlen=256")


def test_a_dtype_or_device_this_machine_lacks_is_refused_before_loading(tiny_llama_dir, corpus_files, monkeypatch,
                                                                         no_weights_read):
    import torch

    with pytest.raises(UserError, match="model.device='cuda' but no CUDA device"):
        validate_overrides(tiny_llama_dir, corpus_files, "model.device=cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a pre-Ampere GPU: no bf16 arithmetic
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(UserError, match="model.dtype=bfloat16, but Tesla V100 has no bfloat16 arithmetic.*float16"):
        validate_overrides(tiny_llama_dir, corpus_files, "model.device=cuda", "model.dtype=bfloat16")


def test_a_corpus_with_enough_bytes_but_too_few_tokens_is_refused_before_loading(tmp_path, tiny_llama_dir,
                                                                                  corpus_files, no_weights_read):
    """The byte count lets a short corpus of long words through; its tokens, counted with the model's tokenizer
    before any weight is read, do not."""
    short = tmp_path / "short.txt"
    short.write_text("the " * 12)  # 48 bytes: more than the 33 a window needs, but 12 tokens
    with pytest.raises(UserError, match="fewer than one window of 32"):
        validate_overrides(tiny_llama_dir, corpus_files, f"calibration.source={short}", "calibration.sampling=stream")
    with pytest.raises(UserError, match="eval.corpora: .*fewer than one window of 32"):
        validate_overrides(tiny_llama_dir, corpus_files, f"eval.corpora=[{short}]")


def test_calibration_windows_that_overlap_the_whole_corpus_are_warned_about(tiny_llama_dir, corpus_files, caplog):
    validate_overrides(tiny_llama_dir, corpus_files, "calibration.sampling=stream", "calibration.nsamples=4096")
    assert "calibration: 4096 windows of 32 tokens" in caplog.text and "they overlap" in caplog.text
