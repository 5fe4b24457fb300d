"""Calibration and evaluation protocols: windows inside one document (Wanda / SparseGPT), truncated documents
(the UniPruning reference), C4's 256 random evaluation windows (seed 0), and per-block keyword arguments
taken from the real forward (sliding-window layers).

Each test names the finding of issue 17 it covers (item 8: protocols; item 9: block 0's kwargs reused).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from unipruning_cli.data import corpora as data
from unipruning_cli.data.calibration import calibrate_blockwise, capture_block_inputs

from _helpers import hook_sq_sums

SEQLEN = 24


@pytest.fixture()
def fresh_memo(monkeypatch):
    """No corpus memo crosses tests (a monkeypatched corpus shares its name with the real one)."""
    monkeypatch.setattr(data, "_DOCS", {}, raising=False)  # raising=False: the test also runs on older code
    monkeypatch.setattr(data, "_STREAMS", {})


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _docs(n: int, seed: int = 0) -> list[str]:
    """Documents of distinct words (each word a number), 5 to 60 words long: a window's tokens tell its document."""
    rng = random.Random(seed)
    return [" ".join(f"doc{d}w{k}" for k in range(rng.randint(5, 60))) for d in range(n)]


def _jsonl(tmp_path, texts: list[str]):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return str(path)


def _cfg(source: str, nsamples: int = 16, sampling: str | None = "windows", seed: int = 0, seqlen: int = SEQLEN):
    calib = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "mode": "one_shot", "offload": "cpu"}
    if sampling is not None:
        calib["sampling"] = sampling
    return OmegaConf.create({"calibration": calib, "seed": seed, "model": {"add_bos": "auto", "path": "tiny"}})


def _inside_one_document(window: torch.Tensor, doc_ids: list[torch.Tensor]) -> bool:
    w = window.tolist()
    for ids in doc_ids:
        x = ids.tolist()
        if any(x[j:j + len(w)] == w for j in range(len(x) - len(w) + 1)):
            return True
    return False


# ------------------------------------------------------------------------------------------------
# Item 8: calibration windows inside one document, drawn as Wanda's / SparseGPT's loaders draw them.



def _c4_draws(tok, texts: list[str], n: int) -> torch.Tensor:
    """Wanda's lib/data.py get_c4 (and GPTQ's C4 evaluation draws), written out: random.seed(0); n times a random
    document longer than seqlen, then a random offset in it."""
    random.seed(0)
    expected = []
    for _ in range(n):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tok(texts[i], return_tensors="pt").input_ids
            if enc.shape[1] > SEQLEN:
                break
        j = random.randint(0, enc.shape[1] - SEQLEN - 1)
        expected.append(enc[0, j:j + SEQLEN])
    return torch.stack(expected)

def test_calibration_windows_lie_inside_one_document_as_wanda_draws_them(tmp_path, tok, fresh_memo):
    """Old main joined the documents and drew windows across their boundaries (the check below fails there)."""
    from unipruning_cli.data.calibration_set import calibration_set

    texts = _docs(60)
    windows, info = calibration_set(_cfg(_jsonl(tmp_path, texts)), tok)
    doc_ids = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    assert len(windows) == 16 and all(w.numel() == SEQLEN for w in windows)
    assert all(_inside_one_document(w, doc_ids) for w in windows)
    assert torch.equal(windows.as_tensor(), _c4_draws(tok, texts, 16))
    assert info["sampling"] == "windows" and info["tokens"] == 16 * SEQLEN and 1 < info["documents"] <= 16


def test_windows_fall_back_to_the_stream_loudly_when_few_documents_are_long_enough(tmp_path, tok, fresh_memo, caplog):
    """A corpus of short paragraphs (owt_offline at 512 tokens has 4 such documents): today's joined-stream
    windows, bit for bit, and the fallback is logged and recorded."""
    from unipruning_cli.data.calibration_set import calibration_set

    texts = _docs(60)
    texts = [t if i < 3 else " ".join(t.split()[:2]) for i, t in enumerate(texts)]  # only 3 long documents
    source = _jsonl(tmp_path, texts)
    with caplog.at_level("WARNING"):
        windows, info = calibration_set(_cfg(source), tok)
    assert "only 3 document(s)" in caplog.text
    assert info["sampling"] == "stream" and info["requested"] == "windows"
    stream = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    assert torch.equal(windows.as_tensor(), data.calibration_windows(stream, 16, SEQLEN, 0))


def test_documents_sampling_is_the_references_truncated_documents(tmp_path, tok, fresh_memo):
    """UniPruning reference (spec §4.1): train_test_split(test_size=0.95, seed) and its first documents, each
    tokenised alone and truncated at seqlen, so lengths differ. Old main had fixed windows only."""
    from datasets import Dataset

    from unipruning_cli.data.calibration_set import calibration_set

    texts = _docs(400, seed=1)  # 5 % of 400 = 20 documents in the reference's part, more than nsamples
    samples, info = calibration_set(_cfg(_jsonl(tmp_path, texts), nsamples=12, sampling="documents", seed=42,
                                        seqlen=200), tok)
    train = Dataset.from_dict({"text": texts}).train_test_split(test_size=0.95, seed=42)["train"]
    expected = [tok(t, return_tensors="pt", truncation=True, max_length=200).input_ids[0] for t in train["text"][:12]]
    assert [s.tolist() for s in samples] == [e.tolist() for e in expected]
    assert len(set(samples.lengths)) > 1 and max(samples.lengths) == 200
    assert info["sampling"] == "documents" and info["documents"] == 12 and info["tokens"] == sum(samples.lengths)


def test_documents_sampling_refuses_a_corpus_with_too_few_documents(tmp_path, tok, fresh_memo):
    from unipruning_cli.data.calibration_set import calibration_set
    from unipruning_cli.core.errors import UserError

    with pytest.raises(UserError, match="needs 16 documents"):
        calibration_set(_cfg(_jsonl(tmp_path, _docs(5)), sampling="documents"), tok)


def test_calibration_sampling_is_validated():
    from unipruning_cli.core.config import compose_prune, validate_values
    from unipruning_cli.core.errors import UserError

    validate_values(compose_prune(["calibration.sampling=documents"]))
    with pytest.raises(UserError, match="calibration.sampling='packed' is not allowed"):
        validate_values(compose_prune(["calibration.sampling=packed"]))


@torch.no_grad()
def test_variable_length_documents_calibrate_like_full_forwards(tmp_path, tok, tiny_llama_dir, fresh_memo,
                                                                 one_torch_thread):
    """Samples of different lengths flow through capture and every block (one-shot and sequential with a no-op
    callback): their statistics are those of plain forwards over each document."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.data.calibration_set import calibration_set

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    samples, _ = calibration_set(_cfg(_jsonl(tmp_path, _docs(40)), nsamples=6, sampling="documents", seqlen=64),
                                 tok)
    assert not samples.uniform
    ref = hook_sq_sums(model, samples)
    for sequential in (False, True):
        stats = calibrate_blockwise(model, samples, sequential=sequential, want_per_sample=True,
                                    on_block=lambda *a: None)
        for name, sq in ref.items():
            torch.testing.assert_close(stats[name].sq_sum, sq, rtol=1e-5, atol=1e-6)
            assert stats[name].count == samples.numel() and stats[name].sample_mean_sq.shape[0] == 6


# ------------------------------------------------------------------------------------------------
# Item 8: C4 perplexity on 256 random windows (seed 0), eval.max_windows capping, null for every window.


def _eval_cfg(max_windows, random_windows=256):
    return OmegaConf.create({"eval": {"corpora": ["c4"], "seqlen": SEQLEN, "max_windows": max_windows,
                                      "random_windows": random_windows},
                             "model": {"add_bos": False}})


def test_c4_perplexity_uses_256_random_windows_seed_0(tok, monkeypatch, fresh_memo):
    """GPTQ / SparseGPT datautils.py's C4 evaluation: 256 windows, each inside one random document, seed 0.
    Old main cut every non-overlapping window of the joined shard (the count check fails there)."""
    from unipruning_cli.stages.evaluation import eval_windows_of

    texts = _docs(300, seed=3)
    monkeypatch.setattr(data, "load_documents", lambda source, role: texts if source == "c4" else [])
    windows = eval_windows_of(_eval_cfg(None), tok)["c4"]
    assert windows.shape == (256, SEQLEN)
    assert torch.equal(windows, _c4_draws(tok, texts, 256))
    # eval.max_windows caps: the first draws of the same sequence.
    assert torch.equal(eval_windows_of(_eval_cfg(40), tok)["c4"], windows[:40])
    # eval.random_windows=null: every non-overlapping window of the joined shard (the old protocol).
    stream = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    every = eval_windows_of(_eval_cfg(None, random_windows=None), tok)["c4"]
    assert torch.equal(every, data.eval_windows(stream, SEQLEN))


def test_wikitext_style_corpora_keep_the_joined_stream_protocol(tmp_path, tok, fresh_memo):
    """WikiText-2's published protocol joins the test split with blank lines (crossing articles): unchanged."""
    from unipruning_cli.stages.evaluation import eval_windows_of

    texts = _docs(30)
    cfg = _eval_cfg(None)
    cfg.eval.corpora = [_jsonl(tmp_path, texts)]
    got = eval_windows_of(cfg, tok)[cfg.eval.corpora[0]]
    stream = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    assert torch.equal(got, data.eval_windows(stream, SEQLEN))


def test_dense_cache_key_tells_c4_protocols_apart():
    from unipruning_cli.stages.dense_evaluation import _windows_from

    assert _windows_from(_eval_cfg(None), "wikitext2") == {}
    assert _windows_from(_eval_cfg(None), "c4") != _windows_from(_eval_cfg(None, random_windows=None), "c4")


# ------------------------------------------------------------------------------------------------
# Item 9: every block runs on the keyword arguments the real forward gives it.


def _sliding_qwen2(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                      attn_implementation=attn)
    return Qwen2ForCausalLM(cfg).eval()


def _stats_equal_hooks(model, windows) -> dict:
    """One-shot statistics against hooks on plain full forwards; returns the hooks' Σx² per Linear."""
    ref = hook_sq_sums(model, windows)
    stats = calibrate_blockwise(model, windows)
    for name, sq in ref.items():
        torch.testing.assert_close(stats[name].sq_sum, sq, rtol=1e-5, atol=1e-6)
    return ref


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_sliding_window_blocks_calibrate_on_their_own_masks(attn, one_torch_thread):
    """Qwen2 with sliding-window layers 1-2 (window 4 < 16 tokens): one-shot statistics equal hooks on plain
    full forwards. Old main ran every block on block 0's full-attention mask: blocks 1-2 differ (shown here by
    running the blocks with block 0's kwargs, which is what old main did)."""
    model = _sliding_qwen2(attn)
    windows = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = _stats_equal_hooks(model, windows)

    import unipruning_cli.data.calibration as calibration

    real = calibration.capture_block_inputs

    def block0_everywhere(*args, **kwargs):
        hidden, kw = real(*args, **kwargs)
        return hidden, [kw[0]] * len(kw)

    try:
        calibration.capture_block_inputs = block0_everywhere
        old = calibrate_blockwise(model, windows)
    finally:
        calibration.capture_block_inputs = real
    assert not torch.allclose(old["model.layers.1.mlp.up_proj"].sq_sum, ref["model.layers.1.mlp.up_proj"], rtol=1e-3)


@torch.no_grad()
def test_captured_kwargs_are_stored_once_and_blocks_do_not_run():
    """Identical tensors (rotary tables, a mask shared by layers or equal across samples) are stored once; the
    capture runs no block (its forward is swapped for a recorder) and restores the blocks afterwards."""
    model = _sliding_qwen2("eager")
    blocks = list(model.model.layers)
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a: ran.append(1)) for b in blocks]
    hidden, kw = capture_block_inputs(model, torch.randint(0, 64, (2, 16)), "cpu")
    for h in handles:
        h.remove()
    assert not ran and list(model.model.layers) == blocks
    assert len(hidden) == 2 and [len(k) for k in kw] == [2, 2, 2]
    assert kw[1][0]["attention_mask"] is kw[2][0]["attention_mask"] is kw[2][1]["attention_mask"]
    assert kw[0][0]["position_embeddings"][0] is kw[2][1]["position_embeddings"][0]
    assert not torch.equal(kw[0][0]["attention_mask"], kw[1][0]["attention_mask"])


def test_a_drift_search_and_sequential_sparsegpt_run_on_truncated_documents(tmp_path, tiny_llama_dir, corpus_files,
                                                                            isolated_env, fresh_memo, one_torch_thread):
    """Every consumer takes samples of different lengths: the drift search's LM loss (sample i of the set), the
    sequential SparseGPT pass; the sampling, documents and real token count are recorded."""
    from _helpers import tiny_overrides

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.commands.prune import run_prune

    source = _jsonl(tmp_path, _docs(40))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    for i, extra in enumerate((["method=unipruning", "schedule.weight_mode=drift", "schedule.steps=3"],
                               ["method=sparsegpt", "calibration.mode=sequential"])):
        cfg = compose_prune([*base, f"calibration.source={source}", "calibration.sampling=documents",
                             "calibration.nsamples=6", "model.seqlen=64", *extra])
        validate(cfg)
        metrics = run_prune(cfg, tmp_path / f"run{i}")
        calib = metrics["calibration"]
        assert calib["sampling"] == "documents" and calib["documents"] == 6 and 6 * 2 <= calib["tokens"] < 6 * 64
        pruned = next(iter(metrics["results"].values()))
        assert all(0 < p < 1e6 for p in pruned["ppl"].values())


def test_documents_sampling_on_a_too_small_file_corpus_is_refused_before_the_model_loads(tiny_llama_dir, corpus_files):
    """A .txt corpus is one document: preflight refuses nsamples=8 truncated documents from it."""
    from _helpers import tiny_overrides

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.stages.preflight import validate

    cfg = compose_prune([*tiny_overrides(tiny_llama_dir, corpus_files), "calibration.sampling=documents"])
    with pytest.raises(UserError, match="needs 8 documents; .* has 1"):
        validate(cfg)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
@torch.no_grad()
def test_gemma_layers_get_their_own_mask_and_rotary_tables(arch, one_torch_thread):
    """Gemma 2/3 alternate sliding and full attention (Gemma 3 also with their own rotary tables, read through
    ``layer.attention_type``): one-shot statistics equal hooks on full forwards; block 0's kwargs (old main's)
    do not."""
    import unipruning_cli.data.calibration as calibration
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config_cls, model_cls = {"gemma2": (Gemma2Config, Gemma2ForCausalLM),
                             "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                 sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])).eval()
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _stats_equal_hooks(model, windows)
    real = calibration.capture_block_inputs
    try:
        calibration.capture_block_inputs = lambda *a, **k: (lambda h, kw: (h, [kw[0]] * len(kw)))(*real(*a, **k))
        old = calibrate_blockwise(model, windows)
    finally:
        calibration.capture_block_inputs = real
    name = "model.layers.1.mlp.up_proj"
    assert not torch.allclose(old[name].sq_sum, ref[name], rtol=1e-3)
