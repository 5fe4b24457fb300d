"""Perplexity against HF's own loss, and the windowing of evaluation and calibration streams."""

from __future__ import annotations

import math

import pytest
import torch

from unipruning_cli.data.corpora import calibration_windows, eval_windows, token_stream
from unipruning_cli.core.errors import UserError
from unipruning_cli.evaluation.perplexity import perplexity, window_nlls
from unipruning_cli.data.sampling import with_bos


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eval_ids(tiny_llama_dir, corpus_files) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tok(corpus_files["eval"].read_text(), return_tensors="pt").input_ids[0]


def _reference_ppl(model, windows: torch.Tensor) -> tuple[float, list[float]]:
    """exp(mean over windows of HF's mean shifted cross-entropy), one window at a time."""
    losses = []
    with torch.no_grad():
        for w in windows:
            w = w.unsqueeze(0)
            losses.append(float(model(input_ids=w, labels=w).loss))
    return math.exp(sum(losses) / len(losses)), losses


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_hf_loss(tiny_llama, eval_ids, batch_size):
    seqlen = 32
    windows = eval_ids[: 5 * seqlen].view(5, seqlen)  # 5 windows: batch 3 leaves a ragged last batch
    ref, ref_losses = _reference_ppl(tiny_llama, windows)
    res = perplexity(tiny_llama, windows, batch_size=batch_size)
    assert math.isclose(res.ppl, ref, rel_tol=1e-4)
    assert math.isclose(res.mean_nll, math.log(ref), rel_tol=1e-4)
    assert res.windows == 5 and res.seqlen == seqlen and res.tokens == 5 * (seqlen - 1)
    nlls = window_nlls(tiny_llama, windows, batch_size=batch_size)
    assert torch.allclose(nlls.double(), torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-4)


def test_perplexity_sensitive_to_weights(tiny_llama, eval_ids):
    import copy

    windows = eval_ids[:64].view(2, 32)
    damaged = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        damaged.model.layers[0].mlp.down_proj.weight.mul_(50.0)
    ref, _ = _reference_ppl(damaged, windows)
    assert math.isclose(perplexity(damaged, windows).ppl, ref, rel_tol=1e-4)
    assert not math.isclose(perplexity(tiny_llama, windows).ppl, ref, rel_tol=1e-3)


def test_with_bos_replaces_first_token():
    w = torch.arange(12).view(3, 4)
    out = with_bos(w, 99)
    assert out[:, 0].tolist() == [99, 99, 99]
    assert torch.equal(out[:, 1:], w[:, 1:])
    assert w[0, 0] == 0  # input untouched


# ----------------------------------------------------------------------------------- eval windows


def test_eval_windows_non_overlapping_remainder_dropped():
    stream = torch.arange(103)
    w = eval_windows(stream, 10)
    assert w.shape == (10, 10)
    for i in range(10):
        assert w[i].tolist() == list(range(10 * i, 10 * i + 10))
    assert 100 not in w  # the 3-token remainder is dropped


def test_eval_windows_max_windows():
    stream = torch.arange(100)
    assert eval_windows(stream, 10, max_windows=3).tolist() == [list(range(0, 10)), list(range(10, 20)),
                                                                 list(range(20, 30))]
    assert eval_windows(stream, 10, max_windows=50).shape == (10, 10)
    assert eval_windows(stream, 10, max_windows=None).shape == (10, 10)


def test_eval_windows_exactly_one():
    assert eval_windows(torch.arange(7), 7).tolist() == [list(range(7))]


def test_eval_corpus_shorter_than_a_window_is_a_user_error(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(torch.arange(9), 10)
    short = tmp_path / "short.txt"
    short.write_text("the model prunes")
    stream = token_stream(AutoTokenizer.from_pretrained(tiny_llama_dir), str(short), "eval")
    assert 0 < stream.numel() < 64
    with pytest.raises(UserError):
        eval_windows(stream, 64)


# ----------------------------------------------------------------------------------- calibration windows


def test_calibration_windows_deterministic_per_seed_and_contiguous():
    stream = torch.arange(1000)
    a = calibration_windows(stream, 16, 20, seed=0)
    b = calibration_windows(stream, 16, 20, seed=0)
    c = calibration_windows(stream, 16, 20, seed=1)
    assert a.shape == (16, 20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for w in torch.cat([a, c]):
        start = int(w[0])
        assert w.tolist() == list(range(start, start + 20))  # a contiguous slice of the stream
        assert 0 <= start and start + 20 <= 1000
    # not all from one place
    assert len({int(w[0]) for w in a}) > 1


def test_calibration_windows_of_a_too_short_stream():
    with pytest.raises(UserError):
        calibration_windows(torch.arange(10), 4, 10, seed=0)


def test_token_stream_joins_documents_with_a_blank_line(tmp_path, tiny_llama_dir):
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = ["the model prunes weights.", "sparse matrices keep half."]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "\n")
    got = token_stream(tok, str(path), "eval")
    want = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
    assert torch.equal(got, want)


def test_token_stream_tokenises_a_corpus_once_per_tokenizer_and_rereads_an_edited_file(tmp_path, tiny_llama_dir,
                                                                                       monkeypatch):
    import os

    from transformers import AutoTokenizer

    from unipruning_cli.data import corpora as data

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = tmp_path / "c.txt"
    path.write_text("the model prunes weights.\n")
    reads = []
    real = data.load_documents
    monkeypatch.setattr(data, "load_documents", lambda *a: reads.append(a) or real(*a))
    first = token_stream(tok, str(path), "eval")
    first[0] = -1  # a caller's change must not reach the next caller
    again = token_stream(tok, str(path), "eval")
    assert len(reads) == 1 and int(again[0]) != -1
    token_stream(AutoTokenizer.from_pretrained(tiny_llama_dir), str(path), "eval")  # another tokenizer object
    assert len(reads) == 2
    path.write_text("sparse matrices keep half of their weights.\n")
    os.utime(path, ns=(1, 1))
    edited = token_stream(tok, str(path), "eval")
    assert len(reads) == 3 and not torch.equal(edited, again)


# ----------------------------------------------------------------------------------- dense PPL cache


def _dense_cfg(model_dir, corpus):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "model": {"name": "local", "source": "local", "path": str(model_dir), "revision": None, "add_bos": False},
        "eval": {"corpora": [str(corpus)], "seqlen": 32, "max_windows": 3, "random_windows": 256, "batch_size": 2,
                 "tasks": []},
    })


def _file_windows(tok, path, seqlen=32, n=3):
    ids = tok(path.read_text(), return_tensors="pt").input_ids[0]
    return ids[: n * seqlen].view(n, seqlen)


def test_dense_perplexity_is_measured_then_cached(tmp_path, monkeypatch, tiny_llama, tiny_llama_dir, corpus_files):
    from transformers import AutoTokenizer

    from unipruning_cli.core.progress import Timer

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    corpus = tmp_path / "eval.txt"
    corpus.write_text(corpus_files["eval"].read_text())
    cfg = _dense_cfg(tiny_llama_dir, corpus)
    ref, _ = _reference_ppl(tiny_llama, _file_windows(tok, corpus))

    first = _dense_ppl(cfg, tiny_llama, tok, Timer())[str(corpus)]
    assert first["cached"] is False and math.isclose(first["ppl"], ref, rel_tol=1e-4)
    assert len(list((tmp_path / "cache" / "dense").glob("*.json"))) == 1
    timer = Timer()
    second = _dense_ppl(cfg, tiny_llama, tok, timer)[str(corpus)]
    assert second["cached"] is True and second["ppl"] == first["ppl"]
    assert "dense_eval" not in timer.seconds
    # another protocol (max_windows) is another cache entry
    cfg.eval.max_windows = 2
    third = _dense_ppl(cfg, tiny_llama, tok, Timer())[str(corpus)]
    assert third["cached"] is False and third["windows"] == 2


def test_dense_cache_follows_the_corpus_file_content(tmp_path, monkeypatch, tiny_llama, tiny_llama_dir, corpus_files):
    from transformers import AutoTokenizer

    from _helpers import make_text
    from unipruning_cli.core.progress import Timer

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    corpus = tmp_path / "eval.txt"
    corpus.write_text(corpus_files["eval"].read_text())
    cfg = _dense_cfg(tiny_llama_dir, corpus)
    _dense_ppl(cfg, tiny_llama, tok, Timer())
    corpus.write_text(make_text(7))  # same path, other text
    ref, _ = _reference_ppl(tiny_llama, _file_windows(tok, corpus))
    again = _dense_ppl(cfg, tiny_llama, tok, Timer())[str(corpus)]
    assert math.isclose(again["ppl"], ref, rel_tol=1e-4)


def _dense_ppl(cfg, model, tok, timer):
    """Dense perplexity per corpus as the runner computes (and caches) it."""
    from unipruning_cli.core.context import RunContext
    from unipruning_cli.stages.dense_evaluation import dense_evaluation
    from unipruning_cli.stages.evaluation import eval_windows_of

    return dense_evaluation(RunContext(cfg, timer=timer).loaded(model, tok), eval_windows_of(cfg, tok))["perplexity"]
