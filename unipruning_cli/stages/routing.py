"""The routing statistics an experts cut ranks experts by (``pattern=experts``): one pass of the calibration samples
through the dense model with every MoE layer observed (:class:`..pruning.experts.RoutingObserver`), saved to the run
directory as ``routing.safetensors`` (per layer, the tokens routed to each expert and REAP's sums) and kept on the
run's context for every cut of the run."""

from __future__ import annotations

import logging

from ..core.context import RunContext
from ..core.rundir import atomic_save_tensors
from ..pruning.block_loop import block_pass
from ..pruning.experts import ExpertRouting, RoutingObserver, moe_layers, top_k_of

log = logging.getLogger(__name__)

#: The run directory's file of routing statistics.
ROUTING_FILE = "routing.safetensors"


def routing_of(ctx: RunContext) -> ExpertRouting:
    """The dense model's routing on the run's calibration samples (``ctx.model`` unchanged), measured once per run and
    saved to ``ctx.rd/routing.safetensors`` (``<experts>.tokens`` int64 ``[E]``, ``<experts>.reap`` float64 ``[E]``
    where the layout shows the router weights). Raises :class:`..core.errors.UserError` for a model without MoE
    layers or an activation overflow in the pass."""
    if ctx.routing is not None:
        return ctx.routing
    model = ctx.model
    layers = moe_layers(model)
    with ctx.timer.stage("routing"), RoutingObserver(layers, model) as observer:
        block_pass(model, ctx.calibration()[0], lambda i, block_layers, stats: None, ctx.passes, sequential=False,
                   apply=False)
    stats = observer.stats
    tensors = {f"{name}.tokens": s.tokens for name, s in stats.items()}
    tensors.update({f"{name}.reap": s.reap for name, s in stats.items() if s.reap is not None})
    if ctx.rd is not None:
        atomic_save_tensors(ctx.rd / ROUTING_FILE, tensors, {"top_k": str(top_k_of(model))})
    never = {name: int((s.tokens == 0).sum()) for name, s in stats.items() if (s.tokens == 0).any()}
    if never:
        log.warning("pattern=experts: experts never routed to on the calibration tokens (their frequency and REAP "
                    "scores are 0): %s", ", ".join(f"{n}: {k}" for n, k in list(never.items())[:4]))
    shapes = {n: tuple(ctx.layers[n].weight.shape) for layer in layers for names in layer.matrices for n in names}
    ctx.routing = ExpertRouting(layers, stats, shapes, top_k_of(model))
    return ctx.routing


def drop_unscored(targets: list, primary, model) -> list:
    """``targets`` without the REAP cuts a run adds beside another primary score where some MoE layer's experts are a
    Linear list (their router weights are applied outside it, so REAP cannot be measured; a REAP primary is refused
    before any weight is read), saying so; unchanged otherwise."""
    if not primary.is_experts or all(layer.fused for layer in moe_layers(model)):
        return targets
    dropped = [t.tag for t in targets if t.is_experts and t.score == "reap" and t != primary]
    if dropped:
        log.warning("pattern=experts: %s left out: the experts are a list of Linear experts, whose router weights "
                    "REAP needs are applied outside them", ", ".join(dropped))
    return [t for t in targets if t.tag not in dropped]
