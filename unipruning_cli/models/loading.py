"""Loading a causal LM and finding the layers that may be pruned.

Prunable layers are found by role, not by attribute names of one family: the decoder blocks are the
``nn.ModuleList`` of ``config.num_hidden_layers`` blocks (the model's ``_no_split_modules`` class where it names
one), and every ``nn.Linear`` inside them is prunable except a mixture of experts' routers and gates
(:func:`block_routers`). Fused 3-D expert tensors are taken as one Linear per expert at load, and HF ``Conv1D`` as a
Linear (:mod:`.layouts`). Embeddings, norms and ``lm_head`` live outside the blocks or are not linear, so they are
never touched. This covers Llama, Qwen2, Mistral, Gemma, Mixtral, Qwen-MoE and similar layouts without a table; what
else the blocks hold in 2-D or more is reported as left dense.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ..core.errors import UserError
from .layouts import as_linears, expert_counts, expert_groups, expert_lists, text_config  # noqa: F401  (its home)

log = logging.getLogger(__name__)

#: The weight dtypes a model can be loaded or exported in, by their config name.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device={device!r} but no CUDA device is available; use model.device=cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[dtype]


def model_location(model_cfg: DictConfig) -> str:
    """The string handed to ``from_pretrained``: an HF id or a folder."""
    if model_cfg.source == "embedded":
        from ..data.assets import embedded_model_path

        return str(embedded_model_path(model_cfg.path))
    if model_cfg.source == "local":
        return str(Path(model_cfg.path).expanduser())
    if model_cfg.source == "gguf":
        from ..data.assets import gguf_folder

        return str(gguf_folder(model_cfg.path))
    return model_cfg.path


def model_identity(model_cfg: DictConfig) -> dict:
    """What a cached result computed with this model depends on: for a folder, its files' sizes and mtimes."""
    location = model_location(model_cfg)
    ident = {"location": location, "revision": model_cfg.revision}
    folder = Path(location)
    if model_cfg.source != "hub" and folder.is_dir():
        ident["files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
                          if f.suffix in (".json", ".safetensors", ".bin")}
    return ident


def check_model_reachable(model_cfg: DictConfig) -> None:
    """Fail fast, before any weights are read, for a model that cannot be loaded here."""
    if model_cfg.source == "embedded":
        model_location(model_cfg)
    elif model_cfg.source == "gguf":  # converted once (minutes for a large file), then a folder like any other
        from ..data.assets import ensure_gguf_folder

        ensure_gguf_folder(model_cfg.path)
    elif model_cfg.source == "local":
        path = Path(model_cfg.path).expanduser()
        if not (path / "config.json").exists():
            raise UserError(f"model.path={model_cfg.path!r}: no HF model folder there (config.json missing)")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model_cfg.path, "config.json", revision=model_cfg.revision), str):
            raise UserError(
                f"model.path={model_cfg.path!r} is a hub id, HF_HUB_OFFLINE=1 is set and it is not in the local "
                f"HF cache; download it first, point model.source=local at a folder, or use model=smollm2-135m"
            )


def load_model(model_cfg: DictConfig, placement: str | None = None) -> tuple[nn.Module, "object"]:
    """Load model and tokenizer as the config says; the model is in eval mode with gradients off.

    ``placement`` (default ``model.placement``; ``auto`` means ``device`` here, the runner passes the
    plan's choice): ``device`` puts every weight on ``model.device`` (or where ``model.device_map`` says);
    ``onload`` reads the weights into host memory and moves only what is outside the decoder blocks to
    the GPU (sequential onloading, :mod:`.onload`). On the CPU both are the same.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .onload import place_onloaded

    hf_logging.disable_progress_bar()  # rich bars are ours; HF's tqdm would interleave with them
    location = model_location(model_cfg)
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    placement = placement or model_cfg.get("placement") or "device"
    onload = placement == "onload" and device.type != "cpu"
    kwargs = dict(dtype=dtype, revision=model_cfg.revision, trust_remote_code=bool(model_cfg.trust_remote_code))
    if model_cfg.device_map:
        kwargs["device_map"] = model_cfg.device_map
        if model_cfg.get("max_memory"):
            kwargs["max_memory"] = {_device_key(k): v for k, v in model_cfg.max_memory.items()}
    log.info("loading %s (%s, %s, %s)", location, dtype,
             model_cfg.device_map or (f"{device}, sequential onloading" if onload else device), model_cfg.source)
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if onload:
        place_onloaded(model, find_blocks(model)[1], device)
    elif not model_cfg.device_map:
        model.to(device)
    as_linears(model)  # after placement: the views share the placed storage
    model.eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(location, revision=model_cfg.revision,
                                        trust_remote_code=bool(model_cfg.trust_remote_code))
    return model, tok


def _device_key(key: str) -> int | str:
    """accelerate's ``max_memory`` keys: GPU indices as ints, ``cpu`` / ``disk`` as strings."""
    return int(key) if str(key).isdigit() else str(key)


_REUSE: dict[str, tuple[nn.Module, object, dict[str, torch.Tensor]]] = {}


def load_model_reused(model_cfg: DictConfig, placement: str | None = None) -> tuple[nn.Module, "object"]:
    """``load_model`` for the jobs of one sweep process: the model is loaded once; each later job
    gets it back with the original prunable weights restored from a CPU copy (pruning works in place).
    Holds one model at a time."""
    from omegaconf import OmegaConf

    from ..core.rundir import fingerprint

    key = fingerprint({"model": model_identity(model_cfg), "cfg": OmegaConf.to_container(model_cfg, resolve=True),
                       "placement": placement})
    if key in _REUSE:
        model, tok, original = _REUSE[key]
        layers = prunable_layers(model)
        with torch.no_grad():
            for name, w in original.items():
                layers[name].weight.copy_(w)
        log.info("model reused from the previous job of this sweep")
        return model, tok
    _REUSE.clear()
    model, tok = load_model(model_cfg, placement)
    _REUSE[key] = (model, tok, {n: m.weight.detach().to("cpu", copy=True) for n, m in prunable_layers(model).items()})
    return model, tok


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks, by their role in the model's own description where it has one: the ``nn.ModuleList``
    of ``config.num_hidden_layers`` children of one class, preferring the class the model names in
    ``_no_split_modules`` (its decoder layer). Only a model that says neither falls back to the longest list of
    identical blocks holding Linears, with a warning. The longest list is not the blocks in a mixture of experts
    whose layers each hold a list of experts longer than the layer count (DeepSeek-V2-Lite: 64 experts, 27 layers).
    Raises :class:`UserError` when no list of blocks with linear layers is found."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(c) for c in module}) == 1
             and any(p.dim() >= 2 for p in module[0].parameters())]  # matrices of any layout (Conv1D too)
    if not lists:
        raise UserError(f"{type(model).__name__}: no stack of decoder blocks with weight matrices found")
    layers = getattr(text_config(model), "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    by_count = [(n, m) for n, m in lists if len(m) == layers]
    named = [(n, m) for n, m in by_count if type(m[0]).__name__ in no_split
             or any(c.__name__ in no_split for c in type(m[0]).__mro__)]
    for found in (named, by_count):
        if found:
            return min(found, key=lambda nm: nm[0].count("."))  # the outermost: blocks, not a list inside one
    best = max(lists, key=lambda nm: len(nm[1]))
    log.warning("%s: no list of config.num_hidden_layers=%s blocks; taking the longest list of identical blocks, "
                "%s (%d)", type(model).__name__, layers, best[0], len(best[1]))
    return best


def unprunable_in_blocks(model: nn.Module) -> dict[str, int]:
    """Weights of two or more dimensions inside the decoder blocks that are not ``nn.Linear`` weights, by name ->
    element count: what pruning leaves dense although it sits where the prunable weights are (fused 3-D expert
    tensors of Mixtral / Qwen-MoE in transformers 5, HF ``Conv1D`` projections of GPT-2). Norms and biases (1-D)
    and routers (``[experts, hidden]``, never pruned, listed by :func:`router_names`) are not counted."""
    prefix, blocks = find_blocks(model)
    linear = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}
    routers = set(_router_weights(blocks, expert_counts(model)))  # never pruned: not "left dense" by pruning
    return {f"{prefix}.{n}": p.numel() for n, p in blocks.named_parameters() if p.dim() >= 2 and id(p) not in linear
            and n not in routers}


def _router_weights(module: nn.Module, experts: frozenset[int] | set[int]) -> dict[str, nn.Parameter]:
    """The non-Linear router weights ``[experts, hidden]`` inside ``module`` (transformers 5's ``TopKRouter``), by
    parameter name: 2-D, as many rows as one of ``experts`` (the config's expert counts), not an ``nn.Linear``'s."""
    linear = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    return {n: p for n, p in module.named_parameters() if p.dim() == 2 and p.shape[0] in experts and id(p) not in linear}


def block_routers(block: nn.Module, experts: frozenset[int] | set[int]) -> list[str]:
    """The names (relative to ``block``, a decoder block) of the ``nn.Linear`` routers and gates of a mixture of
    experts, which are never pruned: found by role, whatever their attribute name or class, outside the lists of
    experts (:func:`.layouts.expert_lists`): a Linear whose output is a router's (``out_features`` one of
    ``experts``, the config's expert counts: Mixtral's ``gate``, a remote-code router), or a gate of width 1 in a
    block that holds experts (Qwen2-MoE's ``shared_expert_gate``; llm-compressor PR #2740 skips both). A dense
    model (``experts`` empty) has none: a Linear of width 1 there is a projection like any other."""
    if not experts:
        return []
    lists = expert_lists(block, experts)
    inside = {id(m) for _, experts_list in lists for m in experts_list.modules()}
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]
    has_experts = bool(lists) or any(m.out_features in experts for _, m in linears) or bool(
        _router_weights(block, experts)) or any(p.dim() >= 3 and p.shape[0] in experts for p in block.parameters())
    return [n for n, m in linears if m.out_features in experts or (has_experts and m.out_features == 1)]


def router_names(model: nn.Module) -> list[str]:
    """Full module names of every router and gate in the decoder blocks, left dense: the ``nn.Linear`` ones of
    :func:`block_routers` and the modules holding a non-Linear router weight ``[experts, hidden]`` (transformers 5's
    ``TopKRouter``), in block order."""
    prefix, blocks = find_blocks(model)
    experts = expert_counts(model)
    names: dict[str, None] = {}
    for i, block in enumerate(blocks):
        names.update((f"{prefix}.{i}.{n}", None) for n in block_routers(block, experts))
        names.update((f"{prefix}.{i}.{n.rpartition('.')[0]}", None) for n in _router_weights(block, experts))
    return list(names)


def report_unprunable(model: nn.Module, layers: dict[str, nn.Linear]) -> dict:
    """Say loudly what pruning will leave dense inside the blocks, and the share of all parameters pruning can
    touch (``layers``: :func:`prunable_layers` of ``model``); returns ``{"prunable_fraction": f,
    "dense_in_blocks": {name: numel}, "routers": [module name]}`` for ``metrics.json`` (``routers``: the routers
    and expert gates, never pruned, :func:`router_names`)."""
    dense = unprunable_in_blocks(model)
    routers = router_names(model)
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(m.weight.numel() for m in layers.values())
    if dense:
        share = sum(dense.values()) / total
        log.warning("%d weight tensors inside the decoder blocks are not nn.Linear and stay DENSE (%.1f %% of all "
                    "parameters; e.g. %s): the asked sparsity applies to the Linear weights only, %.1f %% of all "
                    "parameters", len(dense), 100 * share, ", ".join(list(dense)[:3]), 100 * prunable / total)
    if routers:
        log.info("%d routers and expert gates stay dense, as they always do (e.g. %s)", len(routers),
                 ", ".join(routers[:3]))
    return {"prunable_fraction": prunable / total, "dense_in_blocks": dense, "routers": routers}


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks but the routers and gates of a mixture of experts
    (:func:`block_routers`), by full module name, in block order."""
    prefix, blocks = find_blocks(model)
    experts = expert_counts(model)
    layers: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        layers.update(block_layers(block, f"{prefix}.{i}", experts))
    return layers


def block_layers(block: nn.Module, block_name: str, experts: frozenset[int] | set[int]) -> dict[str, nn.Linear]:
    """The prunable Linears of one decoder block named ``block_name``, by full name: all but its routers and gates
    (:func:`block_routers`; ``experts``: the model's :func:`.layouts.expert_counts`, empty for a dense model)."""
    routers = set(block_routers(block, experts))
    return {f"{block_name}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in routers}


def model_expert_groups(model: nn.Module) -> list[list[str]]:
    """The groups of :func:`.layouts.expert_groups` over every decoder block of ``model`` (fused experts and lists of
    Linear experts), by full name: what pools a rarely routed expert's statistics in calibration and the search."""
    prefix, blocks = find_blocks(model)
    experts = expert_counts(model)
    return [g for i, block in enumerate(blocks) for g in expert_groups(block, f"{prefix}.{i}", experts)]


def resolve_add_bos(model_cfg: DictConfig, tok) -> bool:
    """``model.add_bos`` for this tokenizer: ``auto`` is what the tokenizer itself does when it encodes text (its
    first token is BOS: Llama, Gemma; not GPT-2-style or Qwen tokenizers); ``true`` needs a BOS token. Raises
    :class:`UserError` for ``true`` with a tokenizer that has none."""
    choice = str(model_cfg.add_bos).lower()
    bos = getattr(tok, "bos_token_id", None)
    if choice == "true":
        if bos is None:
            raise UserError(f"model.add_bos=true, but the tokenizer of {model_cfg.path} has no BOS token: "
                            "use model.add_bos=auto (its own convention) or false")
        return True
    if choice == "false" or bos is None:
        return False
    ids = tok("unipruning", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device
