"""UniPruning's search: learn the saliency Γ by mirror descent anchored to a local metric.

Per prunable matrix, with S(W, X) the local metric on the step's batch (spec §1.2-1.3):

    V ← V + α·(S − Γ)        dual step (α = ``schedule.dual_step``, 0.01 in the reference)
    Γ ← prox_{λΩ}(V)          soft-threshold (``regularizer``)

Two weight modes:
- ``drift`` (reference): W moves by AdamW on the causal-LM loss (gradients accumulated across
  steps and clipped, linear warm-up and decay), plus ρ times the gradient of ½‖Γ − S(W)‖²; S is
  computed on the drifted W. At the end the original W is restored bit for bit: only Γ is kept.
- ``frozen``: W never changes, so every matrix's recursion is independent and Γ becomes an
  exponential average of per-sample metrics (spec §1.5). The loop then runs matrix by matrix on
  per-sample statistics taken in one calibration pass: no forward pass inside the search (:mod:`.frozen`).

Where W does not depend on Γ (frozen mode, or drift with ρ = 0) the step metrics do not depend on λ
either, so one pass can carry several λ "lanes" (``LamSibling``): each lane only adds its own V, Γ
and prox to a step. Random streams are kept apart for that: the metric's draws come from one
generator, each lane's prox (quantile sampling) from its own, seeded alike, so a lane's Γ is bit for
bit the Γ of a search with that λ alone. The generators live on the device of the weights they score, so
the draws happen where the weights are (on a GPU, not one CPU thread); on the CPU they are the same as ever.
Checkpoints are written and read one matrix at a time (:mod:`.state`). The drift loop is the same in one
process and over the ranks of a ``torchrun`` launch with FSDP2 (:mod:`.shards` says how it sees a matrix there).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..metrics import LocalMetric
from ..models.loading import model_expert_groups
from ..core.pinned import HostCopy, empty_host_cache, pageable
from ..core.progress import track
from .log import SearchLog, sample_index
from .recompute import StepStats, activation_checkpointing
from .placement import master_copy, search_state_of
from .regularizers import L1Prox
from .shards import Whole
from .settings import SearchSettings, drift_element_size
from .state import Checkpoint, SearchState, write_checkpoint

log = logging.getLogger(__name__)

#: Seeds of the prox generators sit this far above the metric's, so the two streams never meet.
_PROX_SEED_OFFSET = 1 << 40


@dataclass
class LamSibling:
    """Another λ searched in the same pass as the run's own (only where W does not depend on Γ).

    The search fills ``gamma``; it stays None when the lane was dropped (a resumed search carries
    only its own λ, since checkpoints hold only its state)."""

    prox: L1Prox
    log_path: Path
    gamma: dict[str, torch.Tensor] | None = None


def prox_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_PROX_SEED_OFFSET + seed)


class _DriftLane(NamedTuple):
    """One λ of a drift search: its V/Γ state, its prox with that prox's generator, its log."""

    state: SearchState
    prox: L1Prox
    prox_gen: torch.Generator
    log: SearchLog


def dual_step(v: torch.Tensor, gamma: torch.Tensor, metric: torch.Tensor, alpha: float) -> None:
    """V ← V + α(S − Γ), in place."""
    v.add_(metric - gamma, alpha=alpha)


# ----------------------------------------------------------------------------------------------
# drift mode


def alignment_grad(w: torch.Tensor, gamma: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """∂/∂W ½‖Γ − S(W)‖² with S treated as locally linear in |W| (S_ij ≈ a_ij·|W_ij|).

    Exact for magnitude and Wanda; for RIA-type metrics it ignores the (second-order) dependence
    of the row/column normalisers on W.
    """
    wf = w.detach().float()
    slope = torch.where(wf != 0, metric / wf.abs().clamp_min(1e-30), torch.zeros_like(metric))
    return (-(gamma - metric) * slope * wf.sign()).to(w.dtype)


def search_drift(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    windows: torch.Tensor,
    metric: LocalMetric,
    prox: L1Prox,
    settings: SearchSettings,
    ckpt: Path,
    fp: str,
    log_path: Path,
    siblings: Sequence[LamSibling] = (),
    shards: Whole = Whole(),
) -> tuple[dict[str, torch.Tensor], float]:
    """Γ of every matrix while W drifts by AdamW on the LM loss; W is restored at the end.

    ``siblings`` (other λ) need ρ = 0: only then is W's path, and so every step metric, the same
    for all λ. ``shards``: :class:`.shards.RowShards` when ``model`` is sharded by FSDP2 over the ranks of a
    launch: every rank calls this, rank 0 alone writes the log and checkpoints and gets Γ (the others get {})."""
    if siblings and (settings.rho != 0 or shards.ranks.sharded):
        raise ValueError("λ siblings need schedule.rho=0 and one process: with ρ > 0 each λ's Γ steers W differently")
    names = list(layers)
    params = [layers[n].weight for n in names]
    locals_ = [shards.local(p) for p in params]
    # The restore copy lives on the host (pinned where it goes back to a GPU, ..pinned): device memory is for the
    # search.
    restore = HostCopy(dict(enumerate(locals_)))
    device = shards.device_for(params[0])  # where the metric, dual step and prox run (a GPU under FSDP's CPU offload)
    whole = {n: layers[n].weight.shape for n in names}
    shapes = {n: t.shape for n, t in zip(names, locals_)}  # V and Γ: this rank's rows (all of them in one process)
    # V and Γ live on the weights' device, or in (pinned) host memory, moved one matrix at a time (always so where
    # the weights themselves are offloaded to the host).
    offloaded = params[0].device != device
    settings = replace(settings, search_state="host" if offloaded else search_state_of(settings, locals_, shards.ranks))
    state_device = device if settings.search_state == "device" else torch.device("cpu")
    pin = state_device.type == "cpu" and device.type == "cuda"
    state = SearchState.zeros(shapes, state_device, pin)
    saved = Checkpoint.open(ckpt, fp)
    start = saved.step if saved is not None else 0
    # The metric's and the prox's draws on the weights' device (stochRIA's subsets: not one CPU thread per weight).
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    prox_gen = prox_generator(settings.seed, device)
    amp = master_copy(params, settings)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                            weight_decay=settings.weight_decay,
                            fused=True if params[0].device.type == "cuda" else None)  # no foreach temporaries of all W on a GPU
    sched = settings.lr_scheduler(opt)
    # Only the prunable weights drift. With grad_clip_scope=model the other parameters (embeddings, norms,
    # lm_head) get gradients too, accumulated and clipped with the rest but never applied: the reference's global
    # norm (spec §1.3 step 2). Flags and gradients are restored at the end.
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    prunable = {id(p) for p in params}
    others = {k: p for k, p in model.named_parameters() if id(p) not in prunable} \
        if settings.grad_clip_scope == "model" else {}
    for p in [*params, *others.values()]:
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)
    clipped = [p for p in model.parameters() if p.requires_grad]  # in the model's order, as HF clips (same norm bits)
    if saved is not None:
        _restore_drift(saved, state, names, params, others, opt, sched, gen, prox_gen, shards)
        log.info("resuming the drift search at step %d from %s", start, ckpt)
        if siblings:
            log.info("resumed search: only this run's λ; the other λ of the sweep are searched by their own jobs")
            siblings = ()
    lanes = [_DriftLane(state, prox, prox_gen, SearchLog(log_path if shards.writer else None, start))]  # own λ first
    lanes += [_DriftLane(SearchState.zeros(shapes, state_device, pin), s.prox, prox_generator(settings.seed, device),
                         SearchLog(s.log_path, 0)) for s in siblings]
    index = {n: sample_index(layers[n].weight.numel(), settings.seed + i) for i, n in enumerate(names)}
    hooks = StepStats(layers, model_expert_groups(model), settings.min_expert_tokens)
    recomputed = activation_checkpointing(model, True) if settings.activation_checkpointing else []
    t0 = time.perf_counter()
    try:
        for step in track(range(start, settings.steps), "search (drift W)", total=settings.steps - start):
            # no cache of the casts: it would keep a low-precision copy of every fp32 master weight (2 bytes per
            # weight) until the autocast region ends; a cast is redone per use instead (the same bits)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None, cache_enabled=False):
                loss = _lm_backward(model, windows, step, settings)
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(clipped, settings.grad_clip)
            stats = hooks.take()
            lr = opt.param_groups[0]["lr"]
            accumulated = _score_and_update(params, names, stats, metric, gen, lanes, settings, shards)
            _weight_step(accumulated, opt)
            sched.step()
            if not settings.accumulate_grads_across_steps:
                for p in clipped:
                    p.grad.zero_()
            for lane in lanes:
                lane.state.step = step + 1
                lane.log.write({"step": step + 1, "loss": loss, "lr": lr, "seconds": round(time.perf_counter() - t0, 3),
                                **shards.summarise(lane.state.gamma, index, whole)})
            if state.step % settings.checkpoint_every == 0 and state.step < settings.steps:
                _save_drift(state, names, params, others, opt, gen, prox_gen, ckpt, fp, shards)
    finally:
        hooks.remove()
        activation_checkpointing(model, False, recomputed)
        with torch.no_grad():
            for p in others.values():
                p.grad = None
            _restore_weights(params, locals_, restore.tensors, amp is not None)
            for p, flag in flags.items():
                p.requires_grad_(flag)
    b = locals_[0].element_size()
    restore.release()
    for lane in lanes:  # V is done with; Γ leaves the pinned arenas for pageable memory, which then go back to the OS
        lane.state.free("v")
    for sibling, lane in zip(siblings, lanes[1:]):
        sibling.gamma = {n: pageable(g) for n, g in lane.state.gamma.items()}
        lane.state.free("gamma")
    gamma = {}
    for n, g in state.gamma.items():  # one matrix at a time gathered; rank 0 keeps it
        g = shards.gather(g, whole[n][0])
        if shards.writer:
            gamma[n] = pageable(g)
        del g
    state.free("gamma")
    del lanes, state
    empty_host_cache()
    # V, Γ (fp32) per λ; the gradient and Adam's m and v in the drift dtype (torch's AdamW allocates them like
    # the drifting W); the restore copy of W (on the host). One matrix's step metric S comes on top.
    drift = drift_element_size(settings.drift_dtype, b)
    bytes_pp = 4.0 * 2 * (1 + len(siblings)) + 3.0 * drift + b
    return gamma, bytes_pp


def _restore_weights(params, locals_, original: dict, from_master: bool) -> None:
    """W back to its original values (``original``: index -> copy; and dtype, from an fp32 master copy), gradients
    dropped. A function of its own so that no loop variable keeps a view of the pinned restore copy alive once the
    caller releases it."""
    for p, t, w0 in zip(params, locals_, original.values()):
        t.copy_(w0)
        p.grad = None
        if from_master:  # back from the fp32 master copy to the weights' own dtype (exact)
            p.data = p.data.to(w0.dtype)


def _lm_backward(model: nn.Module, windows: torch.Tensor, step: int, settings: SearchSettings) -> float:
    device = next(model.parameters()).device
    total = 0.0
    extra = {"output_router_logits": True} if settings.router_aux_loss else {}
    for k in range(settings.grad_accumulation):
        x = windows[(step * settings.grad_accumulation + k) % windows.shape[0]].unsqueeze(0).to(device)
        loss = model(input_ids=x, labels=x, use_cache=False, **extra).loss / settings.grad_accumulation
        loss.backward()
        total += float(loss.detach())
    return total


def _score_and_update(params, names, stats, metric: LocalMetric, gen: torch.Generator, lanes, settings: SearchSettings,
                      shards: Whole = Whole()):
    """One pass over the matrices, one at a time: the step metric S on the pre-update W, the ρ alignment
    gradient for this step's weight update, then each λ lane's dual step and prox. Only one matrix's S is alive
    at a time (spec §1.2-1.3; the order of the metric's and the proxes' random draws is that of a pass over every
    S first, so Γ is the same).

    With ρ > 0, W's gradient for this step becomes a new tensor, accumulated + ρ·∂/∂W ½‖Γ − S‖², and the
    accumulated gradient is returned as ``(param, accumulated)`` pairs, untouched, for :func:`_weight_step` to put
    back: adding and later subtracting the term in place would leave its rounding error in the accumulator (bf16).
    Sharded (FSDP2): S of the whole matrix on every rank, then each rank its rows (see :mod:`.shards`)."""
    accumulated = []
    for p, n in zip(params, names):
        dev = shards.device_for(p)
        m = shards.rows(metric.score(shards.full(p).to(dev), stats[n], generator=gen if metric.stochastic else None))
        if settings.rho > 0:  # Γ before this step's dual step, on W's device (V and Γ may live elsewhere)
            w = shards.local(p).to(dev)
            g = alignment_grad(w, lanes[0].state.gamma[n].to(dev), m)
            accumulated.append((p, p.grad))
            p.grad = shards.grad_plus(p.grad, settings.rho * g)
            del g
        for lane in lanes:
            held_v, held_g = lane.state.v[n], lane.state.gamma[n]
            if settings.search_state == "host":  # V and Γ come to W's device for this matrix, then go back
                v, g = held_v.to(dev, non_blocking=True, copy=True), held_g.to(dev, non_blocking=True, copy=True)
                dual_step(v, g, m, settings.dual_step)
                held_v.copy_(v)
                held_g.copy_(lane.prox(v, lane.prox_gen, shards.magnitudes(v, p.shape)))
            else:
                dual_step(held_v, held_g, m.to(held_v.device), settings.dual_step)
                lane.state.gamma[n] = lane.prox(held_v, lane.prox_gen, shards.magnitudes(held_v, p.shape))
        del m
    return accumulated


def _weight_step(accumulated, opt) -> None:
    """One AdamW step on W; then each gradient the ρ term replaced goes back to the accumulated one, bit for bit."""
    opt.step()
    for p, acc in accumulated:
        p.grad = acc


def _save_drift(state, names, params, others, opt, gen, prox_gen, ckpt, fp, shards: Whole = Whole()) -> None:
    """Checkpoint one matrix at a time: its V and Γ, W, W's gradient and Adam's moments (only that matrix's
    tensors are on the host at once), then the RNG states, Adam's step and the accumulated gradients of the
    other parameters (``grad_clip_scope=model``: they enter the clipping norm of every later step).
    Sharded: every rank gathers each tensor whole, in the same order; rank 0 alone writes (the single-process
    format, so a checkpoint does not depend on the number of ranks)."""
    def groups():
        for n, p in zip(names, params):
            rows = p.shape[0]
            yield n, {"gamma": shards.gather(state.gamma[n], rows), "v": shards.gather(state.v[n], rows),
                      "w": shards.full(p), "grad": shards.full(p.grad), "exp_avg": shards.full(opt.state[p]["exp_avg"]),
                      "exp_avg_sq": shards.full(opt.state[p]["exp_avg_sq"])}

    extra = ((k, {"grad": shards.full(p.grad)}) for k, p in others.items())
    common = {"generator": gen.get_state(), "prox_generator": prox_gen.get_state(),  # CPU bytes, also for CUDA
              "adam_step": torch.tensor([float(opt.state[params[0]]["step"])])}
    if shards.writer:
        write_checkpoint(ckpt, fp, state.step, groups(), common, extra)
    else:  # the same gathers, one group at a time, nothing written
        for _ in itertools.chain(groups(), extra):
            pass


def _restore_drift(saved: Checkpoint, state, names, params, others, opt, sched, gen, prox_gen,
                   shards: Whole = Whole()) -> None:
    """Read ``saved`` into the search's own tensors (V, Γ, W, gradients, new Adam moments), one matrix at a time
    (sharded: every rank reads each matrix and keeps its rows)."""
    common = saved.common()
    group = opt.param_groups[0]
    on_device = group.get("fused") or group.get("capturable")  # where AdamW itself keeps its step count
    with torch.no_grad():
        for n, p in zip(names, params):
            t = saved.read(n)
            state.v[n].copy_(shards.rows(t["v"]))
            state.gamma[n].copy_(shards.rows(t["gamma"]))
            shards.local(p).copy_(shards.rows(t["w"]))
            shards.local(p.grad).copy_(shards.rows(t["grad"]))
            opt.state[p] = {"step": torch.tensor(float(common["adam_step"][0]), dtype=torch.float32,
                                                 device=p.device if on_device else "cpu"),
                            "exp_avg": shards.like(p, t["exp_avg"]),
                            "exp_avg_sq": shards.like(p, t["exp_avg_sq"])}
            del t
        for k, p in others.items():
            shards.local(p.grad).copy_(shards.rows(saved.read_extra(k)["grad"]))
    gen.set_state(common["generator"])
    prox_gen.set_state(common["prox_generator"])
    state.step = saved.step
    sched.last_epoch = saved.step  # where the schedule stood, without replaying its steps
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(saved.step)
