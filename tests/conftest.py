"""Shared fixtures: tiny random-weight Llama / Qwen2 models with a real (small) tokenizer, tiny corpora, one torch
thread, a guard that no weight is read.

The models are built from transformers configs and saved as local HF folders, so tests exercise the
same loading code as a user's model folder, in seconds, without any hub or cache. The helpers behind them live in
``_helpers.py``; test modules import from there, never from here.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from _helpers import build_tiny_model, make_text, make_tokenizer, tiny_overrides  # noqa: E402


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    files = {"calib": root / "calib.txt", "eval": root / "eval.txt"}
    files["calib"].write_text(make_text(1))
    files["eval"].write_text(make_text(2))
    return files


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_files):
    return make_tokenizer(corpus_files["calib"].read_text())


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = build_tiny_model(request.param, len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def isolated_env(tmp_path, monkeypatch) -> Path:
    """Runs and caches of a test go under tmp_path, never the user's folders."""
    monkeypatch.setenv("UNIPRUNING_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture()
def frozen_search_cfg(tmp_path, monkeypatch, tiny_llama_dir, corpus_files):
    """``make(*overrides)``: validated UniPruning configs (frozen W, 3 steps) on the tiny Llama, cache in tmp_path."""
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    base += ["method=unipruning", "schedule.weight_mode=frozen", "schedule.steps=3"]

    def make(*extra: str):
        # UniPruning's runs cut per matrix (the reference's cut, exact on these tiny widths), unless told otherwise
        switched = any(e.startswith(("method=", "pattern.allocation=")) for e in extra)
        cfg = compose_prune([*base, *([] if switched else ["pattern.allocation=per_matrix"]), *extra])
        validate(cfg)
        return cfg

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def no_weights_read(monkeypatch):
    """Any attempt to load a model's weights fails the test: the checks must come before."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
