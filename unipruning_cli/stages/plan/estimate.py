"""Peak GPU and host memory of each stage of the run a config would start, from shapes alone (no weights).

The arithmetic follows what the code holds (docs/large-models.md; the fixed bytes per weight are the
ones ``scripts/bench_search_memory.py`` measures). Symbols: W the weights ((P + N)·b bytes, P prunable
weights, N the others, b bytes per weight element), L_max the largest prunable matrix, I_max its widest
input, B·T the evaluation batch, T_c the calibration window, V the vocabulary, h the width, L the blocks.
GiB = 2³⁰ bytes. A device is one GPU, or the host itself when the run has no GPU (its figures then add up
on the host). Raises :class:`UserError` (from :mod:`.architectures`) when the architecture cannot be read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from omegaconf import DictConfig

from ...pruning.method import method_of
from ...pruning.mask_solvers import MASK_SOLVERS
from ...pruning.targets import make_target, targets_of
from ...evaluation.perplexity import chunk_positions
from ...models.layouts import expert_counts
from ...models.loading import block_layers, find_blocks, prunable_layers, resolve_dtype, text_config
from ...core.provenance import rss_bytes
from .architectures import meta_model

from .rows import CUDA_OVERHEAD, GIB, TOKENISE_BYTES_PER_CHAR, USABLE, Sheet, Stage


@dataclass
class Plan:
    """The plan of one run: its stages, peaks (GiB, baselines included), placement and whether it fits."""

    model: str
    method: str
    weight_mode: str | None
    placement: str
    prunable_weights: int
    other_weights: int
    stages: list[Stage]
    host_baseline: float
    gpus: int
    gpu_memory: float | None
    host_memory: float | None
    onload: bool = False  # sequential onloading: the run loads with model.placement=onload
    ranks: int = 1  # processes of the launch: >1 runs the drift search with FSDP2 over them (torchrun)
    fsdp_offload: bool = False  # that search with FSDP's CPU offload (the plan's choice under schedule.fsdp_offload=auto)
    fits: bool = False
    advice: list[str] = field(default_factory=list)

    @property
    def peak_gpu(self) -> float:
        return (max(s.gpu for s in self.stages) + CUDA_OVERHEAD) if self.gpus else 0.0

    @property
    def peak_host(self) -> float:
        return self.host_baseline + max(s.host for s in self.stages)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "stages"}
        out.update(peak_gpu_gib=round(self.peak_gpu / GIB, 2), peak_host_gib=round(self.peak_host / GIB, 2),
                   stages=[{"stage": s.name, "gpu_gib": round(s.gpu / GIB, 2), "host_gib": round(s.host / GIB, 2),
                            "what": s.what} for s in self.stages])
        for k in ("host_baseline", "gpu_memory", "host_memory"):
            out[k] = None if out[k] is None else round(out[k] / GIB, 2)
        return out


def _shapes(cfg: DictConfig, dtype: torch.dtype) -> dict:
    model = meta_model(cfg.model, dtype)
    layers = prunable_layers(model)
    prunable = sum(m.weight.numel() for m in layers.values())
    blocks = find_blocks(model)[1]
    experts = expert_counts(model)
    in_blocks = sum(p.numel() for p in blocks.parameters())
    text = text_config(model)
    return {"P": prunable, "N": sum(p.numel() for p in model.parameters()) - prunable,
            "sizes": [m.weight.numel() for m in layers.values()],  # each prunable matrix (pinned arenas)
            "rows": [(p.shape[0] if p.dim() else 1, p.numel()) for p in model.parameters()],  # FSDP2's Shard(0)
            "L_max": max(m.weight.numel() for m in layers.values()),
            "I_max": max(m.weight.shape[1] for m in layers.values()),
            "sum_in": sum(m.weight.shape[1] for m in layers.values()),
            # Σ in² over one block's layers: the XᵀX every layer of the block accumulates before SparseGPT solves it
            "xtx_block": max(sum(m.weight.shape[1] ** 2 for m in block_layers(b, "", experts).values())
                             for b in blocks),
            "h": text.hidden_size, "V": text.vocab_size, "L": text.num_hidden_layers,
            "I": getattr(text, "intermediate_size", 4 * text.hidden_size),
            "outside": sum(p.numel() for p in model.parameters()) - in_blocks,
            "block": max(sum(p.numel() for p in b.parameters()) for b in blocks)}


def plan_run(cfg: DictConfig, gpus: int, gpu_memory: float | None, host_memory: float | None,
             ranks: int = 1) -> Plan:
    """The plan of ``unipruning prune`` with ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes (0: the CPU) and a
    host of ``host_memory`` bytes (None: not checked). ``model.placement=auto`` takes every weight to the GPU
    when that fits, else sequential onloading where the method allows it (not a one-process drift search).
    ``ranks`` > 1: a ``torchrun`` launch of that many processes (one GPU each), whose drift search runs with FSDP2
    over them and the rest of the run in rank 0; ``schedule.fsdp_offload=auto`` takes FSDP's CPU offload only
    where the search does not fit without it."""
    plan = _chosen_plan(cfg, gpus, gpu_memory, host_memory, ranks)
    if not plan.fits:
        plan.advice = _advice(cfg, plan)
    return plan


def _chosen_plan(cfg: DictConfig, gpus: int, gpu_memory: float | None, host_memory: float | None, ranks: int) -> Plan:
    placement = cfg.model.placement
    shapes = _shapes(cfg, resolve_dtype(cfg.model.dtype, torch.device("cuda" if gpus > 0 else "cpu")))
    if placement == "auto":
        whole = _plan_offload(cfg, gpus, gpu_memory, host_memory, "device", ranks, shapes)
        if whole.fits or not _can_onload(cfg, gpus, ranks):
            return whole
        onloaded = _plan_offload(cfg, gpus, gpu_memory, host_memory, "onload", ranks, shapes)
        return onloaded if onloaded.fits or onloaded.peak_gpu < whole.peak_gpu else whole
    return _plan_offload(cfg, gpus, gpu_memory, host_memory, placement, ranks, shapes)


def _plan_offload(cfg: DictConfig, gpus: int, gpu_memory: float | None, host_memory: float | None, placement: str,
                  ranks: int, shapes: dict) -> Plan:
    choice = str(cfg.schedule.fsdp_offload).lower()
    if ranks < 2 or choice in ("true", "false"):
        return _plan(cfg, gpus, gpu_memory, host_memory, placement, ranks, choice == "true", shapes)
    plain_ = _plan(cfg, gpus, gpu_memory, host_memory, placement, ranks, False, shapes)
    if plain_.fits or not gpus:
        return plain_
    offloaded = _plan(cfg, gpus, gpu_memory, host_memory, placement, ranks, True, shapes)
    return offloaded if offloaded.fits else plain_


def _can_onload(cfg: DictConfig, gpus: int, ranks: int = 1) -> bool:
    """Sequential onloading serves block-wise stages on a GPU, with no ``device_map``, and not a one-process drift
    search (over several ranks the search has its own placement, FSDP2, and rank 0 onloads for the rest)."""
    return gpus > 0 and not cfg.model.device_map and (not method_of(cfg).backpropagates() or ranks > 1)


def _plan(cfg: DictConfig, gpus: int, gpu_memory: float | None, host_memory: float | None, placement: str,
          ranks: int = 1, offload: bool = False, shapes: dict | None = None) -> Plan:
    on_gpu = gpus > 0
    onload = placement == "onload" and on_gpu
    dtype = resolve_dtype(cfg.model.dtype, torch.device("cuda" if on_gpu else "cpu"))
    s = shapes or _shapes(cfg, dtype)
    b = dtype.itemsize
    P, N, h, V = s["P"], s["N"], s["h"], s["V"]
    W = (P + N) * b
    Wd = W / (gpus if (on_gpu and cfg.model.device_map) else 1)  # device_map: weights split, search state on GPU 0
    # Sequential onloading: outside the blocks on the GPU; the blocks on the host, one at a time on the GPU.
    Wo, Wb, Wh = (s["outside"] * b, s["block"] * b, W - s["outside"] * b) if onload else (Wd, 0.0, 0.0)
    method = method_of(cfg)
    mode = cfg.schedule.weight_mode if method.searches else None
    n_c, T_c = cfg.calibration.nsamples, cfg.calibration.seqlen
    B, T = min(cfg.eval.batch_size, cfg.eval.max_windows or cfg.eval.batch_size), cfg.eval.seqlen
    # One chunk's logits: fp32 logits, their reshaped copy and the log-softmax (12 bytes each); in bf16/fp16 the
    # logits, their fp32 cast and the log-softmax (2 + 4 + 4).
    logits = (12 if b == 4 else 8 + b) * B * chunk_positions(B, T, V) * V
    one = " + one block" if onload else ""
    sheet = Sheet(cfg, s, b, P, N, Wd, Wo, Wb, Wh, logits, 2 * n_c * T_c * h * b, n_c * s["sum_in"] * 4 + s["sum_in"] * 8,
                  one, on_gpu, gpu_memory if on_gpu else None, ranks, offload, len(targets_of(cfg, make_target(cfg))))
    add, stages = sheet.add, sheet.stages
    add("load", Wo, W - Wh if on_gpu and not cfg.model.device_map else 0.0,
        "W (read on the host, then moved)" + ("; the blocks stay on the host" if onload else ""))
    chars = max(_corpus_bytes(c) for c in [cfg.calibration.source, *cfg.eval.corpora])
    if chars:
        add("tokenise", Wo, TOKENISE_BYTES_PER_CHAR * chars,
            "the largest file corpus tokenised as one string (hub corpora not counted)")
    if cfg.eval.dense:
        add("dense_eval", Wo + Wb + logits, 0.0, f"W{one} + fp32 logits of one chunk")
    method.plan_rows(sheet)
    if cfg.refine != "none" or cfg.reconstruct in MASK_SOLVERS:
        sheet.refine_reconstruct()
    if cfg.eval.tasks:
        add("zero_shot", Wo + Wb, P * b if method.searches else 0.0, f"W{one} under lm-eval (+ the host copy)")
    from .. import prune as pruning  # noqa: F401  (the baseline is a prune process's: the modules its stages run)
    from .. import dense_evaluation as dense  # noqa: F401
    from .. import search as stage  # noqa: F401

    sharded = ranks > 1 and method.backpropagates()
    where = "cpu" if not on_gpu else f"{1 if sharded else gpus} GPU(s)" + \
        (", device_map" if cfg.model.device_map else "") + (", sequential onloading" if onload else "")
    if sharded:
        where = f"search: FSDP2 over {ranks} ranks{' with CPU offload' if offload else ''}; then rank 0: {where}"
    plan = Plan(model=cfg.model.name, method=method.name, weight_mode=mode, placement=where,
                prunable_weights=P, other_weights=N, stages=stages, host_baseline=float(rss_bytes()) * ranks,
                gpus=gpus, gpu_memory=gpu_memory, host_memory=host_memory, onload=onload, ranks=ranks,
                fsdp_offload=offload and sharded)
    plan.fits = (not on_gpu or gpu_memory is None or plan.peak_gpu <= USABLE * gpu_memory) and \
        (host_memory is None or plan.peak_host <= USABLE * host_memory)
    return plan


def _corpus_bytes(source: str) -> int:
    """The size of a file or offline corpus (0 for a hub corpus, whose size is not known before it is fetched)."""
    from ...data.corpora import corpus_identity

    try:
        return int(corpus_identity(source).get("size", 0))
    except (OSError, KeyError, ValueError):
        return 0


def _advice(cfg: DictConfig, plan: Plan) -> list[str]:
    gpu_short = bool(plan.gpus) and plan.gpu_memory is not None and plan.peak_gpu > USABLE * plan.gpu_memory
    worst = max(plan.stages, key=lambda st: st.gpu if gpu_short else st.host)
    out = [f"the largest stage on the {'GPU' if gpu_short else 'host'} is {worst.name}: {worst.what}"]
    if method_of(cfg).backpropagates():
        if gpu_short and cfg.schedule.search_state != "host":
            out.append("schedule.search_state=host (V and Γ, 8 bytes per prunable weight, in pinned host memory)")
        out.append("schedule.weight_mode=frozen (W fixed: one matrix's search state at a time on the device)"
                   + _figures(cfg, plan, {"schedule": {"weight_mode": "frozen"}}))
        if gpu_short and plan.ranks < 2:
            out.append("several GPUs: torchrun --nproc-per-node N -m unipruning_cli prune ... shards the search with "
                       "FSDP2 (`unipruning plan --gpus N` says how many)")
    elif gpu_short and not plan.onload and _can_onload(cfg, plan.gpus):
        out.append("model.placement=onload (sequential onloading: the blocks in host memory, one at a time on "
                   "the GPU)" + _figures(cfg, plan, {"model": {"placement": "onload"}}))
    if worst.name in ("dense_eval", "pruned_eval"):
        out.append("a smaller eval.batch_size or eval.seqlen (the fp32 logits grow with both)")
    if gpu_short:
        out.append("more or larger GPUs (--gpus, --gpu-memory)")
    else:
        out.append("a machine with more host memory (--host-memory)")
    out.append("a smaller calibration.seqlen / calibration.nsamples")
    return out


def _figures(cfg: DictConfig, plan: Plan, change: dict) -> str:
    """`` (planned: GPU x GiB, host y GiB, fits)`` of ``cfg`` with ``change`` on the same machine."""
    from omegaconf import OmegaConf

    other = plan_run(OmegaConf.merge(cfg, change), plan.gpus, plan.gpu_memory, plan.host_memory)
    gpu = f"GPU {other.peak_gpu / GIB:.1f} GiB, " if other.gpus else ""
    return f" (planned: {gpu}host {other.peak_host / GIB:.1f} GiB, {'fits' if other.fits else 'does not fit either'})"


def check_run_fits(cfg: DictConfig, ranks: int = 1) -> Plan | None:
    """The plan of ``cfg`` on this machine (its visible GPUs and host memory; ``ranks``: the processes of this
    launch, one GPU each); raises :class:`UserError` with the plan's figures and what would fit when it does not.
    Called by ``unipruning prune`` before any weight is read (``plan_check=false`` skips it)."""
    import logging

    from ...core.errors import UserError
    from ...models.loading import resolve_device
    from ...core.provenance import host_total_bytes

    device = resolve_device(cfg.model.device)
    gpus = ((torch.cuda.device_count() if cfg.model.device_map else ranks) if device.type == "cuda" else 0)
    gpu_memory = torch.cuda.get_device_properties(device).total_memory if gpus else None
    try:
        plan = plan_run(cfg, gpus, gpu_memory, host_total_bytes(), ranks)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (an architecture the meta device cannot build: run unplanned, say so)
        logging.getLogger(__name__).warning("no memory plan for this model (%s: %s); running without one",
                                            type(err).__name__, err)
        return None
    if not plan.fits:
        gpu = f"peak GPU {plan.peak_gpu / GIB:.1f} GiB of {USABLE * gpu_memory / GIB:.1f} usable; " if gpus else ""
        host = plan.host_memory and f" of {USABLE * plan.host_memory / GIB:.1f} usable"
        raise UserError(f"this run does not fit here: {gpu}peak host {plan.peak_host / GIB:.1f} GiB{host or ''} "
                        f"(`unipruning plan <overrides>` shows every stage). What would: " + "; ".join(plan.advice)
                        + ". plan_check=false runs it anyway.")
    return plan


def gpus_needed(cfg: DictConfig, gpu_memory: float, host_memory: float | None, offload: bool,
                most: int = 64) -> int | None:
    """The fewest GPUs of ``gpu_memory`` bytes (one rank each, one node) on which the drift search of ``cfg`` fits
    with FSDP2, with or without CPU offload; None when ``most`` are not enough."""
    from omegaconf import OmegaConf

    fixed = OmegaConf.merge(cfg, {"schedule": {"fsdp_offload": offload}})
    shapes = _shapes(cfg, resolve_dtype(cfg.model.dtype, torch.device("cuda")))  # built once, not once per count
    for n in range(2, most + 1):
        if any(_plan(fixed, n, gpu_memory, host_memory, where, n, offload, shapes).fits for where in ("device", "onload")):
            return n
    return None
