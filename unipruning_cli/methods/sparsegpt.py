"""``method=sparsegpt``: SparseGPT (Frantar & Alistarh 2023), OBS with blocked lazy updates: each block's mask is
chosen as its kept weights are updated, block by block on the outputs of the already-pruned blocks (§3.4)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import check
from ..stages.prune import blockwise_cuts
from ..core.context import RunContext
from ..pruning.method import Cuts, Method, register_method
from ..pruning.blockwise import SparseGPTPruning


@dataclass
class SparseGPTSettings:
    """``configs/method/sparsegpt.yaml``: the OBS solve's columns per lazy-update block and its dampening (a share
    of the Hessian's mean diagonal), the reference's 128 and 0.01."""

    blocksize: int = 128
    percdamp: float = 0.01


@register_method("sparsegpt")
class SparseGPT(Method):
    """SparseGPT: prunes and reconstructs the kept weights; its own blocks of columns choose the mask."""

    Settings = SparseGPTSettings
    updates_weights = True

    def allocation(self, asked: str | None) -> str:
        """Its mask is chosen per block of ``blocksize`` columns as it goes (adaptive mask selection, §3.2): a
        label for metrics.json and tags; ``pattern.allocation`` does not apply (:meth:`check` refuses it)."""
        return "per_block"

    def calibration_mode(self) -> str:
        return "sequential"

    def check(self) -> None:
        super().check()
        cfg, s = self.cfg, self.settings
        check(s.blocksize > 0, f"method.blocksize={s.blocksize} must be a positive number of columns")
        check(s.percdamp >= 0, f"method.percdamp={s.percdamp} must be at least 0 (a share of the Hessian's mean "
              "diagonal)")
        check(cfg.pattern.allocation is None, f"method=sparsegpt chooses its mask per block of {s.blocksize} columns "
              f"as it updates the weights (SparseGPT §3.2), so pattern.allocation={cfg.pattern.allocation} would be "
              "ignored: drop it")

    def plan_rows(self, sheet) -> None:
        s = sheet.s
        sheet.calibration()
        # The block's XᵀX (fp32), then for the widest layer its Hessian, the copy the solve damps, the Cholesky
        # factor, the inverse and its factor (5 x I² fp32) and fp32 working copies of the largest matrix (3 x).
        obs = 4 * s["xtx_block"] + 5 * s["I_max"] ** 2 * 4 + 3 * s["L_max"] * 4
        sheet.add("prune", sheet.Wo + sheet.Wb + obs, sheet.block_io + sheet.P / 8,
                  f"W{sheet.one} + the block's XᵀX + OBS buffers of the widest layer (5 x I² fp32); masks packed "
                  "on the host")
        sheet.pruned_eval_in_place()

    def masks(self, ctx: RunContext) -> Cuts:
        return blockwise_cuts(ctx, SparseGPTPruning(self.settings.blocksize, self.settings.percdamp))
