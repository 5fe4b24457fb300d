"""The drift search over the ranks of a ``torchrun`` (or SLURM) launch, with PyTorch's FSDP2.

Every rank runs :func:`run_sharded_search`. Rank 0 reads the weights from disk into host memory; the others build
the model on the ``meta`` device (no memory). ``fully_shard`` wraps each decoder block and then the root, and
``set_model_state_dict(..., broadcast_from_rank0=True)`` sends each tensor from rank 0 and keeps on every rank its
``Shard(0)`` rows (buffers, which FSDP does not shard, are broadcast whole). Each rank then holds 1/N of W, of its
gradient and Adam's moments and of V and Γ (:class:`..search.shards.RowShards`); the forward and backward passes gather one
block at a time. Every rank runs the same calibration windows (the model is sharded, not the data), so the
gradients are those of one process, and so is Γ, to rounding (FSDP's reduce-scatter averages equal gradients).

Rank 0 alone holds the index lock, checks for a finished or reusable search, writes the log, the checkpoints and
Γ (``gamma.safetensors``, the single-process format) with the stage marker: ``eval``, ``export``, ``apply``,
``report`` and a later run's search reuse see a search like any other. The rest of the run (masks, evaluation)
then goes on in rank 0 alone (:func:`..commands.prune.run_prune`), while the other ranks end.
Resuming: a rerun in the same run directory (``hydra.run.dir=<run>``) reads the last checkpoint, whatever the
number of ranks that wrote it (its files hold whole matrices).
"""

from __future__ import annotations

import functools
import gc
import logging

import torch
from omegaconf import DictConfig

from ..data.calibration_set import calibration_set
from ..core.distributed import Ranks, finish, from_main
from ..core.errors import UserError
from ..models.layouts import as_linears
from ..pruning.method import method_of
from ..models.loading import find_blocks, model_location, prunable_layers, resolve_dtype
from ..core.progress import Timer
from ..core.rundir import RunDir, file_locks
from ..search.mirror_descent import search_drift
from ..search.shards import RowShards
from .search import search_info, search_parts
from .search_store import record_search, reuse_search, search_fingerprint, search_index

log = logging.getLogger(__name__)


def check_sharded_run(cfg: DictConfig, ranks: Ranks) -> None:
    """Refuse, before any weight is read, what a launch over ``ranks`` cannot do. Raises :class:`UserError`."""
    launch = f"this launch has {ranks.world} ranks ({ranks.launcher})"
    method = method_of(cfg)
    if not method.backpropagates():
        raise UserError(f"{launch}: several ranks run UniPruning's drift search (method=unipruning, "
                        f"schedule.weight_mode=drift) with FSDP2; method={method.name} "
                        f"(weight_mode={cfg.schedule.weight_mode}) runs in one process: launch it without torchrun")
    if cfg.model.device_map:
        raise UserError(f"{launch}: model.device_map={cfg.model.device_map!r} places the model on one process's GPUs; "
                        "FSDP2 shards it over the ranks instead: leave model.device_map=null")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(cfg.schedule.fsdp_offload).lower() == "true" and device.type != "cuda":
        raise UserError(f"{launch}: schedule.fsdp_offload=true moves FSDP's shards from the GPUs to host memory, and "
                        "there is no GPU here (every shard is in host memory already): use schedule.fsdp_offload=auto")
    if cfg.schedule.drift_dtype == "float32" and resolve_dtype(cfg.model.dtype, device) != torch.float32:
        raise UserError(f"{launch}: schedule.drift_dtype=float32 (an fp32 master copy of W under autocast) runs in "
                        "one process only; over ranks use schedule.drift_dtype=weights or model.dtype=float32")


def load_sharded(model_cfg: DictConfig, ranks: Ranks, device: torch.device, offload: bool = False):
    """The causal LM of ``model_cfg`` sharded by FSDP2 over ``ranks`` (each decoder block, then the root), in eval
    mode with gradients off; the tokenizer on rank 0 (None elsewhere). ``offload``: FSDP's ``CPUOffloadPolicy``
    (sharded parameters, gradients and optimiser state in host memory, gathered to the GPU block by block).
    Rank 0 reads the weights; the other ranks get their rows from it (no rank but 0 reads the files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = model_location(model_cfg)
    dtype = resolve_dtype(model_cfg.dtype, device)
    remote = bool(model_cfg.trust_remote_code)
    tok, full = None, {}
    if ranks.main:
        log.info("loading %s (%s) on rank 0, sharded over %d ranks with FSDP2", location, dtype, ranks.world)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, revision=model_cfg.revision,
                                                     trust_remote_code=remote)
        as_linears(model)  # the same parameter names on every rank: one Linear per expert
        full = model.state_dict()
        tok = AutoTokenizer.from_pretrained(location, revision=model_cfg.revision, trust_remote_code=remote)
    else:
        config = AutoConfig.from_pretrained(location, revision=model_cfg.revision, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=remote)
        as_linears(model)
    mesh = init_device_mesh(device.type, (ranks.world,))
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in find_blocks(model)[1]:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    if not ranks.main:
        model.to_empty(device="cpu" if offload else device)
    # DCP's load refuses local state on two devices ("Multiple devices found"): under offload the parameters' shards
    # are on the host, so the (persistent) buffers wait there too; then every rank's go to its compute device
    buffers_to(model, torch.device("cpu") if offload else device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    buffers_to(model, device)
    import torch.distributed as dist

    for buf in model.buffers():  # not in the state dict when non-persistent (RoPE's inv_freq): rank 0's values
        dist.broadcast(buf, src=0)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """Every buffer of ``model`` on ``device``, in place. FSDP2 does not shard buffers: ``fully_shard`` moves rank 0's
    (built from real weights) to the mesh's device, while ``to_empty(device="cpu")`` under CPU offload leaves the
    other ranks' on the host; a broadcast would then run NCCL on rank 0 and gloo elsewhere, and hang. The forward
    reads them on the compute device anyway (torchtitan likewise sets ``buffer_device`` under CPU offload)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def run_sharded_search(cfg: DictConfig, rd: RunDir, timer: Timer, ranks: Ranks, device: torch.device,
                       offload: bool = False) -> None:
    """Γ of ``cfg``'s drift search computed over ``ranks`` and recorded in ``rd`` by rank 0 (see the module).
    ``offload``: FSDP's CPU offload (``schedule.fsdp_offload`` as the memory plan resolved it).

    Every rank must call it. A finished search in ``rd`` or an indexed one with the same fingerprint is taken as
    it is (rank 0 decides, the others follow). Raises on every rank what failed on rank 0 before the search."""
    fp = search_fingerprint(cfg)
    dtype = resolve_dtype(cfg.model.dtype, device)
    index = search_index(cfg, fp, [str(dtype), device.type])
    locks = [index.with_suffix(".lock")] if cfg.reuse_search and ranks.main else []
    with file_locks(locks):
        done = from_main(lambda: "complete" if rd.is_complete("search", fp) else (
            "reused" if reuse_search(cfg, fp, rd, index) is not None else None), ranks)
        if done is not None:
            log.info("search stage %s in %s: no sharded search", done, rd.path)
            finish(ranks)
            return
        model, tok = load_sharded(cfg.model, ranks, device, offload=offload)
        windows, calib = from_main(lambda: calibration_set(cfg, tok), ranks)
        metric, prox, settings = search_parts(cfg)
        layers = prunable_layers(model)
        with timer.stage("search"):
            gamma, bpp = search_drift(model, layers, windows, metric, prox, settings,
                                      rd / "checkpoints" / "search.safetensors", fp, rd / "search.jsonl",
                                      shards=RowShards(ranks, device))
        del model, layers
        gc.collect()

        def record(found: dict) -> None:
            info = {**search_info(cfg, calib, windows, bpp, timer.seconds["search"]), "ranks": ranks.world,
                    "launcher": ranks.launcher, "sharding": "fsdp2" + ("+cpu_offload" if offload else "")}
            record_search(cfg, fp, rd, found, info, index)

        # the others wait for Γ on disk before they end; what failed in writing it is raised on every rank at once,
        # not after the collective timeout
        from_main(functools.partial(record, gamma), ranks)
        del gamma
    finish(ranks)
