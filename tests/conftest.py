"""Shared fixtures: tiny random-weight Llama / Qwen2 models with a real (small) tokenizer, tiny corpora.

The models are built from transformers configs and saved as local HF folders, so tests exercise the
same loading code as a user's model folder, in seconds, without any hub or cache.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

_WORDS = ("the model prunes weights with a mask while activations flow through every layer of the network "
          "and sparse matrices keep half of their entries so perplexity grows slowly when calibration data "
          "is good and the saliency is anchored to a local metric").split()


def make_text(seed: int, n_words: int = 6000) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return " ".join(sentences)


def make_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(arch)


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


def tiny_overrides(model_dir: Path, corpus_files: dict[str, Path], **extra: object) -> list[str]:
    """Overrides that point a prune run at a tiny local model and tiny corpora."""
    args = [
        "method=local", "local_metric=wanda",
        "model=local", f"model.path={model_dir}", "model.seqlen=32",
        f"calibration.source={corpus_files['calib']}", "calibration.nsamples=8",
        f"eval.corpora=[{corpus_files['eval']}]", "eval.max_windows=4", "eval.batch_size=2",
        # one cut per run, as the tests were written: UniPruning's default adds 0.6, 0.7, 2:4 and Wanda beside
        "export.sparsities=[]", "export.patterns=[]", "eval.baselines=[]",
    ]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture()
def frozen_search_cfg(tmp_path, monkeypatch, tiny_llama_dir, corpus_files):
    """``make(*overrides)``: validated UniPruning configs (frozen W, 3 steps) on the tiny Llama, cache in tmp_path."""
    from unipruning_cli.config import compose_prune
    from unipruning_cli.preflight import validate

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


def _real_cache() -> Path:
    from unipruning_cli.paths import cache_dir

    return cache_dir()


#: The prepared offline assets (``unipruning prepare``), whatever cache a test later points UNIPRUNING_CACHE at.
REAL_CACHE = _real_cache()


def real_model_prepared() -> bool:
    from unipruning_cli.paths import cache_dir

    return (cache_dir() / "models" / "smollm2-135m" / "config.json").exists()


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
