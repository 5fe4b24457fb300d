"""Tests for the SparseGPT baseline.

The central check compares against a deliberately naive SparseGPT (paper, Alg. 1) that chooses its own
mask and re-inverts the Hessian of the remaining columns in float64 at every column: the Cholesky /
lazy-batch formulation must pick the same weights and leave the same values.
"""

from __future__ import annotations

import pytest
import torch

from unipruning_cli.pruning.obs import accumulate_hessian, sparsegpt_prune


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _correlated_inputs(tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Calibration-like inputs whose features are correlated (so the Hessian is not diagonal)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, in_features, generator=g)
    mix = torch.eye(in_features) + 0.6 * torch.randn(in_features, in_features, generator=g)
    return z @ mix


def _problem(out: int, in_features: int, tokens: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, hessian, inputs) for a small random layer."""
    g = torch.Generator().manual_seed(seed + 1000)
    x = _correlated_inputs(tokens, in_features, seed)
    weight = torch.randn(out, in_features, generator=g)
    hessian, _ = accumulate_hessian(None, x, 0)
    return weight, hessian, x


def _naive_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.0, n: int = 0, m: int = 0,
                     blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) written the slow way: float64, plain loops, one weight at a time.

    It chooses its own mask. With the free columns F = j.. at column j (columns < j are fixed), the OBS
    quantities come from an explicit inverse of H restricted to F, never from a Cholesky factor:
    d_j = [(H_FF)⁻¹]_00 (what the paper reads off the upper Cholesky factor of H⁻¹ as [H⁻¹]_cc²),
    the saliency of w_rj is w_rj² / d_j, and pruning w_rj moves row r by −(w_rj / d_j)·[(H_FF)⁻¹]_{:,0}.
    Unstructured: at the start of each block of ``blocksize`` columns, the int(rows·width·sparsity)
    weights of the block with the lowest saliency (ties: lower row-major index) are chosen, on the
    weights as all earlier blocks left them. N:M: when column j starts a group of m, each row prunes
    its m − n lowest saliencies in columns j..j+m−1 (ties: lower column), on the weights as they are
    then; blocks are widened down to a multiple of m. Dead channels (H_jj = 0) are zeroed and decoupled
    (H_jj = 1) before dampening by percdamp · mean(diag H). Returns (new weight float64, keep mask).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            for r in range(rows):
                w[r, j] = 0.0
    damp = percdamp * sum(float(h[j, j]) for j in range(cols)) / cols
    for j in range(cols):
        h[j, j] += damp
    inv_free = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]  # (H_FF)⁻¹ for F = j..
    d = [float(inv_free[j][0, 0]) for j in range(cols)]
    prune = [[False] * cols for _ in range(rows)]
    width = min(blocksize, cols)
    if m:
        width = max(m, width - width % m)
    for start in range(0, cols, width):
        end = min(start + width, cols)
        if not m:
            sal = [(float(w[r, j]) ** 2 / d[j], r * (end - start) + (j - start), r, j)
                   for r in range(rows) for j in range(start, end)]
            for _, _, r, j in sorted(sal)[: int(rows * (end - start) * sparsity)]:
                prune[r][j] = True
        for j in range(start, end):
            if m and j % m == 0:
                for r in range(rows):
                    group = sorted((float(w[r, c]) ** 2 / d[c], c) for c in range(j, j + m))
                    for _, c in group[: m - n]:
                        prune[r][c] = True
            for r in range(rows):
                if prune[r][j]:
                    coef = float(w[r, j]) / d[j]
                    for k in range(j, cols):
                        w[r, k] -= coef * float(inv_free[j][k - j, 0])
                    w[r, j] = 0.0
    return w, ~torch.tensor(prune, dtype=torch.bool)


def _layer_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return torch.linalg.norm(x @ weight.t() - x @ pruned.float().t()).item()


# --------------------------------------------------------------------------------------------
# 1. equivalence with naive OBS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out,in_features,blocksize,sparsity,n,m",
    [
        (6, 16, 16, 0.3, 0, 0),  # one block
        (8, 40, 16, 0.5, 0, 0),  # three blocks, the last one ragged (8 columns)
        (5, 12, 5, 0.6, 0, 0),  # ragged last block of 2 columns
        (4, 24, 128, 0.7, 0, 0),  # block wider than the matrix
        (8, 32, 16, 0.0, 2, 4),  # four groups per block: each chosen when it is reached
        (8, 16, 6, 0.0, 2, 4),  # blocksize rounded down to 4
        (6, 24, 128, 0.0, 1, 4),
        (6, 24, 12, 0.0, 3, 8),  # blocksize rounded down to 8
    ],
)
def test_matches_naive_sparsegpt(out: int, in_features: int, blocksize: int, sparsity: float, n: int, m: int) -> None:
    """Mask and weights against the naive reference, which chooses its own mask."""
    weight, hessian, _ = _problem(out, in_features, seed=out * 31 + in_features)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=sparsity, n=n, m=m, blocksize=blocksize)
    ref_w, ref_keep = _naive_sparsegpt(weight, hessian, sparsity, n, m, blocksize)
    assert 0 < int((~ref_keep).sum()) < ref_keep.numel()
    assert torch.equal(keep, ref_keep), (~keep ^ ~ref_keep).nonzero().tolist()
    scale = ref_w.abs().max().item()
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(ref_w[ref_keep], weight.double()[ref_keep])  # the kept weights were updated


def test_selection_is_not_magnitude_nor_a_one_pass_cut() -> None:
    """The reference's mask is none of the plausible wrong rules, so the comparison above tells them apart:
    magnitude per block, the saliency of the original (not yet updated) weights per block, one cut of the
    whole matrix by that saliency."""
    weight, hessian, _ = _problem(8, 40, seed=8 * 31 + 40)
    _, ref_keep = _naive_sparsegpt(weight, hessian, 0.5, blocksize=16)
    damped = hessian.double() + 0.01 * hessian.diagonal().double().mean() * torch.eye(40, dtype=torch.float64)
    d = torch.tensor([torch.linalg.inv(damped[j:, j:])[0, 0].item() for j in range(40)], dtype=torch.float64)
    saliency = weight.double() ** 2 / d

    def cut(score: torch.Tensor, width: int) -> torch.Tensor:
        keep = torch.ones(score.shape, dtype=torch.bool)
        for start in range(0, score.shape[1], width):
            block = score[:, start:start + width]
            drop = block.reshape(-1).argsort()[: int(block.numel() * 0.5)]
            sub = torch.ones(block.numel(), dtype=torch.bool)
            sub[drop] = False
            keep[:, start:start + width] = sub.view(block.shape)
        return keep

    wrong = {"magnitude per block": cut(weight.double().abs(), 16),
             "original weights' saliency per block": cut(saliency, 16),
             "one cut of the whole matrix": cut(saliency, 40)}
    for rule, keep in wrong.items():
        assert not torch.equal(keep, ref_keep), rule


def test_matches_naive_sparsegpt_with_dead_channel() -> None:
    weight, _, x = _problem(6, 12, seed=7)
    x[:, 4] = 0.0
    hessian, _ = accumulate_hessian(None, x, 0)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=0.5, blocksize=5)
    ref_w, ref_keep = _naive_sparsegpt(weight, hessian, 0.5, blocksize=5)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-4, atol=1e-4 * ref_w.abs().max().item())
    assert torch.all(new_w[:, 4] == 0)


def test_zero_sparsity_is_identity() -> None:
    weight, hessian, _ = _problem(4, 8)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=0.0)
    assert keep.all()
    torch.testing.assert_close(new_w, weight)


# --------------------------------------------------------------------------------------------
# 2. mask counts
# --------------------------------------------------------------------------------------------


def test_unstructured_count_is_exact_per_block() -> None:
    out, in_features, blocksize, sparsity = 7, 40, 16, 0.37
    weight, hessian, _ = _problem(out, in_features)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=sparsity, blocksize=blocksize)
    widths = [min(blocksize, in_features - s) for s in range(0, in_features, blocksize)]
    expected = sum(int(out * w * sparsity) for w in widths)
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    assert int((~keep).sum()) == expected
    for start, width in zip(range(0, in_features, blocksize), widths):
        assert int((~keep[:, start : start + width]).sum()) == int(out * width * sparsity)
    assert torch.all(new_w[~keep] == 0)
    assert torch.all(new_w[keep] != 0)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (2, 4, 6), (1, 4, 8), (3, 8, 16)])
def test_nm_keeps_exactly_n_per_group(n: int, m: int, blocksize: int) -> None:
    out, in_features = 6, 32
    weight, hessian, _ = _problem(out, in_features)
    new_w, keep = sparsegpt_prune(weight, hessian, n=n, m=m, blocksize=blocksize)
    per_group = keep.view(out, in_features // m, m).sum(dim=-1)
    assert torch.all(per_group == n)
    assert torch.all(new_w[~keep] == 0)


# --------------------------------------------------------------------------------------------
# 3. reconstruction quality
# --------------------------------------------------------------------------------------------


def test_beats_mask_only_and_magnitude() -> None:
    in_features, out = 32, 16
    x = _correlated_inputs(256, in_features, seed=3)
    weight = torch.randn(out, in_features, generator=torch.Generator().manual_seed(4))
    hessian, _ = accumulate_hessian(None, x, 0)
    new_w, keep = sparsegpt_prune(weight, hessian, sparsity=0.5)

    mask_only = weight * keep
    k = weight.numel() // 2
    magnitude_keep = torch.ones(weight.numel(), dtype=torch.bool)
    magnitude_keep[weight.abs().flatten().argsort()[:k]] = False
    magnitude = weight * magnitude_keep.view_as(weight)

    err_sgpt = _layer_error(x, weight, new_w)
    assert err_sgpt < _layer_error(x, weight, mask_only)
    assert err_sgpt < _layer_error(x, weight, magnitude)


# --------------------------------------------------------------------------------------------
# 4. robustness, dtype, argument checking
# --------------------------------------------------------------------------------------------


def test_dead_channel_is_finite_and_zeroed() -> None:
    weight, _, x = _problem(8, 16, seed=5)
    x[:, 3] = 0.0
    hessian, _ = accumulate_hessian(None, x, 0)
    assert hessian[3, 3] == 0
    new_w, _ = sparsegpt_prune(weight, hessian, n=2, m=4)
    assert torch.isfinite(new_w).all()
    assert torch.all(new_w[:, 3] == 0)


def test_inputs_not_modified() -> None:
    weight, hessian, _ = _problem(6, 16)
    hessian[2, :] = 0.0  # a dead channel exercises the in-place diagonal fix-up
    hessian[:, 2] = 0.0
    w0, h0 = weight.clone(), hessian.clone()
    sparsegpt_prune(weight, hessian, sparsity=0.5, blocksize=4)
    assert torch.equal(weight, w0)
    assert torch.equal(hessian, h0)


def test_bf16_in_bf16_out() -> None:
    weight, hessian, _ = _problem(6, 16)
    new_w, keep = sparsegpt_prune(weight.bfloat16(), hessian, sparsity=0.5)
    assert new_w.dtype == torch.bfloat16
    assert keep.dtype == torch.bool
    assert torch.all(new_w[~keep] == 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"n": 2, "m": 0}, r"n=2, m=0.*in_features=12"),
        ({"n": 4, "m": 4}, r"n=4, m=4"),
        ({"n": 0, "m": 4}, r"n=0, m=4"),
        ({"n": 2, "m": 8}, r"n=2, m=8, in_features=12"),
        ({"blocksize": 0}, "blocksize"),
        ({"percdamp": -1.0}, "percdamp"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    weight, hessian, _ = _problem(4, 12)
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(weight, hessian, **kwargs)


def test_bad_tensors_raise() -> None:
    weight, hessian, _ = _problem(4, 12)
    with pytest.raises(ValueError, match="hessian shape"):
        sparsegpt_prune(weight, hessian[:8, :8], sparsity=0.5)
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(weight[0], hessian, sparsity=0.5)
    bad_w = weight.clone()
    bad_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains non-finite"):
        sparsegpt_prune(bad_w, hessian, sparsity=0.5)
    bad_h = hessian.clone()
    bad_h[1, 2] = float("inf")
    with pytest.raises(ValueError, match="hessian contains non-finite"):
        sparsegpt_prune(weight, bad_h, sparsity=0.5)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(weight, -torch.eye(12), sparsity=0.5, percdamp=0.0)


# --------------------------------------------------------------------------------------------
# 5. Hessian accumulation
# --------------------------------------------------------------------------------------------


def test_accumulate_hessian_matches_one_shot() -> None:
    g = torch.Generator().manual_seed(9)
    x1 = torch.randn(2, 5, 8, generator=g)  # [batch, seq, in]
    x2 = torch.randn(3, 8, generator=g)
    h, count = accumulate_hessian(None, x1, 0)
    h_before = h.clone()
    h, count = accumulate_hessian(h, x2, count)
    assert count == 13
    assert torch.equal(h_before, accumulate_hessian(None, x1, 0)[0])
    x_all = torch.cat([x1.reshape(-1, 8), x2])
    expected = (2.0 / 13) * x_all.t() @ x_all
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)


def test_accumulate_hessian_rejects_mismatch() -> None:
    h, count = accumulate_hessian(None, torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="in_features=6"):
        accumulate_hessian(h, torch.randn(4, 6), count)
    with pytest.raises(ValueError, match="count"):
        accumulate_hessian(None, torch.randn(4, 8), 3)


# --------------------------------------------------------------------------------------------
# 6. through the runner: sequential calibration and N:M
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def sparsegpt_run(tmp_path, monkeypatch, tiny_llama_dir, corpus_files, one_torch_thread):
    """``run(name, *overrides)``: ``method=sparsegpt`` through ``run_prune`` on the tiny Llama; returns
    (config, run dir, metrics). Caches under tmp_path."""
    from _helpers import tiny_overrides
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]

    def run(name: str, *extra: str):
        cfg = compose_prune([*base, "method=sparsegpt", *extra])
        validate(cfg)
        return cfg, tmp_path / name, run_prune(cfg, tmp_path / name)

    return run


def _run_masks(run_dir) -> dict[str, torch.Tensor]:
    from unipruning_cli.pruning.mask_files import load_masks

    files = sorted((run_dir / "masks").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_masks(files[0])


def _tiny(cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(cfg.model.path)


def _block_linears(model, i: int) -> dict[str, torch.nn.Linear]:
    return {f"model.layers.{i}.{n}": m for n, m in model.model.layers[i].named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _hessians(model, layers: dict, samples) -> dict[str, torch.Tensor]:
    """H = (2/T) Σ x xᵀ of each layer's inputs over full forwards of ``model`` (float64 sums, then fp32)."""
    xtx: dict[str, torch.Tensor] = {n: 0 for n in layers}
    tokens: dict[str, int] = {n: 0 for n in layers}

    def hook(name):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            xtx[name] = xtx[name] + x.t() @ x
            tokens[name] += x.shape[0]
        return fn

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in layers.items()]
    try:
        for s in samples:
            model(input_ids=s[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (2.0 * xtx[n] / tokens[n]).float() for n in layers}


@torch.no_grad()
def _by_hand(cfg, sequential: bool, **target) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """SparseGPT over the tiny model block by block, by hand: each block's Hessians from full forwards of the
    model as it then is (sequential: earlier blocks already pruned and reconstructed; one-shot: the dense model),
    every Linear of the block solved on the same inputs, then written back."""
    from unipruning_cli.data.calibration_set import calibration_set

    model, tok = _tiny(cfg)
    dense, _ = _tiny(cfg)
    samples, _ = calibration_set(cfg, tok)
    masks = {}
    for i in range(len(model.model.layers)):
        layers = _block_linears(model, i)
        hessians = _hessians(model if sequential else dense, _block_linears(model if sequential else dense, i), samples)
        for n, lin in layers.items():
            w, keep = sparsegpt_prune(lin.weight, hessians[n], **target)
            lin.weight.copy_(w)
            masks[n] = keep
    return model, masks


@torch.no_grad()
def _ppl(model, cfg) -> float:
    import math

    from unipruning_cli.data.corpora import eval_windows, token_stream

    _, tok = _tiny(cfg)
    windows = eval_windows(token_stream(tok, cfg.eval.corpora[0], "eval"), cfg.eval.seqlen, cfg.eval.max_windows)
    losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def _agree(got: dict, want: dict) -> float:
    """Fraction of mask entries on which two mask sets agree."""
    assert set(got) == set(want)
    same = sum(int((got[n] == want[n]).sum()) for n in want)
    return same / sum(m.numel() for m in want.values())


def test_sequential_sparsegpt_through_the_runner(sparsegpt_run) -> None:
    """``calibration.mode=sequential``: block i is solved on the outputs of the already pruned and reconstructed
    blocks < i, which is not what the one-shot run does, and is what a hand-run sequential loop does."""
    cfg, seq_dir, seq = sparsegpt_run("seq", "calibration.mode=sequential")
    _, one_dir, one = sparsegpt_run("one", "calibration.mode=one_shot")
    assert seq["calibration"]["mode"] == "sequential" and one["calibration"]["mode"] == "one_shot"
    seq_masks, one_masks = _run_masks(seq_dir), _run_masks(one_dir)

    hand_seq, hand_seq_masks = _by_hand(cfg, True, sparsity=0.5)
    hand_one, hand_one_masks = _by_hand(cfg, False, sparsity=0.5)
    assert _agree(seq_masks, hand_seq_masks) > 0.999 and _agree(one_masks, hand_one_masks) > 0.999
    block0 = [n for n in seq_masks if n.startswith("model.layers.0.")]
    later = [n for n in seq_masks if n not in block0]
    assert _agree({n: seq_masks[n] for n in block0}, {n: one_masks[n] for n in block0}) > 0.999  # same inputs
    assert _agree({n: seq_masks[n] for n in later}, {n: one_masks[n] for n in later}) < 0.99  # not the same
    assert _agree({n: hand_seq_masks[n] for n in later}, {n: hand_one_masks[n] for n in later}) < 0.99

    # the run's perplexity is the hand-run model's (a random tiny model: the two protocols differ by 3e-4)
    corpus = cfg.eval.corpora[0]
    hand_ppl = {"seq": _ppl(hand_seq, cfg), "one": _ppl(hand_one, cfg)}
    for metrics, mine, other in ((seq, "seq", "one"), (one, "one", "seq")):
        assert abs(metrics["sparsity"]["overall"] - 0.5) < 1e-6
        assert metrics["perplexity"][corpus]["pruned"]["ppl"] == pytest.approx(hand_ppl[mine], rel=1e-5)
        assert metrics["perplexity"][corpus]["pruned"]["ppl"] != pytest.approx(hand_ppl[other], rel=1e-5)


def test_nm_sparsegpt_through_the_runner(sparsegpt_run) -> None:
    """``pattern=2:4``: exactly 2 of every 4 consecutive inputs kept in every row, the masks of a hand-run
    SparseGPT 2:4, and kept weights rewritten (the run's perplexity is the reconstructed model's, not the masked
    original's)."""
    cfg, run_dir, metrics = sparsegpt_run("nm", "pattern=2:4")
    mode = metrics["calibration"]["mode"]  # SparseGPT's own protocol unless asked otherwise: sequential
    assert mode in ("sequential", "one_shot")
    masks = _run_masks(run_dir)
    dense, _ = _tiny(cfg)
    assert set(masks) == {n for i in range(len(dense.model.layers)) for n in _block_linears(dense, i)}
    for n, keep in masks.items():
        out_features, in_features = keep.shape
        assert torch.all(keep.view(out_features, in_features // 4, 4).sum(-1) == 2), n
    assert abs(metrics["sparsity"]["overall"] - 0.5) < 1e-6

    hand, hand_masks = _by_hand(cfg, mode == "sequential", n=2, m=4)
    assert _agree(masks, hand_masks) > 0.999
    ppl = metrics["perplexity"][cfg.eval.corpora[0]]["pruned"]["ppl"]
    assert ppl == pytest.approx(_ppl(hand, cfg), rel=1e-5)

    masked_only = dense
    with torch.no_grad():
        for i in range(len(dense.model.layers)):
            for n, lin in _block_linears(dense, i).items():
                lin.weight.mul_(masks[n])
                assert not torch.allclose(lin.weight, _block_linears(hand, i)[n].weight)  # kept weights moved
    assert ppl != pytest.approx(_ppl(masked_only, cfg), rel=1e-5)
