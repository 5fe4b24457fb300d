"""What would have failed on the first GPU run (issue 25, ``shared/docs/gpu-readiness.md``), shown on this CPU where
the mechanism allows: pinned memory as the allocator takes it, checkpoints gathered one matrix at a time on every
rank, one ``search_state`` for all ranks, the device ordinal, the process group's timeout, threads and shutdown,
buffers on the compute device, and no autocast cache of the fp32 master weights."""

from __future__ import annotations

import gc
import os
import weakref
from datetime import timedelta

import pytest
import torch
from torch import nn

from unipruning_cli.core import distributed
from unipruning_cli.core.distributed import Ranks
from unipruning_cli.core.pinned import ALIGN, HostArena, allocator_bytes, arena_bytes, arena_layout
from unipruning_cli.search.settings import SearchSettings

GIB = 2**30


# ------------------------------------------------------------------------------------------- pinned host memory


def _qwen7b_shapes() -> list[torch.Size]:
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.models.loading import prunable_layers
    from unipruning_cli.stages.plan.architectures import meta_model

    cfg = compose_prune(["model=qwen2.5-7b"])
    return [m.weight.shape for m in prunable_layers(meta_model(cfg.model, torch.bfloat16)).values()]


def test_pinning_qwen7b_matrix_by_matrix_takes_1_9x_and_the_arena_takes_what_they_hold():
    """The finding: the caching host allocator rounds each pinned request up to a power of two (an fp32 MLP matrix
    of 18944 x 3584 takes 512 MiB, not 259); per matrix, V + Γ + the bf16 restore copy of Qwen2.5-7B take about
    115 GiB against 61 nominal. The arenas (power-of-two chunks, packed) take within 2 % of nominal."""
    assert allocator_bytes(18944 * 3584 * 4) == 536870912
    shapes = _qwen7b_shapes()
    fp32 = [s.numel() * 4 for s in shapes]
    bf16 = [s.numel() * 2 for s in shapes]
    nominal = 2 * sum(fp32) + sum(bf16)
    per_matrix = 2 * sum(map(allocator_bytes, fp32)) + sum(map(allocator_bytes, bf16))
    arenas = 2 * arena_bytes(fp32) + arena_bytes(bf16)
    assert nominal / GIB == pytest.approx(60.77, abs=0.05)
    assert per_matrix / GIB == pytest.approx(114.9, abs=0.1) and per_matrix / nominal > 1.85
    assert nominal <= arenas <= 1.02 * nominal


@pytest.mark.parametrize("seed", range(5))
def test_the_arena_layout_places_every_tensor_aligned_inside_its_chunk_without_overlap(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(x) for x in torch.randint(1, 5000, (40,), generator=g)] + [3000 * (seed + 1)]
    chunks, places = arena_layout(sizes, smallest=4096)
    assert all(c & (c - 1) == 0 and c >= 4096 for c in chunks)
    spans: dict[int, list[tuple[int, int]]] = {}
    for size, (k, offset) in zip(sizes, places):
        assert offset % ALIGN == 0 and offset + size <= chunks[k]
        spans.setdefault(k, []).append((offset, offset + size))
    assert sorted(spans) == list(range(len(chunks)))  # no empty chunk
    for intervals in spans.values():  # the obvious check: sorted, each ends before the next starts
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:]))
    assert arena_bytes(sizes, smallest=4096) == sum(chunks) < 1.6 * sum(sizes)


def test_arena_tensors_are_separate_views_of_few_chunks():
    shapes = {"a": (30, 20), "b": (7,), "c": (64, 64), "d": (1, 3)}
    arena = HostArena(shapes, torch.float32, smallest=4096)
    assert {n: tuple(t.shape) for n, t in arena.tensors.items()} == shapes
    for i, t in enumerate(arena.tensors.values()):
        assert t.dtype == torch.float32 and torch.equal(t, torch.zeros_like(t))
        t.fill_(i + 1)
    for i, t in enumerate(arena.tensors.values()):
        assert torch.equal(t, torch.full_like(t, i + 1))  # no write reached another tensor
    assert arena.nbytes == arena_bytes([30 * 20 * 4, 7 * 4, 64 * 64 * 4, 3 * 4], smallest=4096)
    arena.release()
    assert arena.tensors == {}


# ---------------------------------------------------------------------------------- checkpoints on every rank


class _CountingShards:
    """A rank that does not write: every gathered tensor is a new one, and the most alive at once is counted."""

    def __init__(self) -> None:
        from unipruning_cli.search.shards import Whole

        self._whole = Whole()
        self.alive: list[weakref.ref] = []
        self.most = 0

    writer = False

    def _new(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        self.alive = [r for r in self.alive if r() is not None]
        self.alive.append(weakref.ref(out))
        self.most = max(self.most, len(self.alive))
        return out

    def full(self, t):
        return self._new(t)

    def gather(self, local, rows):
        return self._new(local)


def test_a_rank_that_does_not_write_gathers_a_checkpoint_one_matrix_at_a_time(tmp_path):
    """``_save_drift`` on ranks other than 0 once built a tuple of every matrix's gathered tensors (16 bytes per
    weight: out of memory at the first checkpoint of a 7B search); now at most the current group and the previous
    one are alive (6 tensors each)."""
    from unipruning_cli.search.mirror_descent import _save_drift
    from unipruning_cli.search.state import SearchState

    names = [f"m{i}" for i in range(8)]
    params = [nn.Parameter(torch.randn(4, 3)) for _ in names]
    other = nn.Parameter(torch.randn(5))
    for p in [*params, other]:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params)
    opt.step()
    state = SearchState.zeros({n: p.shape for n, p in zip(names, params)})
    shards = _CountingShards()
    gen = torch.Generator()
    gc.disable()  # reference counting alone decides what is alive
    try:
        _save_drift(state, names, params, {"other": other}, opt, gen, gen, tmp_path / "ck", "fp", shards)
    finally:
        gc.enable()
    assert 6 < shards.most <= 12, shards.most  # 48 + 1 when every group was gathered first
    assert not list(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------------------------- autocast


def test_the_fp32_master_copy_drifts_under_autocast_without_its_cache_of_casts(tiny_tokenizer, tmp_path):
    """Autocast keeps a low-precision cast of every fp32 weight that needs a gradient until its region ends (2 bytes
    per weight, 12 GiB at 7B, counted nowhere); the search runs its forward and backward with the cache off."""
    from _helpers import build_tiny_model
    from unipruning_cli.metrics import build_metric
    from unipruning_cli.models.loading import prunable_layers
    from unipruning_cli.search.mirror_descent import search_drift
    from unipruning_cli.search.regularizers import L1Prox

    model = build_tiny_model("llama", len(tiny_tokenizer)).to(torch.bfloat16)
    seen = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.is_autocast_cache_enabled()))
    windows = torch.randint(3, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    settings = SearchSettings(steps=2, lr=1e-3, drift_dtype="float32", checkpoint_every=100)
    gamma, _ = search_drift(model, prunable_layers(model), windows, build_metric("wanda"), L1Prox(0.0), settings,
                            tmp_path / "ck", "fp", tmp_path / "log.jsonl")
    assert seen and not any(seen)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # W back in its own dtype
    assert gamma and all(g.dtype == torch.float32 for g in gamma.values())


# ------------------------------------------------------------------------------ ranks, devices, process group


class _FakeCudaParam:
    device = torch.device("cuda", 0)

    def numel(self) -> int:
        return 1000

    def element_size(self) -> int:
        return 2


def _fake_cuda(monkeypatch, free: int, reserved: int = 0, allocated: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_free_gpu_memory_counts_what_torch_holds_reserved_but_unused(monkeypatch):
    from unipruning_cli.search.placement import free_gpu_bytes, search_state_of

    _fake_cuda(monkeypatch, free=2 * GIB, reserved=10 * GIB, allocated=1 * GIB)
    assert free_gpu_bytes(torch.device("cuda", 0)) == 11 * GIB
    # the search's 1000 weights need 2 GiB and a little more: only the allocator's free cache makes them fit
    assert search_state_of(SearchSettings(search_state="auto"), [_FakeCudaParam()]) == "device"
    _fake_cuda(monkeypatch, free=2 * GIB)
    assert search_state_of(SearchSettings(search_state="auto"), [_FakeCudaParam()]) == "host"


def _agree_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from unipruning_cli.search.placement import search_state_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        free = 100 * GIB if rank == 0 else GIB  # rank 1's GPU is fuller: V and Γ do not fit there
        torch.cuda.mem_get_info = lambda device=None: (free, 80 * GIB)
        torch.cuda.memory_reserved = torch.cuda.memory_allocated = lambda device=None: 0
        out.put((rank, search_state_of(SearchSettings(search_state="auto"), [_FakeCudaParam()], Ranks(rank, world))))
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_the_same_search_state_when_their_free_memory_differs():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_agree_worker, args=(2, 29900 + os.getpid() % 90, out), nprocs=2, join=True,
                       start_method="spawn")
    got = dict(out.get() for _ in range(2))
    assert got == {0: "host", 1: "host"}


def test_the_device_ordinal_wraps_around_the_visible_gpus(monkeypatch):
    """Under SLURM with ``--gpus-per-task 1`` every task sees one GPU, ``cuda:0``, whatever its local rank."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.start(Ranks(rank=0, world=1, local=3)) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed.start(Ranks(rank=0, world=1, local=3)) == torch.device("cuda", 3)


def test_the_process_group_has_an_explicit_timeout_and_each_rank_its_share_of_the_cores(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun leaves each rank (OMP_NUM_THREADS=1)
    try:
        distributed.start(Ranks(rank=1, world=4, local=1))
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    assert calls[0]["timeout"] == timedelta(minutes=distributed.DEFAULT_TIMEOUT_MIN) >= timedelta(hours=2)
    monkeypatch.setenv("UNIPRUNING_DIST_TIMEOUT_MIN", "5")
    distributed.start(Ranks(rank=1, world=4, local=1))
    assert calls[1]["timeout"] == timedelta(minutes=5)


def test_buffers_go_to_the_compute_device_whatever_fsdp_left_them_on():
    """Under FSDP's CPU offload rank 0's buffers (RoPE's ``inv_freq``) went to the GPU and the others' stayed on the
    host; every rank now puts them on its compute device before they are broadcast (here: ``meta`` stands for it)."""
    from unipruning_cli.stages.sharded_search import buffers_to

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].register_buffer("inv_freq", torch.ones(3), persistent=False)
    buffers_to(model, torch.device("meta"))
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters())  # parameters are FSDP's to place


# ------------------------------------------------------------------------------------------------- the plan


def _plan_json(tmp_path, monkeypatch, *args: str) -> dict:
    import json

    from unipruning_cli.commands.plan import plan_command

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "plan.json"
    plan_command([*args, "--json", str(out)])
    return json.loads(out.read_text())


def test_the_7b_plan_counts_pinned_state_as_the_allocator_takes_it_and_fits_80gb_and_128gib(tmp_path, monkeypatch):
    """V, Γ and the restore copy of the host-mode search in pinned arenas: the plan's host figure is their chunks,
    bytes for bytes, and the default 7B run fits one 80 GB GPU on a 128 GiB host."""
    plan = _plan_json(tmp_path, monkeypatch, "model=qwen2.5-7b", "--gpus", "1", "--gpu-memory", "80GiB",
                      "--host-memory", "128GiB")
    assert plan["fits"] and plan["disk_gib"]["run_dir"] > 100  # Γ, two checkpoints of V, Γ, W, gradient, m, v
    stages = {s["stage"]: s for s in plan["stages"]}
    assert "V, Γ (fp32) on the host" in stages["search"]["what"]
    sizes = [s.numel() for s in _qwen7b_shapes()]
    arenas = arena_bytes([n * 2 for n in sizes]) + 2 * arena_bytes([n * 4 for n in sizes])
    assert stages["search"]["host_gib"] == round(arenas / GIB, 2)
    per_matrix = sum(allocator_bytes(n * 2) + 2 * allocator_bytes(n * 4) for n in sizes)
    assert per_matrix / GIB > 114 and arenas / GIB < 61  # matrix by matrix: 114.9 GiB pinned, then kept cached


def test_the_70b_plan_over_8_gpus_counts_fsdp_and_nccl_buffers_and_fits(tmp_path, monkeypatch):
    from unipruning_cli.stages.plan.rows import NCCL_BUFFERS

    plan = _plan_json(tmp_path, monkeypatch, "model=llama-3.1-70b", "--gpus", "8", "--gpu-memory", "80GiB")
    assert plan["fits"] and plan["ranks"] == 8 and plan["fsdp_offload"]
    search = {s["stage"]: s for s in plan["stages"]}["search"]
    assert "reduce-scatter" in search["what"] and "NCCL" in search["what"] and "pinned" in search["what"]
    prunable_only = _plan_json(tmp_path, monkeypatch, "model=llama-3.1-70b", "--gpus", "8", "--gpu-memory", "80GiB",
                               "schedule.grad_clip_scope=prunable")
    lean = {s["stage"]: s for s in prunable_only["stages"]}["search"]
    # 70B's embeddings and lm_head (2 x 128256 x 8192 bf16) whole on every GPU as gradients before their reduce-scatter
    root_grads = 2 * 2 * 128256 * 8192 * 2
    assert search["gpu_gib"] - lean["gpu_gib"] >= round(root_grads / GIB, 2) - 0.02
    assert lean["gpu_gib"] * GIB > NCCL_BUFFERS


def test_after_the_group_is_closed_rank_0_goes_on_as_one_process(monkeypatch):
    """Once every rank has left (``finish``), a later ``from_main`` or ``start`` on rank 0 must not open a second
    process group its peers will never join (a hang until the timeout): it computes alone."""
    import torch.distributed as dist

    monkeypatch.setattr(distributed, "_FINISHED", True)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("a second process group"))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda *a, **kw: pytest.fail("a collective with no peers"))
    ranks = Ranks(rank=0, world=2, local=0)
    assert distributed.from_main(lambda: 7, ranks) == 7
    assert distributed.broadcast("x", ranks) == "x"
    assert distributed.start(ranks) == distributed.compute_device(ranks)


def _failing_record_worker(rank: int, world: int, port: int, out) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        def record():  # rank 0 writing Γ to a full disk, as search.sharded.run_sharded_search does
            raise OSError(28, "No space left on device")

        try:
            distributed.from_main(record, Ranks(rank, world))
            out.put((rank, "no error"))
        except OSError as err:
            out.put((rank, err.strerror))
    finally:
        dist.destroy_process_group()


def test_a_failure_writing_the_sharded_search_is_raised_on_every_rank_at_once():
    """Rank 0 writes Γ while the other ranks wait for it: what fails there reaches every rank at once, not after the
    collective timeout (two hours) the others would otherwise wait."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    t0 = time.perf_counter()
    mp.start_processes(_failing_record_worker, args=(2, 29800 + os.getpid() % 90, out), nprocs=2, join=True,
                       start_method="spawn")
    got = dict(out.get() for _ in range(2))
    assert got == {0: "No space left on device", 1: "No space left on device"}
    assert time.perf_counter() - t0 < 50  # well before the group's 60 s timeout
