"""Run directory: atomic writes, safetensors round trip, stage markers, bit-packed masks on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from unipruning_cli.core.rundir import (RunDir, _atomic_write, atomic_save_tensors, atomic_write_json,
                                        atomic_write_text, fingerprint, load_tensors)
from unipruning_cli.pruning.mask_files import load_masks, save_masks


class Boom(Exception):
    pass


# ----------------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_creates_parents_and_writes(tmp_path):
    target = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(target, "hello\n")
    assert target.read_text() == "hello\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_atomic_write_replaces_existing(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failing_writer_keeps_previous_file_and_leaves_no_temp(tmp_path, exc):
    target = tmp_path / "metrics.json"
    target.write_text("previous content")

    def writer(p):
        p.write_text("half of the new conte")  # partial write, then the crash
        raise exc("crash")

    with pytest.raises(exc):
        _atomic_write(target, writer)
    assert target.read_text() == "previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failing_writer_for_a_new_file_leaves_nothing(tmp_path):
    target = tmp_path / "new.json"

    def writer(p):
        p.write_bytes(b"x")
        raise Boom()

    with pytest.raises(Boom):
        _atomic_write(target, writer)
    assert list(tmp_path.iterdir()) == []


def test_failing_tensor_save_keeps_previous_file(tmp_path):
    target = tmp_path / "t.safetensors"
    atomic_save_tensors(target, {"a": torch.arange(4.0)})
    before = target.read_bytes()
    # safetensors refuses non-string metadata values: the save fails inside the writer
    with pytest.raises(Exception):
        atomic_save_tensors(target, {"a": torch.zeros(3)}, {"bad": 1})  # type: ignore[dict-item]
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_atomic_write_json_round_trip(tmp_path):
    obj = {"b": 1, "a": [1.5, "x"], "t": torch.tensor([1, 2]), "p": tmp_path}
    atomic_write_json(tmp_path / "x.json", obj)
    back = json.loads((tmp_path / "x.json").read_text())
    assert back == {"b": 1, "a": [1.5, "x"], "t": [1, 2], "p": str(tmp_path)}


# ----------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "i64": torch.arange(6).reshape(2, 3),
        "noncontig": torch.randn(4, 6, generator=g).t(),
    }
    path = tmp_path / "x.safetensors"
    atomic_save_tensors(path, tensors, {"k": "v", "count": "12"})
    back = load_tensors(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v", "count": "12"}


# ----------------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_order_independent_and_value_sensitive():
    a = fingerprint({"x": 1, "y": [1, 2], "z": {"a": None}})
    b = fingerprint({"z": {"a": None}, "y": [1, 2], "x": 1})
    assert a == b
    assert fingerprint({"x": 2, "y": [1, 2], "z": {"a": None}}) != a
    assert fingerprint({"x": 1, "y": [2, 1], "z": {"a": None}}) != a


# ----------------------------------------------------------------------------------- stage markers


def test_stage_complete_only_with_matching_fingerprint_and_artifacts(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.path.is_dir()
    assert not rd.is_complete("prune", "fp1")  # no marker yet

    (rd / "masks").mkdir()
    (rd / "masks" / "m.safetensors").write_bytes(b"x")
    (rd / "calib.json").write_text("{}")
    rd.mark_complete("prune", "fp1", ["masks/m.safetensors", "calib.json"], 1.5, note="hi")

    marker = json.loads((rd.path / "stages" / "prune.json").read_text())
    assert marker["fingerprint"] == "fp1"
    assert marker["artifacts"] == ["masks/m.safetensors", "calib.json"]
    assert marker["seconds"] == 1.5 and marker["note"] == "hi" and marker["stage"] == "prune"
    assert rd.stage_info("prune") == marker

    assert rd.is_complete("prune", "fp1")
    assert not rd.is_complete("prune", "fp2")  # config changed
    assert not rd.is_complete("other", "fp1")  # another stage

    (rd / "calib.json").unlink()  # an artifact vanished
    assert not rd.is_complete("prune", "fp1")
    (rd / "calib.json").write_text("{}")
    assert rd.is_complete("prune", "fp1")

    rd.invalidate("prune")
    assert not rd.is_complete("prune", "fp1")
    rd.invalidate("prune")  # idempotent


def test_stage_marker_survives_a_new_rundir_object(tmp_path):
    RunDir(tmp_path).mark_complete("prune", "abc", [], 0.0)
    assert RunDir(tmp_path).is_complete("prune", "abc")


# ----------------------------------------------------------------------------------- masks on disk


def test_save_load_masks_round_trip_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    masks = {
        "model.layers.0.self_attn.q_proj": torch.rand(16, 64, generator=g) < 0.5,
        "model.layers.0.mlp.down_proj": torch.rand(3, 5, generator=g) < 0.3,  # 15 bits: padding
        "model.layers.1.odd": torch.rand(7, 13, generator=g) < 0.9,
        "one": torch.tensor([[True]]),
        "all_false": torch.zeros(2, 9, dtype=torch.bool),
        "all_true": torch.ones(4, 8, dtype=torch.bool),
    }
    path = tmp_path / "masks" / "s0.50.safetensors"
    save_masks(path, masks, {"target": "s0.50", "method": "local"})
    back = load_masks(path)
    assert set(back) == set(masks)
    for name, m in masks.items():
        assert back[name].dtype == torch.bool, name
        assert back[name].shape == m.shape, name
        assert torch.equal(back[name], m), name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["info"]) == {"target": "s0.50", "method": "local"}
    # bit-packed: one byte per 8 entries, rounded up
    raw = load_tensors(path)
    for name, m in masks.items():
        assert raw[name].dtype == torch.uint8
        assert raw[name].numel() == (m.numel() + 7) // 8
    assert [p.name for p in path.parent.iterdir()] == [path.name]
