"""UniPruning's search with W frozen (``schedule.weight_mode=frozen``, spec §1.5).

W never changes, so every matrix's recursion V ← V + α(S − Γ), Γ ← prox(V) is independent and Γ becomes an
exponential average of per-sample metrics. The loop runs matrix by matrix on per-sample statistics taken in one
calibration pass: no forward pass inside the search. Checkpoints every ``checkpoint_every`` matrices.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..pruning.masks import count_zeros
from ..metrics import LocalMetric
from ..core.progress import track
from ..data.stats import ActivationStats
from .log import SearchLog, gamma_summary, sample_index
from .mirror_descent import LamSibling, dual_step, prox_generator
from .regularizers import L1Prox
from .settings import SearchSettings
from .state import SearchState

log = logging.getLogger(__name__)


def search_frozen(
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, ActivationStats],
    metric: LocalMetric,
    prox: L1Prox,
    settings: SearchSettings,
    ckpt: Path,
    fp: str,
    log_path: Path,
    siblings: Sequence[LamSibling] = (),
) -> tuple[dict[str, torch.Tensor], float]:
    """Γ of every matrix with W fixed. Matrix-outer, step-inner; checkpoint every k matrices.

    Step n of matrix i uses the statistics of calibration sample n mod nsamples, and its random
    draws come from generators seeded by (seed, i): the result does not depend on the order in
    which matrices are processed, which makes resuming bit-exact. ``siblings`` get their Γ from the
    same step metrics.
    Returns (Γ per matrix, state bytes per parameter while a matrix is processed).
    """
    names = list(weights)
    metric = metric.for_repeated_scoring()
    log.info("frozen search: metric %s", metric)
    state = SearchState.load(ckpt, fp) or SearchState()
    done = state.step
    if done and siblings:
        log.info("resumed search: only this run's λ; the other λ of the sweep are searched by their own jobs")
        siblings = ()
    lanes = [_FrozenLane(prox, log_path, settings.steps, dict(state.gamma))]
    lanes += [_FrozenLane(s.prox, s.log_path, settings.steps, {}) for s in siblings]
    for i, name in enumerate(track(names, "search (frozen W)")):
        if i < done:
            continue
        for lane, gamma in zip(lanes, _search_one_frozen(i, name, weights[name], stats[name], metric, lanes, settings)):
            lane.gammas[name] = gamma
        if (i + 1) % settings.checkpoint_every == 0 and i + 1 < len(names):
            SearchState(gamma=lanes[0].gammas, step=i + 1).save(ckpt, fp)
    for lane in lanes:
        lane.write_log()
    for sibling, lane in zip(siblings, lanes[1:]):
        sibling.gamma = lane.gammas
    return lanes[0].gammas, 8.0 * len(lanes)


class _FrozenLane:
    """One λ of a frozen search: its prox, its Γ per matrix, and its per-step log accumulators."""

    def __init__(self, prox: L1Prox, log_path: Path, steps: int, gammas: dict[str, torch.Tensor]) -> None:
        self.prox, self.log_path, self.gammas = prox, log_path, gammas
        self.per_step = [{"zeros": 0, "numel": 0, "abs_sum": 0.0, "samples": [], "seconds": 0.0} for _ in range(steps)]

    def record(self, n: int, gamma: torch.Tensor, index: torch.Tensor, seconds: float) -> None:
        acc = self.per_step[n]
        acc["zeros"] += count_zeros(gamma)
        acc["numel"] += gamma.numel()
        acc["abs_sum"] += float(gamma.abs().sum())
        acc["samples"].append(gamma.reshape(-1)[index].cpu())
        acc["seconds"] += seconds

    def write_log(self) -> None:
        """One row per step, summed over the matrices searched in this process (all unless resumed)."""
        rows = SearchLog(self.log_path, 0)
        elapsed = 0.0
        for n, acc in enumerate(self.per_step):
            if acc["numel"] == 0:
                continue
            elapsed += acc["seconds"]
            rows.write({"step": n + 1, "loss": None, "lr": 0.0, "seconds": round(elapsed, 3),
                        "matrices": len(acc["samples"]),
                        **gamma_summary(torch.cat(acc["samples"]), acc["zeros"], acc["numel"], acc["abs_sum"])})


def _search_one_frozen(i: int, name: str, w: torch.Tensor, stats: ActivationStats, metric: LocalMetric,
                       lanes: Sequence[_FrozenLane], settings: SearchSettings) -> list[torch.Tensor]:
    if stats.sample_mean_sq is None:
        raise ValueError(f"{name}: frozen search needs per-sample statistics (calibrate with want_per_sample)")
    seed = settings.seed * 1_000_003 + i
    gen = torch.Generator(device=w.device).manual_seed(seed)  # draws where W is (CPU: the same draws as ever)
    prox_gens = [prox_generator(seed, w.device) for _ in lanes]
    vs = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for _ in lanes]
    gammas = [torch.zeros_like(v) for v in vs]
    nsamples = stats.sample_mean_sq.shape[0]
    tokens = max(1, stats.count // nsamples)
    index = sample_index(w.numel(), settings.seed + i)
    for n in range(settings.steps):
        t0 = time.perf_counter()
        s = ActivationStats.from_mean_sq(stats.sample_mean_sq[n % nsamples], tokens)
        score = metric.score(w, s, generator=gen if metric.stochastic else None)
        shared = time.perf_counter() - t0
        for k, lane in enumerate(lanes):
            t1 = time.perf_counter()
            dual_step(vs[k], gammas[k], score, settings.dual_step)
            gammas[k] = lane.prox(vs[k], prox_gens[k])
            lane.record(n, gammas[k], index, shared + time.perf_counter() - t1)
    return [g.cpu() for g in gammas]
