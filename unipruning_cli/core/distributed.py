"""Runs across several processes: the launch environment, the process group, and row shards of a matrix.

A prune launched by ``torchrun --nproc-per-node N`` (or by SLURM's ``srun`` / ``hydra/launcher=slurm`` with N tasks)
runs its drift search over N ranks with PyTorch's FSDP2 (:mod:`..stages.sharded_search`). Every rank runs the same code;
rank 0 alone writes (run directory, logs, locks, checkpoints) and the other ranks only compute.

Row shards follow FSDP2's ``Shard(0)`` layout (``torch.chunk`` on dim 0): rank r holds rows
``[r·c, min((r+1)·c, rows))`` with ``c = ceil(rows / N)``, so the last ranks may hold fewer rows, or none.
The process group is ``gloo`` for CPU tensors and ``nccl`` for CUDA tensors where CUDA is present (one group
with both backends, so host-side state such as ``schedule.search_state=host`` can still be gathered).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the launch: ``rank`` of ``world`` (``local`` on its node)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def launch_ranks(environ: dict[str, str] | None = None) -> Ranks:
    """The ranks of this launch from its environment, without starting anything.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. A SLURM job step of several tasks (``srun``, or a
    ``hydra/launcher=slurm`` job asking for N tasks) sets ``SLURM_STEP_NUM_TASKS`` and ``SLURM_PROCID`` (a batch
    script's own step does not: it is one process); there, with no ``RANK``, submitit's
    ``TorchDistributedEnvironment`` derives the ranks and exports them with ``MASTER_ADDR`` / ``MASTER_PORT`` for the
    process group (``environ`` given: read only, nothing exported). One process is :data:`SINGLE`.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])),
                     env.get("UNIPRUNING_LAUNCHER", "torchrun"))
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if environ is not None:
            return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0")),
                         "slurm")
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError:
            from .errors import UserError

            raise UserError("a SLURM step of several tasks reads its ranks with submitit: pip install -e \".[slurm]\" "
                            "(or launch the tasks with torchrun)") from None

        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # a plain srun: submitit reads SLURM's variables once told
        denv = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["UNIPRUNING_LAUNCHER"] = "slurm"  # RANK & co. are set from now on: say who set them
        return Ranks(denv.rank, denv.world_size, denv.local_rank, "slurm")
    return SINGLE


#: How long a rank waits in one collective before it gives up (``UNIPRUNING_DIST_TIMEOUT_MIN`` overrides, minutes):
#: rank 0 alone reads a 70B checkpoint from disk (or the hub) and tokenises while the others wait in a broadcast,
#: which can outlast torch's default of 30 minutes for ``cpu:gloo,cuda:nccl``.
DEFAULT_TIMEOUT_MIN = 120
#: Set once every rank has left the process group (:func:`finish`): rank 0 goes on as one process.
_FINISHED = False


def compute_device(ranks: Ranks) -> torch.device:
    """This rank's device: ``cuda:<local rank modulo the visible GPUs>`` where CUDA is present, else the CPU. Modulo,
    since SLURM with ``--gpus-per-task 1`` shows each task one GPU (``cuda:0``) whatever its local rank."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = max(1, torch.cuda.device_count())
    if ranks.sharded and visible > 1 and ranks.local >= visible:
        log.warning("local rank %d of a node with %d visible GPUs shares cuda:%d with another rank", ranks.local,
                    visible, ranks.local % visible)
    return torch.device("cuda", ranks.local % visible)


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start(ranks: Ranks) -> torch.device:
    """Join the process group of ``ranks`` (once; a no-op for one process) and return this rank's device
    (:func:`compute_device`). The group has an explicit timeout (:data:`DEFAULT_TIMEOUT_MIN`), and each rank takes
    its share of the node's cores for its CPU work (torchrun leaves one thread per rank: ``OMP_NUM_THREADS=1``)."""
    import torch.distributed as dist
    from datetime import timedelta

    device = compute_device(ranks)
    if not ranks.sharded or dist.is_initialized() or _FINISHED:  # never a second group after the peers have left
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    try:
        minutes = float(os.environ.get("UNIPRUNING_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    except ValueError:
        from .errors import UserError

        raise UserError(f"UNIPRUNING_DIST_TIMEOUT_MIN={os.environ['UNIPRUNING_DIST_TIMEOUT_MIN']!r} must be a "
                        "number of minutes") from None
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world, timeout=timedelta(minutes=minutes))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    threads = max(1, cores() // max(1, local_world))
    if torch.get_num_threads() < threads:
        torch.set_num_threads(threads)
    log.info("rank %d of %d (%s, %s, %d CPU threads, collectives time out after %g min)", ranks.rank, ranks.world,
             ranks.launcher, backend, torch.get_num_threads(), minutes)
    return device


def finish(ranks: Ranks) -> None:
    """Leave the process group on every rank, together (NCCL's communicators are torn down collectively: PyTorch's
    shutdown notes, pytorch/pytorch#122358), and let rank 0, which goes on alone, use every core it may run on.
    Every rank must call it; a no-op for one process or where no group was started."""
    import torch.distributed as dist

    global _FINISHED
    if not ranks.sharded or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    _FINISHED = True
    if ranks.main:
        torch.set_num_threads(max(torch.get_num_threads(), cores()))
        log.info("process group closed; rank 0 goes on alone with %d CPU threads", torch.get_num_threads())


def agree(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when ``flag`` is true on every rank (an ``all_reduce`` MIN): one decision for all ranks
    where each could decide differently (which would mix NCCL and gloo collectives and hang)."""
    import torch.distributed as dist

    if not ranks.sharded:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)  # a CPU tensor: gloo, in either backend set
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast(obj, ranks: Ranks):
    """``obj`` as rank 0 has it, on every rank (a no-op for one process). Raises what rank 0 raised: rank 0 hands
    an exception instead of a value, and every rank raises it, so no rank waits forever on a failed one."""
    import torch.distributed as dist

    if not ranks.sharded or _FINISHED:  # one process, or rank 0 alone after the group was closed
        if isinstance(obj, BaseException):
            raise obj
        return obj
    box = [obj if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


T = TypeVar("T")


def from_main(compute: Callable[[], T], ranks: Ranks) -> T:
    """``compute()`` run on rank 0 alone, and its value on every rank; what it raised is raised on every rank, so no
    rank waits forever on one that failed. Joins the process group first (:func:`start`). One process: ``compute()``."""
    if not ranks.sharded or _FINISHED:
        return compute()
    start(ranks)
    value = None
    if ranks.main:
        try:
            value = compute()
        except Exception as err:  # noqa: BLE001 - raised again on every rank by broadcast
            value = picklable(err)
    return broadcast(value, ranks)


def picklable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (to be broadcast), else a ``RuntimeError`` with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception type may refuse pickling
        return RuntimeError(f"{type(err).__name__}: {err}")


def row_range(rows: int, ranks: Ranks) -> tuple[int, int]:
    """``[start, stop)`` of the rows rank ``ranks.rank`` holds of a dim-0 size ``rows`` (FSDP2's ``Shard(0)``)."""
    chunk = -(-rows // ranks.world)
    start = min(rows, ranks.rank * chunk)
    return start, min(rows, start + chunk)


def gather_rows(local: torch.Tensor, rows: int, ranks: Ranks) -> torch.Tensor:
    """The whole tensor (dim 0 of size ``rows``) from every rank's rows, on every rank (``all_gather`` of the
    padded shards). ``local``: this rank's rows, as :func:`row_range` says."""
    import torch.distributed as dist

    if not ranks.sharded:
        return local
    chunk = -(-rows // ranks.world)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:rows]


def all_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``t`` summed over the ranks, in place (a no-op for one process); returns ``t``."""
    import torch.distributed as dist

    if ranks.sharded:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
