"""Structural cuts of MLP channels: whole intermediate channels removed, so the pruned model is a standard, smaller one.

Channel j of a decoder block's MLP is row j of the matrices that make the intermediate activation (``gate_proj`` and
``up_proj``; ``fc1`` / ``c_fc`` / ``dense_h_to_4h`` without a gate) and column j of the one that reads it
(``down_proj``; ``fc2`` / ``c_proj`` / ``dense_4h_to_h``). Removing it removes one unit of ``intermediate_size``
(LLM-Pruner, Ma et al. 2023; FLAP, An et al. 2024, Sec. 3): the same share in every layer keeps the config standard,
so the export is an ordinary model with a smaller ``intermediate_size`` that any engine loads.

A channel's score is the sum of per-weight scores over its weights (its rows of the input matrices and its column of
the output matrix): with |Γ| it is UniPruning's structural cut; with Wanda's scores it is the structured Wanda
baseline of FLAP's comparison ("Wanda-sp"); with magnitude, the L1 norm of the channel's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..core.errors import UserError

#: (input matrices, output matrix) of an MLP, by the last part of their names: gated (Llama, Qwen, Gemma, Mistral),
#: then plain (OPT/Phi ``fc1``/``fc2``, GPT-2 ``c_fc``/``c_proj`` under ``mlp``, GPT-NeoX ``dense_h_to_4h``).
MLP_ROLES = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("c_fc",), "c_proj"),
             (("dense_h_to_4h",), "dense_4h_to_h"))


@dataclass(frozen=True)
class MLPChannels:
    """One MLP's channels: ``inputs`` (matrices whose rows are the channels), ``output`` (the matrix whose columns
    are), their common ``parent`` module name and ``width`` (its ``intermediate_size``)."""

    parent: str
    inputs: tuple[str, ...]
    output: str
    width: int


def _mlp_names(names: Iterable[str]) -> list[tuple[str, tuple[str, ...], str]]:
    """(parent, input matrices, output matrix) of every MLP among ``names``, by the names alone; :class:`UserError`
    for an expert's MLP and where none is found."""
    by_parent: dict[str, dict[str, str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = name
    found = []
    for parent, leaves in by_parent.items():
        for inputs, output in MLP_ROLES:
            if output in leaves and all(i in leaves for i in inputs) and _mlp_or_attention_output(leaves[output]):
                if ".experts." in f"{parent}." or ".shared_expert" in parent:
                    raise UserError(f"pattern=channels: {parent} is an expert's MLP; channels are cut from dense MLPs "
                                    "only (an MoE model's experts are removed whole)")
                found.append((parent, tuple(leaves[i] for i in inputs), leaves[output]))
                break
    if not found:
        raise UserError("pattern=channels: no MLP found among the prunable matrices (gate/up/down_proj, fc1/fc2, "
                        "c_fc/c_proj)")
    return found


def _with_width(parent: str, inputs: tuple[str, ...], output: str,
                shapes: Mapping[str, tuple[int, ...]]) -> MLPChannels:
    width = shapes[output][1]
    bad = [i for i in inputs if shapes[i][0] != width]
    if bad:
        raise UserError(f"pattern=channels: {', '.join(bad)} have {[shapes[b][0] for b in bad]} rows, {output} "
                        f"{width} columns: not one MLP's channels")
    return MLPChannels(parent, inputs, output, width)


def mlp_channels(shapes: Mapping[str, tuple[int, ...]]) -> list[MLPChannels]:
    """Every MLP among the prunable matrices ``shapes`` (name -> ``(out, in)``), found by the names of its matrices.

    Raises :class:`UserError` where an MLP is an expert's (the experts of an MoE block are cut whole, not by
    channel) or its matrices disagree on the width, and where no MLP is found."""
    return [_with_width(*group, shapes) for group in _mlp_names(shapes)]


def channel_scores(mlp: MLPChannels, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Score of each channel (float64 ``[width]``): the per-weight ``scores`` (name -> ``[out, in]``, higher = keep)
    summed over the channel's rows of ``mlp.inputs`` and its column of ``mlp.output``."""
    total = scores[mlp.output].double().sum(0)
    for name in mlp.inputs:
        total = total + scores[name].double().sum(1).to(total.device)
    return total


def kept_channels(score: torch.Tensor, sparsity: float, what: str = "channels") -> torch.Tensor:
    """bool ``[width]``: the ``width - round(sparsity * width)`` units of highest ``score`` (ties to the lower index).

    Raises :class:`UserError` where the cut would remove every unit (``what``: their name in the message)."""
    width = score.numel()
    keep = width - round(sparsity * width)
    if keep < 1:
        raise UserError(f"sparsity {sparsity} removes all {width} {what} of a layer")
    order = torch.argsort(-score.double(), stable=True)
    out = torch.zeros(width, dtype=torch.bool)
    out[order[:keep].cpu()] = True
    return out


def channel_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks (bool ``[out, in]``, on the CPU) of every MLP matrix in ``scores``: the same share ``sparsity`` of
    channels removed in every MLP, the lowest-scored (:func:`channel_scores`); the other matrices get no mask and
    their scores are never read (``scores`` may compute each on access: one MLP's are alive at a time)."""
    masks = {}
    for parent, inputs, output in _mlp_names(scores):
        group = {n: scores[n] for n in (*inputs, output)}
        shapes = {n: tuple(t.shape) for n, t in group.items()}
        mlp = _with_width(parent, inputs, output, shapes)
        keep = kept_channels(channel_scores(mlp, group), sparsity)
        for name in mlp.inputs:
            masks[name] = keep[:, None].expand(shapes[name]).clone()
        masks[mlp.output] = keep[None, :].expand(shapes[mlp.output]).clone()
    return masks


def channels_of_masks(masks: Mapping[str, torch.Tensor], mlp: MLPChannels) -> torch.Tensor:
    """The kept channels (bool ``[width]``) that ``masks`` give ``mlp``; raises ``ValueError`` where the masks are not
    whole channels (a row of an input matrix or a column of the output matrix partly kept, or the matrices
    disagreeing)."""
    keep = masks[mlp.output].any(0).cpu()
    expect = {mlp.output: keep[None, :].expand(masks[mlp.output].shape)}
    expect.update({n: keep[:, None].expand(masks[n].shape) for n in mlp.inputs})
    for name, want in expect.items():
        if not torch.equal(masks[name].cpu(), want):
            raise ValueError(f"{name}: the mask is not whole channels of {mlp.parent}")
    return keep


def ls_refit(weight: torch.Tensor, xtx: torch.Tensor, keep: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The projection after a channel cut refit on the kept channels by least squares (FLAP's and SliceGPT's
    compensation in closed form): ``W'`` minimises ``‖W X - W'_K X_K‖² + λ ‖W_K - W'_K‖²`` over the calibration
    inputs X of the projection, with ``λ = percdamp · mean(diag XXᵀ)`` (SparseGPT's damping, so a cut that keeps
    every channel returns W unchanged): ``W'_K = W (H + λI)[:, K] (H_KK + λI)⁻¹``, H = XXᵀ.

    ``weight`` ``[out, width]`` (any float dtype), ``xtx`` ``[width, width]`` (Σ x xᵀ, fp32), ``keep`` bool
    ``[width]``. Returns the new weight in ``weight``'s dtype, zero in the removed columns. Raises ``ValueError``
    for a non-finite or singular system."""
    w = weight.detach().double()
    h = xtx.to(w.device).double()
    k = keep.to(w.device)
    damp = percdamp * float(h.diagonal().mean()) if h.numel() else 0.0
    hd = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        solved = torch.linalg.solve(hd[k][:, k], (w @ hd[:, k]).T).T
    except RuntimeError as err:  # a singular system: no channel of the kept ones fired and no damping
        raise ValueError(f"ls_refit: the kept channels' system cannot be solved ({err}); raise percdamp") from None
    if not torch.isfinite(solved).all():
        raise ValueError("ls_refit: the refit weights are not finite (the calibration inputs overflowed?)")
    out = torch.zeros_like(w)
    out[:, k] = solved
    return out.to(weight.dtype)


#: The matrices whose input channels FLAP scores: the projection after an MLP's channels (:data:`MLP_ROLES`), and
#: after the attention heads.
FLAP_OUTPUTS = (*(output for _, output in MLP_ROLES), "o_proj")


def _mlp_or_attention_output(name: str) -> bool:
    """GPT-2's ``c_proj`` closes its MLP only under ``mlp`` (its attention has one too): :func:`_mlp_names`' rule."""
    parent, _, leaf = name.rpartition(".")
    return leaf != "c_proj" or parent.endswith("mlp")


def flap_scores(weights: Mapping[str, torch.Tensor], stats: Mapping) -> "LazyMap":
    """Per-weight scores whose channel sums (:func:`channel_scores`) are FLAP's fluctuation metric (An et al. 2024,
    Eq. 5): ``W_ij² · Var(x_j)`` for each MLP's output matrix and attention's ``o_proj`` (``Var``: the sample variance
    of its input channel j on the calibration tokens, :attr:`..data.stats.ActivationStats.variance`), 0 for the others
    (FLAP scores a channel or head by the columns that read it). ``weights``: name -> ``[out, in]`` of the prunable matrices (or
    modules with a ``weight``); ``stats``: their calibration statistics, with Σx. Computed one matrix at a time."""
    from ..core.lazymap import LazyMap

    outputs = {n for n in weights if n.rpartition(".")[2] in FLAP_OUTPUTS and _mlp_or_attention_output(n)}

    def score(name: str) -> torch.Tensor:
        w = getattr(weights[name], "weight", weights[name]).detach()
        if name not in outputs:
            return torch.zeros(w.shape, dtype=torch.float32)
        return (w.float().square() * stats[name].variance.to(w.device).float()).cpu()

    return LazyMap(weights, score)


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation (An et al. 2024, Eq. 8) of the projection after a channel cut: what the removed
    channels contributed on average, ``W[:, removed] · E[x_removed]`` (``weight`` ``[out, width]``, ``mean`` fp64
    ``[width]``, the channels' mean input on the calibration tokens; ``keep`` bool ``[width]``). Returns fp32
    ``[out]``, added to the projection's bias."""
    gone = ~keep.to(weight.device)
    return (weight.detach().double()[:, gone] @ mean.to(weight.device).double()[gone]).float()


def check_bias_fit(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module]) -> None:
    """Raise :class:`UserError` where the projections after the channels (of ``layers``, the prunable matrices) have
    no bias and the config has no ``mlp_bias`` field to give them one: ``reconstruct=bias`` could not be written as a
    standard model (Qwen2 and Gemma MLPs have no bias; Llama's ``mlp_bias`` adds one to every MLP matrix)."""
    from ..models.layouts import text_config

    mlps = mlp_channels({n: tuple(m.weight.shape) for n, m in layers.items()})
    config = text_config(model)
    if all(layers[m.output].bias is not None for m in mlps) or isinstance(getattr(config, "mlp_bias", None), bool):
        return
    raise UserError(f"reconstruct=bias adds FLAP's compensation to the bias of each MLP's {mlps[0].output.rsplit('.', 1)[-1]}, "
                    f"which {type(config).__name__} neither has nor can add (no mlp_bias field): use reconstruct=ls "
                    "or none")


@torch.no_grad()
def give_mlp_bias(model: torch.nn.Module, names: Iterable[str]) -> bool:
    """Set the config's ``mlp_bias`` where one of the MLP matrices ``names`` holds a bias and the config says False,
    giving the others a zero bias (the config adds one to every MLP matrix, and a reload must find each). Returns
    whether anything changed."""
    from ..models.layouts import text_config

    config = text_config(model)
    modules = dict(model.named_modules())
    mlp = [modules[n] for n in names]
    if getattr(config, "mlp_bias", None) is not False or all(m.bias is None for m in mlp):
        return False
    for m in mlp:
        if m.bias is None:
            m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                        requires_grad=False)
    config.mlp_bias = True
    return True


#: How a channels cut ranks channels (``pattern.channel_score``): the method's per-weight scores summed per channel
#: (|Γ| for UniPruning, Wanda-sp for Wanda, the L1 norm for magnitude), or FLAP's fluctuation (:func:`flap_scores`).
CHANNEL_SCORES = ("weights", "flap")


def validate_channels(cfg) -> None:
    """The config's rules for channels cuts: ``reconstruct=ls`` / ``bias`` need ``pattern=channels``, which takes no
    ``refine`` and a known ``pattern.channel_score``. Raises :class:`UserError`."""
    kind, how = cfg.pattern.kind, cfg.reconstruct
    if how == "ls" and kind not in ("channels", "heads"):
        raise UserError("reconstruct=ls refits the projection after a cut of whole MLP channels or attention heads on "
                        "the kept ones: it needs pattern=channels or heads (any other mask: reconstruct=obs)")
    if how == "bias" and kind != "channels":
        raise UserError("reconstruct=bias adds FLAP's bias compensation to the projection after a cut of whole MLP "
                        "channels: it needs pattern=channels")
    if kind in ("channels", "heads") and cfg.refine != "none":
        raise UserError(f"refine=swap swaps single weights, which would break whole {kind}: drop refine with "
                        f"pattern={kind} (reconstruct=ls compensates the cut)")
    p = cfg.pattern
    ignored = [f"pattern.channel_score={p.channel_score}" if p.channel_score != "weights" and kind not in
               ("channels", "heads") else None,
               *(f"pattern.{k}={p[k]}" for k in ("experts_removed", "experts_floor") if p[k] is not None
                 and kind != "experts"),
               f"pattern.expert_score={p.expert_score}" if p.expert_score != "saliency" and kind != "experts" else None]
    if any(ignored):
        raise UserError(f"{', '.join(i for i in ignored if i)}: not read with pattern={kind} (channel_score: channels "
                        "and heads; expert_score, experts_removed, experts_floor: experts); drop it")
    if cfg.pattern.channel_score not in CHANNEL_SCORES:
        raise UserError(f"pattern.channel_score={cfg.pattern.channel_score!r} is not allowed; choose one of: "
                        f"{', '.join(CHANNEL_SCORES)}")


#: The config field that holds an MLP's width, by the names families use.
WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


def check_channels_fit(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module]) -> None:
    """Raise :class:`UserError` where a channels cut of ``model`` (its prunable ``layers``; on the ``meta`` device
    too) could not be exported as a standard model: an MLP matrix that is not a plain ``nn.Linear`` (GPT-2's Conv1D),
    or a config without a width field equal to the MLPs' width. Called before any weight is read."""
    from ..models.layouts import text_config

    mlps = mlp_channels({n: tuple(m.weight.shape) for n, m in layers.items()})
    for mlp in mlps:
        for name in (*mlp.inputs, mlp.output):
            if type(layers[name]) is not torch.nn.Linear:
                raise UserError(f"pattern=channels: {name} is a {type(layers[name]).__name__}, not an nn.Linear: "
                                "its channels cannot be sliced into a standard model")
    config = text_config(model)
    field = next((f for f in WIDTH_FIELDS if getattr(config, f, None) is not None), None)
    widths = {mlp.width for mlp in mlps}
    if field is None or {getattr(config, field)} != widths:
        raise UserError(f"pattern=channels: {type(config).__name__} has no width field ({', '.join(WIDTH_FIELDS)}) "
                        f"equal to its MLPs' width {sorted(widths)}: a smaller config cannot be written")


def sliced_linear(layer: torch.nn.Linear, idx: torch.Tensor, rows: bool) -> torch.nn.Linear:
    """A new ``nn.Linear`` holding the rows (``rows``: and bias entries) or the columns ``idx`` (int64) of ``layer``."""
    idx = idx.to(layer.weight.device)
    weight = layer.weight.detach().index_select(0 if rows else 1, idx)
    bias = layer.bias.detach().index_select(0, idx) if (rows and layer.bias is not None) else (
        layer.bias.detach() if layer.bias is not None else None)
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


@torch.no_grad()
def slice_channels(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> dict:
    """Remove, in place, the MLP channels a channels cut's ``masks`` drop (name -> bool ``[out, in]``, whole channels):
    each input matrix loses those rows (and bias entries), the output matrix those columns, and the config's width
    field (``intermediate_size``, ``ffn_dim`` or ``n_inner``) becomes the kept count, so ``save_pretrained`` writes
    a standard, smaller model. The weights are taken as they are (masked or refit). Returns ``{"width": (before,
    after), "parameters": (before, after)}``.

    Raises :class:`UserError` where an MLP matrix is not a plain ``nn.Linear`` (a Conv1D or fused layout), the MLPs
    keep different widths, or the config has no width field; ``ValueError`` for masks that are not whole channels."""
    from ..models.layouts import text_config

    before = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    mlps = mlp_channels(shapes)
    keeps = [channels_of_masks(masks, mlp) for mlp in mlps]
    kept = {int(k.sum()) for k in keeps}
    if len(kept) != 1:
        raise UserError(f"pattern=channels: the MLPs keep {sorted(kept)} channels; a standard config has one width")
    check_channels_fit(model, {n: modules[n] for n in masks})
    config = text_config(model)
    field = next(f for f in WIDTH_FIELDS if getattr(config, f, None) is not None)
    for mlp, keep in zip(mlps, keeps):
        for name, rows in [*((n, True) for n in mlp.inputs), (mlp.output, False)]:
            parent, _, leaf = name.rpartition(".")
            setattr(modules[parent], leaf, sliced_linear(modules[name], keep.nonzero().flatten(), rows))
    width = getattr(config, field)
    setattr(config, field, kept.pop())
    return {"width": (int(width), int(getattr(config, field))), "field": field,
            "parameters": (before, sum(p.numel() for p in model.parameters()))}
