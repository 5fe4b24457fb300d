"""``method=unipruning`` (arXiv 2510.03291): the saliency Γ learned by mirror descent anchored to a local metric
(``local_metric``, ``regularizer``, ``schedule`` groups; :mod:`..search`), then cut at every target of the run from
|Γ|, beside the ``eval.baselines`` local metrics at the same targets; the weights stay the original ones."""

from __future__ import annotations

from ..stages.baselines import baseline_masks
from ..stages.prune import cut_masks
from ..stages.routing import routing_of
from ..stages.allocation import choose_allocations
from ..core.lazymap import LazyMap
from ..pruning.targets import AUTO
from ..data.calibration_set import dense_statistics
from ..pruning.channels import flap_scores
from ..stages.search import run_search
from ..core.context import RunContext
from ..pruning.method import Cuts, Method, register_method

#: Where ``pattern.allocation`` is null: ``auto``, per run and per target the allocation (per_row, per_matrix, global,
#: owl, gamma) whose masks give the lowest LM loss on calibration windows held out from the search
#: (:mod:`..stages.allocation`). OWL wins on the embedded model, per row on two held-out models at 70 % (issue 29), so
#: no fixed rule is kept as the default.
UNIPRUNING_ALLOCATION = AUTO


@register_method("unipruning")
class UniPruning(Method):
    """One search, every cut: ``unipruning prune`` with no overrides cuts Γ at 0.5, 0.6, 0.7 and 2:4, beside Wanda
    at the same targets from the same calibration statistics (one-shot), so the summary compares them."""

    searches = True
    stage = "search"
    default_cuts = {"sparsities": (0.5, 0.6, 0.7), "patterns": ("2:4",), "baselines": ("wanda@one_shot",)}

    def label(self) -> str:
        return f"{self.name} ({self.cfg.local_metric.name})"

    def default_allocation(self) -> str:
        return UNIPRUNING_ALLOCATION

    def backpropagates(self) -> bool:
        """The drift search (``schedule.weight_mode=drift``) backpropagates the LM loss through the whole model."""
        return self.cfg.schedule.weight_mode == "drift"

    def plan_rows(self, sheet) -> None:
        from ..stages.plan.rows import search_rows
        from ..pruning.targets import baselines_of

        frozen = self.cfg.schedule.weight_mode == "frozen"
        if frozen or baselines_of(self.cfg):
            sheet.calibration()
        search_rows(self.cfg, sheet)
        P, s, Wo, b = sheet.P, sheet.s, sheet.Wo, sheet.b
        # one cut's masks at a byte per weight as it is made, then every cut kept packed (mask_files.packed_masks)
        baselines = baselines_of(self.cfg)
        masks = 4 * P + 4 * s["L_max"] + P + sheet.cuts * (1 + len(baselines)) * P / 8
        sheet.add("masks", Wo, masks + (4 * P if baselines else 0),
                  "Γ, one matrix's |Γ|, one cut's masks, and every cut's masks packed (1 bit per weight) on the host")
        sheet.add("pruned_eval", Wo + sheet.Wb + sheet.logits, masks + sheet.restore_copy(b),
                  f"W{sheet.one} + logits; a copy of the prunable W on the host to restore it between cuts")

    def masks(self, ctx: RunContext) -> Cuts:
        gamma, calibration = run_search(ctx)
        if any(t.allocation == AUTO for t in ctx.targets):  # chosen on held-out calibration windows, per target
            with ctx.timer.stage("allocation"):
                ctx.targets, ctx.allocation_choices = choose_allocations(
                    ctx, LazyMap(gamma, lambda name: gamma[name].abs()), ctx.targets)
            ctx.primary = next(t for t in ctx.targets if t.tag == ctx.primary.tag)
        with ctx.timer.stage("masks"):
            experts = routing_of(ctx) if any(t.is_experts for t in ctx.targets) else None
            flap = None
            if any(t.is_sliced and t.score == "flap" for t in ctx.targets):  # the dense model's statistics
                flap = flap_scores(ctx.layers, dense_statistics(ctx.cfg, ctx.model, ctx.calibration()[0])[0])
            cuts = cut_masks(gamma, ctx.targets, ctx.rd, ctx.cfg.reconstruct, experts, flap)
            cuts |= baseline_masks(ctx)
        return Cuts(calibration, cuts)
