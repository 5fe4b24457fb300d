"""The rows of a memory plan: :class:`Stage`, the :class:`Sheet` a method writes its rows on
(:meth:`...pruning.method.Method.plan_rows`), and the search's rows (one process, or FSDP2 over the ranks).

GiB = 2³⁰ bytes. Symbols as in :mod:`.estimate`: P prunable weights, N the others, b bytes per weight element, W the
weights, L_max the largest prunable matrix, T_c the calibration window, h the width, V the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from ...core.pinned import allocator_bytes, copy_bytes
from ...pruning.mask_solvers import MASK_SOLVERS
from ...search.settings import drift_element_size, drift_gpu_bytes

GIB = 2**30
#: The CUDA context and the caching allocator's slack on each GPU (not counted by max_memory_allocated).
CUDA_OVERHEAD = 0.75 * GIB
#: Host bytes a fast tokenizer holds per character of text tokenised at once (measured; shared/docs/large-models.md).
TOKENISE_BYTES_PER_CHAR = 150
#: Fraction of a device's memory a plan may fill: fragmentation and libraries' own buffers take the rest
#: (assumed; ``scripts/gpu_check.py`` records ``max_memory_reserved`` against the allocated peak per stage).
USABLE = 0.92
#: GPU bytes NCCL's communicators hold on each rank of a launch (channels' buffers; outside
#: ``max_memory_allocated``). Assumed from NCCL's defaults (``NCCL_BUFFSIZE`` 4 MiB per channel and peer).
NCCL_BUFFERS = 1.0 * GIB


@dataclass
class Stage:
    name: str
    gpu: float  # bytes on the busiest GPU
    host: float  # bytes on the host, beyond the process baseline
    what: str


@dataclass
class Sheet:
    """The plan being written: the run's shapes (``s``, from the ``meta`` model) and the terms every row is made of.
    ``Wd``: W on the device; with sequential onloading ``Wo`` (outside the blocks, on the GPU), ``Wb`` (one block)
    and ``Wh`` (the blocks, on the host); ``logits``: one evaluation chunk's; ``block_io``: every calibration
    window's block inputs and outputs (host); ``per_sample``: per-sample statistics; ``one``: " + one block" where
    onloading; ``cuts``: the run's targets."""

    cfg: DictConfig
    s: dict
    b: int
    P: int
    N: int
    Wd: float
    Wo: float
    Wb: float
    Wh: float
    logits: float
    block_io: float
    per_sample: float
    one: str
    on_gpu: bool
    gpu_memory: float | None
    ranks: int
    offload: bool
    cuts: int
    stages: list = field(default_factory=list)

    def add(self, name: str, dev: float, host: float, what: str) -> None:
        """A stage's row. Without a GPU the device is the host: the two add up there. Onloaded blocks stay on the
        host throughout."""
        self.stages.append(Stage(name, dev if self.on_gpu else 0.0, host + self.Wh + (0.0 if self.on_gpu else dev),
                                 what))

    def calibration(self) -> None:
        """Block-by-block calibration statistics: one window in one block on the device, block inputs/outputs and
        the statistics on the host."""
        act = self.cfg.calibration.seqlen * (6 * self.s["h"] + 3 * self.s["I"]) * self.b
        self.add("calibration", self.Wo + self.Wb + act, self.block_io + self.per_sample,
                 f"W{self.one} + one window in one block; block inputs/outputs on the host")

    def refine_reconstruct(self) -> None:
        """``refine=swap`` / ``reconstruct=obs|admm``: one sequential pass per cut (both share it) with the block's
        XᵀX (fp32), with ``layer_target=dense`` also X_mᵀX_d and the dense stream's block inputs; the OBS buffers of the
        widest layer (5 x I² fp32, as SparseGPT's; ``admm``: 2 x I² and 9 x the largest matrix, fp32) and the swaps'
        fp32 working copies of the largest matrix (6 x: W, δ, g, two candidate maps, a trial product)."""
        dense = 2 if self.cfg.layer_target == "dense" else 1
        copies = 1 if self.cfg.reconstruct in MASK_SOLVERS or self.cfg.refine == "none" else 2  # + the pass's own
        act = self.cfg.calibration.seqlen * (6 * self.s["h"] + 3 * self.s["I"]) * self.b * dense
        solve = 5 * self.s["I_max"] ** 2 * 4  # OBS: H, its Cholesky factors and inverse
        if self.cfg.reconstruct == "admm":  # the conjugate gradients: damped H and its scaled copy; target, x, b, r,
            solve = 2 * self.s["I_max"] ** 2 * 4 + 9 * self.s["L_max"] * 4  # z, p, Ap, the mask as fp32, the result
        work = 4 * self.s["xtx_block"] * dense + solve + 6 * self.s["L_max"] * 4
        solver = "the exact solve" if self.cfg.reconstruct == "admm" else "OBS"
        self.add("refine_reconstruct", self.Wo + self.Wb + act + work,
                 self.block_io * dense + self.P / 8 * copies + self.restore_copy(self.b),
                 f"W{self.one} + the block's XᵀX{' and X_mᵀX_d' if dense > 1 else ''} + {solver} and swap buffers of the "
                 f"widest layer; block inputs/outputs{' of both streams' if dense > 1 else ''} and the copy of W "
                 f"that restores it between cuts, {copies} packed cop{'ies' if copies > 1 else 'y'} of the masks on the "
                 "host")

    def pruned_eval_in_place(self) -> None:
        """The pruned model evaluated as the method left it (masks packed on the host)."""
        self.add("pruned_eval", self.Wo + self.Wb + self.logits, self.P / 8, f"W{self.one} + fp32 logits of one chunk")

    def restore_copy(self, item: int) -> int:
        """Host bytes of one copy of the prunable matrices, ``item`` bytes per element (pinned where a GPU is)."""
        return copy_bytes(self.s["sizes"], item, self.on_gpu)


def search_rows(cfg: DictConfig, sheet: Sheet) -> None:
    """The UniPruning search's rows: the frozen search matrix by matrix, the drift search over the ranks of a
    launch (:func:`sharded_search_stages`, before rank 0 loads the model for the rest), or in one process."""
    s, b, P, N, T_c = sheet.s, sheet.b, sheet.P, sheet.N, cfg.calibration.seqlen
    if cfg.schedule.weight_mode == "frozen":
        sheet.add("search", sheet.Wo + 42 * s["L_max"], 4 * P + sheet.per_sample,
                  "W + one matrix's search; Γ (fp32) on the host")
        return
    if sheet.ranks > 1:
        sheet.stages[:0] = [stage if sheet.on_gpu else Stage(stage.name, 0.0, stage.host + stage.gpu * sheet.ranks,
                                                             stage.what)
                            for stage in sharded_search_stages(cfg, s, b, sheet.ranks, sheet.offload, sheet.gpu_memory)]
        return
    on_host = _state_on_host(cfg, P, b, sheet.on_gpu, sheet.gpu_memory, sheet.Wd)
    bd = drift_element_size(cfg.schedule.drift_dtype, b)  # the drifting W's dtype (fp32 master copy or W's own)
    # gradient, Adam m, v (+ V, Γ fp32); one S; W grown into its fp32 master copy; with grad_clip_scope=model
    # the other parameters' gradients (in their dtype), which enter the clipping norm
    others = N * b if cfg.schedule.grad_clip_scope == "model" else 0
    state = P * (3 * bd + (bd - b) + (0 if on_host else 8)) + 16 * s["L_max"] + others
    act = (s["L"] * T_c * s["h"] * b + T_c * (10 * s["h"] + 3 * s["I"]) * b * 2 + 12 * T_c * s["V"])
    # the restore copy of W (+ V and Γ) live on the host: pinned arenas where there is a GPU (..pinned)
    host = sheet.restore_copy(b) + (2 * sheet.restore_copy(4) if on_host else 0)
    where = "on the host" if on_host else "on the device"
    sheet.add("search", sheet.Wd + state + act, host,
              f"W + gradient, Adam m, v ({'fp32' if bd == 4 else 'W dtype'})"
              f"{' + the other parameters’ gradients' if others else ''} + checkpointed activations + fp32 logits; "
              f"V, Γ (fp32) {where}")
    if sheet.on_gpu:
        sheet.add("search_checkpoint", sheet.Wd + state, host + s["L_max"] * (4 * b + 8),
                  "every checkpoint_every steps: the state written one matrix at a time through the host")


def _state_on_host(cfg: DictConfig, P: int, b: int, on_gpu: bool, gpu_memory: float | None, Wd: float) -> bool:
    """Where the drift search will keep V and Γ: as ``schedule.search_state`` says; ``auto`` decides as the search
    does (``search.placement.search_state_of``), against this plan's GPU with the weights already on it."""
    if cfg.schedule.search_state != "auto":
        return cfg.schedule.search_state == "host"
    if not on_gpu or gpu_memory is None:
        return False
    return drift_gpu_bytes(P, b, cfg.schedule.drift_dtype) > USABLE * gpu_memory - CUDA_OVERHEAD - Wd


def sharded_search_stages(cfg: DictConfig, s: dict, b: int, ranks: int, offload: bool,
                          gpu_memory: float | None) -> list[Stage]:
    """The drift search with FSDP2 over ``ranks`` processes (:mod:`..sharded_search`): GPU bytes of each rank, host
    bytes of the node (one node of ``ranks`` GPUs). Each rank holds 1/ranks of W, its gradient, Adam's m and v, the
    other parameters' gradients (``grad_clip_scope=model``) and V and Γ (fp32; on the host with ``search_state=host``,
    or ``auto`` where they do not fit a GPU of ``gpu_memory`` bytes); FSDP gathers the current and the prefetched
    block whole (weights, and their gradients in the backward pass) and the root's parameters through the step;
    each rank computes one matrix's metric on the whole matrix. With CPU offload the shards live on the host."""
    P, N, L_max = s["P"], s["N"], s["L_max"]
    bd = drift_element_size(cfg.schedule.drift_dtype, b)
    others = N * b if cfg.schedule.grad_clip_scope == "model" else 0
    shards = ((P + N) * b + 3 * P * bd + others) / ranks  # W, gradient, m, v, the others' gradients
    vg = 8 * P / ranks
    T_c = cfg.calibration.seqlen
    act = s["L"] * T_c * s["h"] * b + T_c * (10 * s["h"] + 3 * s["I"]) * b * 2 + 12 * T_c * s["V"]
    gathered = 4 * s["block"] * b + s["outside"] * b
    # FSDP2's reduce-scatter of one block's gradients (the unsharded input and this rank's output), the root's
    # gradients unsharded until theirs (grad_clip_scope=model: embeddings, lm_head), and NCCL's own buffers
    collectives = s["block"] * bd * (1 + 1 / ranks) + (2 * s["outside"] * b if others else 0) \
        + (NCCL_BUFFERS if gpu_memory is not None else 0)
    metric = L_max * (b + 4 + 16)
    state_host = offload or cfg.schedule.search_state == "host" or (
        cfg.schedule.search_state == "auto" and gpu_memory is not None
        and gathered + act + metric + collectives + shards + vg > USABLE * gpu_memory - CUDA_OVERHEAD)
    gpu = gathered + act + metric + collectives + (0 if offload else shards) + (0 if state_host else vg)
    on_gpu = gpu_memory is not None
    # this rank's rows of every matrix: the restore copy (pinned arena), V and Γ where on the host (pinned arenas)
    mine = [-(-n // ranks) for n in s["sizes"]]
    host_rank = copy_bytes(mine, b, on_gpu and not offload) + (2 * copy_bytes(mine, 4, on_gpu) if state_host else 0)
    if offload:  # FSDP pins each parameter's and gradient's shard alone (power-of-two blocks); m and v are pageable
        pinned = sum(allocator_bytes(-(-rows // ranks) * (numel // max(rows, 1)) * b) for rows, numel in s["rows"])
        host_rank += 2 * pinned + 2 * P * bd / ranks if on_gpu else shards
    where = "host" if state_host else "GPU"
    what = (f"per GPU: 1/{ranks} of W, gradient, Adam m, v" + (" (on the host: FSDP CPU offload, W, gradient pinned)"
                                                              if offload else "")
            + f"; V, Γ shards on the {where}; two blocks and the root gathered; a block's reduce-scatter buffers"
            + (", the root's gradients" if others else "") + (", NCCL's buffers" if on_gpu else "")
            + "; activations; one matrix's metric")
    return [Stage("load_sharded", (0 if offload else ((P + N) * b) / ranks) + s["block"] * b, (P + N) * b,
                  f"rank 0 reads W on the host and sends each rank its 1/{ranks}"),
            Stage("search", gpu, host_rank * ranks, what),
            Stage("search_checkpoint", gpu, host_rank * ranks + L_max * (4 * b + 8),
                  "every checkpoint_every steps: rank 0 writes each matrix gathered whole, one at a time")]
