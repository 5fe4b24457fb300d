"""The search's checkpoints, written and read one matrix at a time, and its random draws on the weights' device.

A checkpoint is a folder of one file per matrix plus a pointer written last (``search/state.py``): resuming gives
Γ bit for bit, a write interrupted half-way leaves the previous checkpoint in use, and no write or read holds more
than one matrix's tensors. The CUDA tests (skipped without a GPU) check that the draws happen on the GPU, that
both stochRIA samplers run there, and that a search on the GPU resumes bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import build_tiny_model
from unipruning_cli.metrics import build_metric
from unipruning_cli.models.loading import prunable_layers
from unipruning_cli.search import L1Prox, SearchSettings, search_drift, search_frozen
from unipruning_cli.search import frozen as FZ
from unipruning_cli.search import mirror_descent as MD
from unipruning_cli.search import state as ST
from unipruning_cli.search.state import Checkpoint, SearchState, write_checkpoint
from unipruning_cli.data.stats import ActivationStats


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------ the file format


def _groups(k: int, scale: float = 1.0):
    return [(f"layer.{i}", {"gamma": torch.full((3, 4), scale * i), "v": torch.full((3, 4), -scale * i)})
            for i in range(k)]


def test_a_checkpoint_is_a_folder_of_one_file_per_group_and_a_pointer_written_last(tmp_path):
    path = tmp_path / "checkpoints" / "search"
    write_checkpoint(path, "fp", 2, _groups(3), {"rng": torch.arange(5, dtype=torch.uint8)})
    meta = json.loads((tmp_path / "checkpoints" / "search.json").read_text())
    assert meta["step"] == 2 and meta["fingerprint"] == "fp" and meta["dir"] == "search.step2"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "search.step2").iterdir()) == [
        "common.safetensors", "m00000.safetensors", "m00001.safetensors", "m00002.safetensors"]
    ck = Checkpoint.open(path, "fp")
    assert ck.step == 2 and ck.names == ["layer.0", "layer.1", "layer.2"]
    assert torch.equal(ck.read("layer.2")["v"], torch.full((3, 4), -2.0))
    assert torch.equal(ck.common()["rng"], torch.arange(5, dtype=torch.uint8))
    assert Checkpoint.open(path, "another config") is None
    (tmp_path / "old").mkdir()  # the single-file checkpoint of earlier versions is not taken for one
    (tmp_path / "old" / "search.json").write_text(json.dumps({"step": 16, "fingerprint": "fp"}))
    assert Checkpoint.open(tmp_path / "old" / "search", "fp") is None
    write_checkpoint(path, "fp", 4, _groups(3, 10.0))
    assert not (tmp_path / "checkpoints" / "search.step2").exists()  # the older folder goes once the new one is in
    state = SearchState.load(path, "fp")
    assert state.step == 4 and torch.equal(state.gamma["layer.1"], torch.full((3, 4), 10.0))


def test_a_write_interrupted_at_its_second_group_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "search"
    write_checkpoint(path, "fp", 2, _groups(3))
    real, calls = ST.atomic_save_tensors, []

    def fails_at_the_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ST, "atomic_save_tensors", fails_at_the_second_group)
    with pytest.raises(OSError):
        write_checkpoint(path, "fp", 4, _groups(3, 10.0))
    monkeypatch.setattr(ST, "atomic_save_tensors", real)
    assert (tmp_path / "search.step4").is_dir()  # half written, and not taken for a checkpoint
    state = SearchState.load(path, "fp")
    assert state.step == 2 and torch.equal(state.gamma["layer.2"], torch.full((3, 4), 2.0))
    write_checkpoint(path, "fp", 4, _groups(3, 10.0))  # the next try replaces the half-written folder
    assert SearchState.load(path, "fp").step == 4 and not (tmp_path / "search.step2").exists()


# ------------------------------------------------------------------------------------ drift


def _drift(model, windows, path, settings, metric="stochria", lam=1e-3):
    return search_drift(model, prunable_layers(model), windows, build_metric(metric), L1Prox(lam), settings,
                        path, "fp", path.with_suffix(".jsonl"))[0]


@pytest.fixture()
def windows(tiny_tokenizer):
    return torch.randint(3, len(tiny_tokenizer), (5, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rho, search_state", [(0.0, "device"), (1e-2, "host")])
def test_drift_resumes_bit_exactly_after_a_checkpoint_interrupted_mid_write(tiny_tokenizer, windows, tmp_path,
                                                                            monkeypatch, rho, search_state):
    """Steps 1-6, checkpoints after steps 2 and 4; the write of step 4's fails at its second matrix. The run
    resumes from step 2 (the complete checkpoint) and ends with the Γ of an uninterrupted run, bit for bit."""
    settings = SearchSettings(steps=6, lr=1e-2, checkpoint_every=2, rho=rho, search_state=search_state)
    vocab = len(tiny_tokenizer)
    full = _drift(build_tiny_model("llama", vocab), windows, tmp_path / "full", settings)
    real, writes = ST.atomic_save_tensors, []

    def fails_in_the_second_checkpoint(path, tensors, metadata=None):
        writes.append(path)
        if "step4" in path.parent.name and path.name == "m00001.safetensors":
            raise KeyboardInterrupt
        return real(path, tensors, metadata)

    monkeypatch.setattr(ST, "atomic_save_tensors", fails_in_the_second_checkpoint)
    model = build_tiny_model("llama", vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        _drift(model, windows, tmp_path / "cut", settings)
    monkeypatch.setattr(ST, "atomic_save_tensors", real)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # W restored even so
    assert Checkpoint.open(tmp_path / "cut", "fp").step == 2
    resumed_from = []
    real_restore = MD._restore_drift
    monkeypatch.setattr(MD, "_restore_drift", lambda saved, *a: resumed_from.append(saved.step) or real_restore(saved, *a))
    resumed = _drift(build_tiny_model("llama", vocab), windows, tmp_path / "cut", settings)
    assert resumed_from == [2]
    assert all(torch.equal(full[n], resumed[n]) for n in full)
    rows = [json.loads(r)["step"] for r in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 7))
    assert sorted(p.name for p in tmp_path.glob("cut.step*")) == ["cut.step4"]


def test_a_checkpoint_holds_one_matrix_on_the_host_at_a_time(tiny_tokenizer, windows, tmp_path, monkeypatch):
    """Every write and every read of a drift checkpoint is handed one matrix's tensors (V, Γ, W, its gradient,
    Adam's moments), or the small common group: never the state of all matrices."""
    settings = SearchSettings(steps=4, lr=1e-2, checkpoint_every=2)
    model = build_tiny_model("llama", len(tiny_tokenizer))
    layers = prunable_layers(model)
    group_bytes = {n: m.weight.numel() * (4 + 4 + 4 * m.weight.element_size()) for n, m in layers.items()}
    written, read = [], []
    real_write, real_read = ST.atomic_save_tensors, ST.load_tensors
    monkeypatch.setattr(ST, "atomic_save_tensors", lambda p, t, m=None: written.append(_nbytes(t)) or real_write(p, t, m))
    monkeypatch.setattr(ST, "load_tensors", lambda p: read.append(_nbytes(t := real_read(p))) or t)

    def interrupted_in_step_3(model_, windows_, step, settings_):
        if step == 2:
            raise KeyboardInterrupt
        return real_backward(model_, windows_, step, settings_)

    real_backward = MD._lm_backward
    monkeypatch.setattr(MD, "_lm_backward", interrupted_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        _drift(model, windows, tmp_path / "ck", settings)
    monkeypatch.setattr(MD, "_lm_backward", real_backward)
    _drift(model, windows, tmp_path / "ck", settings)
    largest, total = max(group_bytes.values()), sum(group_bytes.values())
    # grad_clip_scope=model: each other parameter's accumulated gradient is a group of its own
    prunable = {id(m.weight) for m in layers.values()}
    others = [q.numel() * q.element_size() for q in model.parameters() if id(q) not in prunable]
    groups = len(layers) + len(others) + 1
    assert len(written) == groups and len(read) == groups  # one checkpoint (step 2), read once
    assert sorted(written[:len(layers)]) == sorted(group_bytes.values())  # each matrix's group is all of its state
    assert sorted(written[len(layers):-1]) == sorted(others)
    assert max(written[:len(layers)]) <= largest < total and max(read) <= max(largest, *others)
    assert written[-1] < 16_000  # the common group: two generator states (5 KiB each on the CPU) and Adam's step


# ------------------------------------------------------------------------------------ frozen


def test_frozen_checkpoints_are_per_matrix_and_resume_after_an_interrupted_write(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(6, 8, generator=gen) for i in range(5)}
    stats = {n: ActivationStats(sq_sum=torch.rand(8, dtype=torch.float64) * 48, count=48,
                                sample_mean_sq=torch.rand(3, 8, generator=gen)) for n in weights}
    settings = SearchSettings(steps=5, weight_mode="frozen", checkpoint_every=2)

    def run(tag):
        return search_frozen(weights, stats, build_metric("stochria"), L1Prox(1e-2), settings, tmp_path / tag, "fp",
                             tmp_path / f"{tag}.jsonl")[0]

    full = run("a")
    real = ST.atomic_save_tensors

    def fails_in_the_second_checkpoint(path, tensors, metadata=None):
        if path.parent.name == "b.step4" and path.name == "m00001.safetensors":
            raise KeyboardInterrupt
        return real(path, tensors, metadata)

    monkeypatch.setattr(ST, "atomic_save_tensors", fails_in_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run("b")
    monkeypatch.setattr(ST, "atomic_save_tensors", real)
    ck = Checkpoint.open(tmp_path / "b", "fp")
    assert ck.step == 2 and ck.names == ["l0", "l1"]
    calls = []
    real_one = FZ._search_one_frozen
    monkeypatch.setattr(FZ, "_search_one_frozen", lambda i, *a, **k: calls.append(i) or real_one(i, *a, **k))
    resumed = run("b")
    assert calls == [2, 3, 4]
    assert all(torch.equal(full[n], resumed[n]) for n in full)


# ------------------------------------------------------------------------------------ CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("sampler", ["exact", "cyclic"])
def test_stochria_draws_on_the_generators_device(sampler):
    w = torch.randn(96, 160, device="cuda")
    metric = build_metric("stochria", sampler=sampler)
    stats = ActivationStats(sq_sum=torch.rand(160, dtype=torch.float64) * 10, count=10)
    a = metric.score(w, stats, generator=torch.Generator(device="cuda").manual_seed(3))
    b = metric.score(w, stats, generator=torch.Generator(device="cuda").manual_seed(3))
    assert a.device.type == "cuda" and torch.equal(a, b) and torch.isfinite(a).all()


@cuda
def test_a_search_on_cuda_draws_there_and_resumes_its_draws(tiny_tokenizer, windows, tmp_path, monkeypatch):
    """The metric's generator is a CUDA generator, its state is checkpointed (as CPU bytes) and restored: the
    resumed run's steps 3-4 start from the generator states of the uninterrupted run's. Γ is compared with a
    tolerance only, since CUDA's backward kernels need not be deterministic from one run to the next."""
    settings = SearchSettings(steps=4, lr=1e-2, checkpoint_every=2, search_state="host")
    states = []
    real_score = MD._score_and_update
    monkeypatch.setattr(MD, "_score_and_update",
                        lambda params, names, stats, metric, gen, *a: states.append((gen.device.type, gen.get_state()))
                        or real_score(params, names, stats, metric, gen, *a))

    def model():
        return build_tiny_model("llama", len(tiny_tokenizer)).cuda()

    full = _drift(model(), windows, tmp_path / "full", settings)
    assert [d for d, _ in states] == ["cuda"] * 4
    full_states, states[:] = [s for _, s in states], []
    real_backward = MD._lm_backward

    def interrupted_in_step_3(model_, windows_, step, settings_):
        if step == 2:
            raise KeyboardInterrupt
        return real_backward(model_, windows_, step, settings_)

    monkeypatch.setattr(MD, "_lm_backward", interrupted_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        _drift(model(), windows, tmp_path / "cut", settings)
    monkeypatch.setattr(MD, "_lm_backward", real_backward)
    states[:] = []
    resumed = _drift(model(), windows, tmp_path / "cut", settings)
    assert all(torch.equal(a, b) for a, (_, b) in zip(full_states[2:], states, strict=True))
    for n in full:
        torch.testing.assert_close(resumed[n], full[n], rtol=1e-3, atol=1e-5)
