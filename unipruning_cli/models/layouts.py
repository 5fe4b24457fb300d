"""Weights stored in other layouts than ``nn.Linear``, as Linear views: fused mixture-of-experts tensors (one
Linear per expert and projection) and HF ``Conv1D`` (GPT-2's projections, stored ``[in, out]``).

Every stage here works on named 2-D Linear weights ``[out, in]``: calibration hooks, scores, masks, the drift
search's parameters. After loading, :func:`as_linears` swaps each such module for Linears whose weights are views of
the original tensors (no copy), and :func:`hf_layout` swaps the originals back, holding the current weights, for
``save_pretrained``: an export reloads with plain transformers.

Conv1D computes ``addmm(b, x, W)`` with ``W [in, out]``; :class:`Conv1DLinear` holds ``W.t()`` as its weight, and
``F.linear(x, W.t(), b)`` is that same ``addmm``.

transformers 5 holds the experts of a mixture-of-experts layer as 3-D parameters, ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` (``up_proj`` where the experts have no gate; ``[E, in, out]`` where the class says
``is_transposed``, gpt-oss), in a module decorated by ``transformers.integrations.moe.use_experts_implementation``
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, gpt-oss, ...). Every stage here works on named 2-D
Linear weights: calibration hooks, scores, masks, the drift search's parameters. So after loading, each such
module is replaced by :class:`ExpertLinears`:

- a ``ModuleList`` of E experts, each with Linear ``gate_up_proj`` (or ``up_proj``) and ``down_proj``, named
  ``<layer>.mlp.experts.<e>.<proj>``;
- whose weights are views of the 3-D tensors, so no copy is made, and pruning in place prunes the fused tensor;
- whose forward is transformers' eager per-expert loop (``MixtralExperts.forward``). Each expert sees only the
  tokens the router sent it, so its calibration statistics, and their token count, are its own.

Experts with a norm after each expert (``has_post_expert_norm``) are not converted;
:func:`.loading.report_unprunable` then says they stay dense.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Collection, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def _is_fused_experts(module: nn.Module) -> bool:
    up = "gate_up_proj" if getattr(module, "has_gate", None) else "up_proj"
    return (hasattr(module, "is_transposed") and hasattr(module, "has_bias")
            and not getattr(module, "has_post_expert_norm", False)
            and all(isinstance(getattr(module, p, None), torch.Tensor) and getattr(module, p).dim() == 3
                    for p in (up, "down_proj")))


def _linear_view(fused: torch.Tensor, bias: torch.Tensor | None, e: int, transposed: bool) -> nn.Linear:
    """A Linear whose weight (and bias) are views of expert ``e`` of the 3-D ``fused`` tensor: no storage of its own."""
    w = fused.data[e].t() if transposed else fused.data[e]
    lin = nn.Linear.__new__(nn.Linear)  # not nn.Linear(): its initialisation of weights about to be replaced costs
    nn.Module.__init__(lin)             # 0.3 ms a matrix, 15 s for Qwen3-30B-A3B's 12,288 on the meta device
    lin.in_features, lin.out_features = w.shape[1], w.shape[0]
    lin.weight = nn.Parameter(w, requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias.data[e], requires_grad=False)
    return lin


class Expert(nn.Module):
    """One expert: ``gate_up_proj`` (or ``up_proj``) then ``down_proj``, each an ``nn.Linear`` ``[out, in]``."""

    def __init__(self, up_name: str, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.up_name = up_name
        setattr(self, up_name, up)
        self.down_proj = down


class ExpertLinears(nn.ModuleList):
    """The experts of one transformers fused-experts module as E :class:`Expert` s; same inputs and outputs.

    ``forward(hidden_states [T, H], top_k_index int64 [T, k], top_k_weights [T, k]) -> [T, H]``: the eager loop of
    transformers (each hit expert on its routed tokens, weighted, ``index_add_``-ed), with the fused module's own
    gate (``_apply_gate``: SwiGLU, gpt-oss's clamped variant) or activation. Holds the fused module (not as a
    submodule) to put it back (:func:`hf_layout`). ``observer``, where set, is called as ``observer(e, weights [n_e],
    outputs [n_e, H])`` with each hit expert's router weights and outputs before they are weighted."""

    observer = None

    def __init__(self, experts: nn.Module) -> None:
        has_gate, transposed = bool(experts.has_gate), bool(experts.is_transposed)
        up_name = "gate_up_proj" if has_gate else "up_proj"
        bias = bool(experts.has_bias)
        up, down = getattr(experts, up_name), experts.down_proj
        super().__init__(Expert(up_name,
                                _linear_view(up, getattr(experts, f"{up_name}_bias") if bias else None, e, transposed),
                                _linear_view(down, experts.down_proj_bias if bias else None, e, transposed))
                         for e in range(up.shape[0]))
        object.__setattr__(self, "fused_module", experts)
        self.up_name, self.has_gate, self.transposed, self.bias = up_name, has_gate, transposed, bias

    @property
    def projections(self) -> tuple[str, str]:
        return self.up_name, "down_proj"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, top_k_pos, token_idx in self.routes(top_k_index):
            expert = self[e]
            h = getattr(expert, self.up_name)(hidden_states[token_idx])
            h = self.fused_module._apply_gate(h) if self.has_gate else self.fused_module.act_fn(h)
            h = expert.down_proj(h)
            if self.observer is not None:  # pattern=experts' routing statistics (pruning/experts.py)
                self.observer(e, top_k_weights[token_idx, top_k_pos], h)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    @torch.no_grad()
    def routes(self, top_k_index: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(e, top_k_pos int64 [n_e], token_idx int64 [n_e])`` for each expert ``e < E`` that gets a token, ``e``
        ascending; ``top_k_index`` is ``[T, k]``. The same as transformers' eager loop (``torch.where`` of
        ``one_hot(top_k_index, E + 1).permute(2, 1, 0)[e]``): the same experts in the same order, each one's
        (slot, token) pairs row-major over ``[k, T]``, so ``index_add_`` sums in the same order, bit for bit. An
        index ``E`` (dropped tokens, in some families) is no expert's.

        One stable sort and one ``.tolist()`` per layer instead of a ``torch.where`` (a nonzero: a host sync on a
        GPU) per expert, 128 per layer for Qwen3-30B-A3B (shared/docs/gpu-readiness.md §6). The bounds come from
        ``searchsorted``, not ``bincount``, whose CUDA kernel reads the largest index back to size its output."""
        n_tokens = top_k_index.shape[0]
        # [k, T] row-major: the order torch.where walks the one-hot [E + 1, k, T]; stable keeps it within an expert
        ids, order = torch.sort(top_k_index.t().reshape(-1), stable=True)
        bounds = torch.searchsorted(ids, torch.arange(len(self) + 1, device=ids.device, dtype=ids.dtype)).tolist()
        top_k_pos, token_idx = order // n_tokens, order % n_tokens
        return [(e, top_k_pos[a:b], token_idx[a:b]) for e, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]

    def write_back(self) -> nn.Module:
        """The fused module holding this module's current weights (copied in where they no longer share its
        storage: after a dtype or device change); returned for swapping back in."""
        experts = self.fused_module
        for name in self.projections:
            for e, expert in enumerate(self):
                lin = getattr(expert, name)
                _write_back(getattr(experts, name), lin.weight, e, self.transposed)
                if self.bias:
                    _write_back(getattr(experts, f"{name}_bias"), lin.bias, e, False)
        return experts


@torch.no_grad()
def _write_back(original: torch.Tensor, mine: torch.Tensor, index: int | None, transposed: bool) -> None:
    """Put ``mine`` (a Linear's tensor) into its place in ``original``: entry ``index`` of a fused tensor (None: the
    whole tensor), transposed back where it was taken transposed. ``original`` follows ``mine`` to its dtype and
    device first; nothing is copied where ``mine`` is still a view of that very place."""
    if original.dtype != mine.dtype or original.device != mine.device:
        original.data = original.data.to(mine.device, mine.dtype)
    dst = original.data if index is None else original.data[index]
    dst = dst.t() if transposed else dst
    if dst.data_ptr() != mine.data_ptr():
        dst.copy_(mine)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and module.weight.dim() == 2 and hasattr(module, "nf")


class Conv1DLinear(nn.Linear):
    """An HF ``Conv1D`` (``y = x W + b``, ``W [in, out]``) as an ``nn.Linear`` whose weight is the view ``W.t()``
    ``[out, in]`` and whose bias is the same tensor: the same ``addmm``, no copy. Holds the Conv1D to put it back."""

    def __init__(self, conv: nn.Module) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no weights of its own to initialise
        self.in_features, self.out_features = conv.weight.shape
        self.weight = nn.Parameter(conv.weight.data.t(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.data, requires_grad=False)
        object.__setattr__(self, "original", conv)

    def write_back(self) -> nn.Module:
        conv = self.original
        _write_back(conv.weight, self.weight, None, True)
        if self.bias is not None:
            _write_back(conv.bias, self.bias, None, False)
        return conv


#: The layouts taken as Linears: (recognises a module, builds its Linear form).
_LAYOUTS = ((_is_fused_experts, lambda m: ExpertLinears(m)), (_is_conv1d, lambda m: Conv1DLinear(m)))


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _converted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ExpertLinears, Conv1DLinear))]


def as_linears(model: nn.Module) -> int:
    """Swap every fused-experts and ``Conv1D`` module of ``model`` for its Linear form (views, no copy). Call after
    the weights are placed (a later ``.to()`` gives the views their own storage; :func:`hf_layout` copes). Returns
    how many modules were swapped."""
    found = [(n, build) for n, m in model.named_modules() for match, build in _LAYOUTS if match(m)]
    for name, build in found:
        _swap(model, name, build(model.get_submodule(name)))
    if found:
        log.info("%d modules stored in another layout (fused experts, Conv1D) taken as Linear views", len(found))
    return len(found)


def restore_layouts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Put transformers' own modules back, holding the current (pruned) weights; the inverse of :func:`as_linears`.
    Returns the Linear forms taken out (name, module), for :func:`hf_layout` to put back."""
    converted = _converted(model)
    for name, module in converted:
        _swap(model, name, module.write_back())
    return converted


@contextmanager
def hf_layout(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in transformers' own layout (for ``save_pretrained``, ``state_dict``) inside the block."""
    converted = restore_layouts(model)
    try:
        yield model
    finally:
        for name, module in converted:
            _swap(model, name, module)


#: The config fields that give a mixture of experts' expert count (Mixtral and gpt-oss; Qwen-MoE and OLMoE; DeepSeek).
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def text_config(model: nn.Module):
    """The config of a model's language part (a multimodal config nests it; a text model's is its own), or None
    for a module without a config."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def expert_counts(model: nn.Module) -> frozenset[int]:
    """The expert counts ``model``'s config gives (:data:`EXPERT_FIELDS`, read from its text config where a multimodal
    config nests one): empty for a dense model, a module without a config, or a count of one (no routing)."""
    text = text_config(model)
    return frozenset(v for v in (getattr(text, k, None) for k in EXPERT_FIELDS)
                     if isinstance(v, int) and not isinstance(v, bool) and v > 1)


def _same_linears(experts: nn.ModuleList) -> list[str]:
    """The Linear names (relative to an expert) every child of ``experts`` holds with the same shapes, or [] when
    the children are not identical modules holding Linears."""
    if len({type(c) for c in experts}) != 1:
        return []
    layouts = [[(n, tuple(m.weight.shape)) for n, m in c.named_modules() if isinstance(m, nn.Linear)] for c in experts]
    return [n for n, _ in layouts[0]] if layouts[0] and all(x == layouts[0] for x in layouts) else []


def expert_lists(block: nn.Module, experts: Collection[int] = ()) -> list[tuple[str, nn.ModuleList]]:
    """The lists of experts inside ``block``, a decoder block, by role, as (name relative to ``block``, list): every
    :class:`ExpertLinears` (fused experts taken as Linears at load), and every ``nn.ModuleList`` whose length is one of
    ``experts`` (:func:`expert_counts`) and whose children are identical modules holding the same ``nn.Linear``
    projections: transformers' older layouts and remote-code MoEs (``gate_proj``/``up_proj``/``down_proj``,
    ``w1``/``w2``/``w3``). A list inside a found list is not another. Only inside a block: the list of blocks itself
    may be as long as the experts are many."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in block.named_modules():
        if any(name.startswith(f"{n}.") for n, _ in found):
            continue
        if isinstance(module, ExpertLinears) or (isinstance(module, nn.ModuleList) and len(module) in experts
                                                 and _same_linears(module)):
            found.append((name, module))
    return found


def expert_groups(block: nn.Module, block_name: str, experts: Collection[int] = ()) -> list[list[str]]:
    """The prunable names of one projection across the experts of each list of :func:`expert_lists` in ``block`` (a
    decoder block named ``block_name``): the groups whose statistics pool (:func:`..data.calibration.pool_rare_experts`).
    ``experts``: the config's expert counts (:func:`expert_counts`); left empty, only :class:`ExpertLinears` are found,
    which is also all a call on the whole model may look for (there the list of blocks could pass for experts;
    :func:`.loading.model_expert_groups` looks block by block)."""
    groups = []
    for name, module in expert_lists(block, experts):
        prefix = ".".join(p for p in (block_name, name) if p)
        for proj in _same_linears(module):  # "" where the experts are Linears themselves: ModuleList(nn.Linear)
            groups.append([".".join(p for p in (prefix, str(e), proj) if p) for e in range(len(module))])
    return groups
