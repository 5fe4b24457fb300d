"""What the export of a structural cut will be, before any weight is read: its parameter count and bytes, from the
model's shapes on the ``meta`` device (``unipruning plan``). Counted as the slices count them
(:func:`...pruning.channels.slice_channels`, :func:`...pruning.heads.slice_heads`,
:func:`...pruning.experts.remove_experts`); tests compare it with the parameters of exported models."""

from __future__ import annotations

from omegaconf import DictConfig

from ...models.layouts import text_config
from ...models.loading import prunable_layers
from ...pruning.channels import mlp_channels
from ...pruning.experts import moe_layers, removed_count
from ...pruning.heads import attention_names, attention_heads, head_counts
from ...pruning.targets import make_target
from .architectures import meta_model


def _bias(layer) -> int:
    return int(getattr(layer, "bias", None) is not None)


def exported_model(cfg: DictConfig, dtype) -> dict | None:
    """``{"tag", "parameters": [dense, exported], "bytes": exported weights in ``dtype``, "standard": bool}`` of the
    run's primary cut where it is structural (channels, heads, experts), else None. ``standard`` is False for experts
    under one budget over the layers (``pattern.experts_floor``): measured by the run, never exported. Raises
    :class:`...core.errors.UserError` where the model's config cannot be read here."""
    target = make_target(cfg)
    if not target.is_structural:
        return None
    model = meta_model(cfg.model, dtype)
    target = target.for_model(model)
    total = sum(p.numel() for p in model.parameters())
    layers = prunable_layers(model)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    removed = 0
    if target.is_experts and target.floor:
        return {"tag": target.tag, "parameters": [total, None], "bytes": None, "standard": False}
    if target.is_channels:
        for mlp in mlp_channels(shapes):
            k = round(target.sparsity * mlp.width)
            removed += k * (sum(shapes[i][1] + _bias(layers[i]) for i in mlp.inputs) + shapes[mlp.output][0])
            if cfg.reconstruct == "bias" and not _bias(layers[mlp.output]):  # FLAP's bias, with mlp_bias=true
                removed -= shapes[mlp.output][0] + sum((mlp.width - k) * (1 - _bias(layers[i])) for i in mlp.inputs)
    elif target.is_heads:
        for att in attention_heads({n: s for n, s in shapes.items() if n in attention_names(shapes)},
                                   *head_counts(text_config(model))):
            g = round(target.sparsity * att.groups)
            for name in (att.q, att.k, att.v, att.o):
                per_row = shapes[name][0] if name == att.o else shapes[name][1] + _bias(layers[name])
                removed += g * att.group_rows(name) * per_row
    else:
        for layer in moe_layers(model):
            k = removed_count(layer.count, target.sparsity, target.removed)
            expert = sum(layers[n].weight.numel() + (layers[n].bias.numel() if _bias(layers[n]) else 0)
                         for n in layer.matrices[0])
            router = model.get_submodule(layer.router)
            row = sum(t.numel() // layer.count for t in router.parameters(recurse=False)
                      if t.dim() >= 1 and t.shape[0] == layer.count)
            removed += k * (expert + row)
    after = total - removed
    return {"tag": target.tag, "parameters": [total, after], "bytes": after * dtype.itemsize, "standard": True}
