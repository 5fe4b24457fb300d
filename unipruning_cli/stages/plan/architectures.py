"""A model's architecture without its weights: the named hub models' ``config.json`` shipped here, a folder's own.

:func:`meta_model` builds the model on PyTorch's ``meta`` device (shapes and dtypes, no storage), so a plan
for a 70B model takes seconds and no hub access for the named models.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig

from ...core.errors import UserError
from ...models.loading import model_location

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

#: The architecture fields of each named hub model's ``config.json`` (hub id -> fields), as published.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                          "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                          "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 131072, "tie_word_embeddings": False, "rope_theta": 1000000.0},
    "Qwen/Qwen2.5-72B": {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                         "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                         "max_position_embeddings": 131072, "tie_word_embeddings": False, "rope_theta": 1000000.0},
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                 "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": True,
                                "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
    "meta-llama/Llama-3.1-8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                                "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE},
    "meta-llama/Llama-3.1-70B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                                 "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                                 "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                                 "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE},
    "mistralai/Mixtral-8x7B-v0.1": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                                    "max_position_embeddings": 32768, "tie_word_embeddings": False,
                                    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02},
    "Qwen/Qwen3-30B-A3B-Base": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                                "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                                "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                                "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
                                "max_position_embeddings": 32768, "tie_word_embeddings": False,
                                "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001},
}


def model_config(model_cfg: DictConfig):
    """The transformers config of ``model_cfg``: shipped for the named hub models, else read from the folder (or
    the hub, or its local cache). Raises :class:`UserError` when it cannot be had here."""
    from transformers import AutoConfig

    if model_cfg.source == "hub" and model_cfg.path in ARCHITECTURES:
        fields = copy.deepcopy(ARCHITECTURES[model_cfg.path])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    location = model_location(model_cfg)
    try:
        return AutoConfig.from_pretrained(location, revision=model_cfg.revision,
                                          trust_remote_code=bool(model_cfg.trust_remote_code))
    except (OSError, ValueError) as err:
        raise UserError(f"model.path={model_cfg.path!r}: its config.json cannot be read here ({err}); "
                        f"a plan needs the architecture, not the weights") from None


def meta_model(model_cfg: DictConfig, dtype):
    """The model of ``model_cfg`` on the ``meta`` device in ``dtype``: every parameter's shape, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...models.layouts import as_linears

    config = model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=bool(model_cfg.trust_remote_code))
    as_linears(model)  # the matrices the run prunes: one per expert, Conv1D as Linear
    return model
