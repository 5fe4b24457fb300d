"""``method=local``: rank weights by a local metric (magnitude, Wanda, RIA, stochRIA: the ``local_metric`` group) and
keep the top ones at the target, block by block under the metric's published protocol."""

from __future__ import annotations

from ..core.config import plain
from ..core.errors import check
from ..metrics import METRICS, build_metric
from ..stages.prune import blockwise_cuts
from ..core.context import RunContext
from ..pruning.method import Cuts, Method, register_method
from ..pruning.blockwise import LocalMetricPruning


@register_method("local")
class LocalMetric(Method):
    """Wanda / RIA / magnitude / stochRIA scores cut at one target (their reference code's loop)."""

    def label(self) -> str:
        return f"{self.name} ({self.cfg.local_metric.name})"

    def calibration_mode(self) -> str:
        """Sequential for activation-aware metrics (Wanda, RIA: their reference code calibrates block i on the
        outputs of the already-pruned blocks < i); one-shot for a data-free metric and for a cut that shares one
        budget over every matrix (it needs every score at once), removes whole experts or is FLAP's."""
        from ..pruning.targets import make_target

        uses = METRICS.get(self.cfg.local_metric.name).uses_activations
        target = make_target(self.cfg)  # whole experts: ranked on the dense model's routing, every layer at once;
        dense = target.is_experts or (target.is_sliced and target.score == "flap")  # FLAP: the dense model's inputs
        return "sequential" if uses and not (target.shares_budget or dense) else "one_shot"

    def check(self) -> None:
        super().check()
        cfg = self.cfg
        check(METRICS.get(cfg.local_metric.name).uses_activations or cfg.calibration.mode != "sequential",
              f"local_metric={cfg.local_metric.name} reads no calibration data, so calibration.mode=sequential would "
              "be ignored: drop it")

    def plan_rows(self, sheet) -> None:
        from ..pruning.targets import make_target

        if METRICS.get(self.cfg.local_metric.name).uses_activations:
            sheet.calibration()
        scores = 5 * sheet.P if make_target(self.cfg).shares_budget else 5 * sheet.s["L_max"]
        sheet.add("prune", sheet.Wo, scores + sheet.P / 8, "scores (fp32) and masks (every matrix's for a global cut, "
                                                           "else one matrix's) on the host; masks packed")
        sheet.pruned_eval_in_place()

    def pruner(self) -> LocalMetricPruning:
        """The block-wise pruner: the local metric with its knobs, its random draws seeded by the run's seed."""
        knobs = {k: v for k, v in plain(self.cfg.local_metric).items() if k != "name"}
        return LocalMetricPruning(build_metric(self.cfg.local_metric.name, **knobs), seed=self.cfg.seed)

    def masks(self, ctx: RunContext) -> Cuts:
        return blockwise_cuts(ctx, self.pruner())
