"""Finding decoder blocks and prunable layers by structure, across model families."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unipruning_cli.models.layouts import expert_counts
from unipruning_cli.models.loading import block_layers, find_blocks, prunable_layers


pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _expected_names(n_layers: int, projections=LLAMA_PROJ) -> set[str]:
    return {f"model.layers.{i}.{p}" for i in range(n_layers) for p in projections}


def _check_llama_like(model, n_layers: int, projections=LLAMA_PROJ):
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers"
    assert blocks is model.model.layers
    assert len(blocks) == n_layers

    layers = prunable_layers(model)
    assert set(layers) == _expected_names(n_layers, projections)
    assert len(layers) == len(projections) * n_layers
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        assert isinstance(layer, nn.Linear)
        assert layer is modules[name]  # the live module, not a copy
    # block order: all of block 0 before block 1, ...
    order = [int(n.split(".")[2]) for n in layers]
    assert order == sorted(order)

    # nothing outside the blocks, nothing that is not a Linear
    excluded = {id(model.lm_head), id(model.get_input_embeddings())}
    excluded |= {id(m) for m in model.modules() if "Norm" in type(m).__name__}
    assert not excluded & {id(m) for m in layers.values()}
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in layers)

    # every Linear of the model except lm_head is prunable
    all_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all_linears - set(layers) == {"lm_head"}

    # block_layers of block i = the prunable layers of block i
    for i, block in enumerate(blocks):
        bl = block_layers(block, f"model.layers.{i}", expert_counts(model))
        assert set(bl) == {f"model.layers.{i}.{p}" for p in projections}
        assert all(bl[n] is layers[n] for n in bl)


def test_prunable_layers_tiny_llama_and_qwen2(tiny_model_dir):
    model = _load(tiny_model_dir)
    assert type(model).__name__ in ("LlamaForCausalLM", "Qwen2ForCausalLM")
    _check_llama_like(model, n_layers=3)


def _tiny(config_cls, **extra):
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    common.update(extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**common)).eval()


@pytest.mark.parametrize("family", ["mistral", "gemma", "gemma2"])
def test_find_blocks_other_families(family):
    import transformers

    cls = {"mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig,
           "gemma2": transformers.Gemma2Config}[family]
    extra = {"head_dim": 8} if family.startswith("gemma") else {}
    model = _tiny(cls, **extra)
    _check_llama_like(model, n_layers=4)


def test_fused_projections_phi3():
    from transformers import Phi3Config

    model = _tiny(Phi3Config, pad_token_id=0)
    _check_llama_like(model, n_layers=4, projections=("self_attn.qkv_proj", "self_attn.o_proj",
                                                      "mlp.gate_up_proj", "mlp.down_proj"))


def test_longest_stack_wins_and_no_stack_is_a_user_error():
    from unipruning_cli.core.errors import UserError

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.short = nn.ModuleList([Block() for _ in range(2)])
            self.mixed = nn.ModuleList([Block(), nn.ReLU(), Block(), Block(), Block()])
            self.no_linear = nn.ModuleList([nn.ReLU() for _ in range(9)])
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(4, 4)

    toy = Toy()
    prefix, blocks = find_blocks(toy)
    assert prefix == "layers" and blocks is toy.layers
    assert set(prunable_layers(toy)) == {"layers.0.fc", "layers.1.fc", "layers.2.fc"}

    with pytest.raises(UserError):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


from pathlib import Path

from _helpers import REAL_CACHE, validate_overrides  # noqa: E402


# ====================================================================================== GGUF files as a source


def test_a_gguf_source_that_is_not_a_gguf_file_is_refused_before_anything_loads(tmp_path, tiny_llama_dir,
                                                                                  corpus_files, no_weights_read):
    from unipruning_cli.core.errors import UserError

    for bad in (tmp_path / "missing.gguf", tiny_llama_dir):
        with pytest.raises(UserError, match="not a .gguf file here"):
            validate_overrides(tiny_llama_dir, corpus_files, "model=gguf", f"model.path={bad}")


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_into_the_cache_and_loads_as_the_embedded_model_does(tmp_path):
    """The embedded model's own GGUF file through ``model=gguf``: the cached folder holds the same weights as the
    embedded folder (converted by ``unipruning prepare`` from that very file), and a second call converts nothing."""
    from safetensors.torch import load_file

    from unipruning_cli.data.assets import EMBEDDED_MODELS, GGUF_MEMBER, ensure_gguf_folder

    gguf, embedded_dir = REAL_CACHE / "raw" / Path(GGUF_MEMBER).name, REAL_CACHE / EMBEDDED_MODELS["smollm2-135m"]
    if not (gguf.exists() and (embedded_dir / "config.json").exists()):
        pytest.skip("the embedded model is not prepared (unipruning prepare)")
    folder = ensure_gguf_folder(gguf, root=tmp_path)
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert ensure_gguf_folder(gguf, root=tmp_path) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    ours = load_file(str(next(folder.glob("*.safetensors"))))
    embedded = load_file(str(next(embedded_dir.glob("*.safetensors"))))
    assert ours.keys() == embedded.keys() and all(torch.equal(ours[k], embedded[k]) for k in ours)
