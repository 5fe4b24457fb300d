"""Masks are checked against slow, obviously-right references written with plain loops.

The references rank with ``sorted(key=(-score, index))``, which states the tie-break rule
directly, so any disagreement with the vectorised code is a bug in the latter.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import pytest
import torch

from unipruning_cli.pruning.masks import (ALLOCATIONS, check_nm_applicable, global_masks, mask_sparsity, masks_for,
                                          nm_mask, nm_masks, num_pruned, per_matrix_mask, per_row_mask)
from unipruning_cli.pruning.mask_files import pack_mask, unpack_mask

SPARSITIES = [0.0, 0.1, 0.5, 0.7, 0.99, 1.0]
NM_PATTERNS = [(1, 4), (2, 4), (3, 4), (4, 8)]
# Shapes by the selection path they reach (masks._keep_top_along_last_dim, masks.kth_smallest): slices of at
# most 64 entries are cut by a stable sort, longer ones by selection (kthvalue), and a whole matrix of more
# than 32,768 entries by selection inside a band bracketed by a strided sample.
ROW_SHAPES = {"sort": (4, 16), "selection": (3, 150)}  # per row: the row length decides
MATRIX_SHAPES = {"sort": (4, 16), "selection": (7, 24), "sampled_band": (190, 180)}  # per matrix: numel


# --------------------------------------------------------------------------- inputs


def _random(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g).abs()


def _signed(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _all_equal(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.full(shape, 0.5)


def _many_zeros(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=g).abs()
    zero = torch.rand(shape, generator=g) < 0.8
    negative_zero = torch.rand(shape, generator=g) < 0.5
    values = torch.where(zero, torch.zeros(shape), values)
    return torch.where(zero & negative_zero, torch.full(shape, -0.0), values)


def _constant_rows(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    per_row = torch.randint(0, 3, (shape[0], 1), generator=g).float()
    return per_row.expand(shape).clone()


def _quantized(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 13, shape, generator=g).float()


def _extremes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    pool = torch.tensor(
        [float("inf"), float("-inf"), -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0]
    )
    return pool[torch.randint(0, len(pool), shape, generator=g)]


KINDS: dict[str, Callable[[tuple[int, ...], torch.Generator], torch.Tensor]] = {
    "random": _random,
    "signed": _signed,
    "all_equal": _all_equal,
    "many_zeros": _many_zeros,
    "constant_rows": _constant_rows,
    "quantized": _quantized,
    "extremes": _extremes,
}


def make_score(kind: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return KINDS[kind](shape, g)


def make_layers(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Several layers of different shapes and dtypes, so ties span layer boundaries."""
    return {
        "q_proj": make_score(kind, (4, 8), seed),
        "k_proj": make_score(kind, (3, 16), seed + 1),
        "mlp.up": make_score(kind, (5, 12), seed + 2).to(torch.bfloat16),
        "mlp.down": make_score(kind, (12, 5), seed + 3).to(torch.float16),
    }


# --------------------------------------------------------------------------- references


def ref_num_pruned(size: int, sparsity: float) -> int:
    return math.floor(size * Fraction(repr(sparsity)) + Fraction(1, 2))


def ref_rank(values: list[float]) -> list[int]:
    """Indices from the most to the least important: higher score first, then lower index (Python's sort is
    stable, with ``reverse=True`` too, so equal scores stay in index order; -0.0 == 0.0 there)."""
    return sorted(range(len(values)), key=values.__getitem__, reverse=True)


def ref_keep(values: list[float], keep: int) -> set[int]:
    return set(ref_rank(values)[:keep])


def _to_mask(kept: set[int], shape: tuple[int, ...]) -> torch.Tensor:
    flat = [i in kept for i in range(math.prod(shape))]
    return torch.tensor(flat, dtype=torch.bool).reshape(shape)


def ref_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    rows = score.float().tolist()
    out: list[list[bool]] = []
    for row in rows:
        kept = ref_keep(row, len(row) - ref_num_pruned(len(row), sparsity))
        out.append([j in kept for j in range(len(row))])
    return torch.tensor(out, dtype=torch.bool).reshape(score.shape)


def ref_per_matrix(score: torch.Tensor, sparsity: float, ranked: list[int] | None = None) -> torch.Tensor:
    """``ranked``: ``ref_rank`` of the flat scores, when the caller cuts one matrix at several sparsities."""
    size = score.numel()
    ranked = ref_rank(score.float().reshape(-1).tolist()) if ranked is None else ranked
    keep = [False] * size
    for i in ranked[: size - ref_num_pruned(size, sparsity)]:
        keep[i] = True
    return torch.tensor(keep, dtype=torch.bool).reshape(score.shape)


def assert_nontrivial(mask: torch.Tensor, sparsity: float, group: int | None = None) -> None:
    """A reference mask strictly between keep-all and prune-all, wherever the sparsity asks for that of its
    groups (``group`` entries each; default: the whole mask)."""
    group = mask.numel() if group is None else group
    if 0 < ref_num_pruned(group, sparsity) < group:
        assert mask.any() and not mask.all()


def ref_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows = score.float().tolist()
    out: list[list[bool]] = []
    for row in rows:
        keep_row = [False] * len(row)
        for start in range(0, len(row), m):
            for j in ref_keep(row[start : start + m], n):
                keep_row[start + j] = True
        out.append(keep_row)
    return torch.tensor(out, dtype=torch.bool)


def ref_global(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Concatenate everything in layer order; a flat index then encodes (layer, index)."""
    flat: list[float] = []
    for score in scores.values():
        flat.extend(score.float().reshape(-1).tolist())
    kept = ref_keep(flat, len(flat) - ref_num_pruned(len(flat), sparsity))
    masks, offset = {}, 0
    for name, score in scores.items():
        size = score.numel()
        local = {i - offset for i in kept if offset <= i < offset + size}
        masks[name] = _to_mask(local, tuple(score.shape))
        offset += size
    return masks


def ref_pack(mask: torch.Tensor) -> list[int]:
    bits = mask.reshape(-1).tolist()
    packed = [0] * ((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            packed[i // 8] |= 1 << (i % 8)
    return packed


def assert_masks_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == torch.bool, name
        assert torch.equal(actual[name], expected[name]), name


# --------------------------------------------------------------------------- num_pruned


def test_num_pruned_matches_exact_half_up_rounding() -> None:
    for size in [0, 1, 3, 4, 7, 10, 16, 25, 45, 100, 4096, 11008]:
        for sparsity in SPARSITIES + [0.25, 0.3, 0.6, 0.9, 0.125, 0.05]:
            assert num_pruned(size, sparsity) == ref_num_pruned(size, sparsity), (size, sparsity)


@pytest.mark.parametrize(
    ("size", "sparsity", "expected"),
    [
        (10, 0.25, 3),
        (4, 0.5, 2),
        (10, 0.7, 7),
        (100, 0.7, 70),
        (3, 0.5, 2),
        (5, 1.0, 5),
        # In floats these products land just below .5 (45 * 0.7 == 31.499999999999996).
        (45, 0.7, 32),
        (25, 0.58, 15),
        (100, 0.145, 15),
    ],
)
def test_num_pruned_known_values(size: int, sparsity: float, expected: int) -> None:
    assert num_pruned(size, sparsity) == expected


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_invalid_sparsity_raises(sparsity: float) -> None:
    score = make_score("random", (2, 8))
    with pytest.raises(ValueError, match="sparsity"):
        num_pruned(8, sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        per_row_mask(score, sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        global_masks({"a": score}, sparsity)


# --------------------------------------------------------------------------- local masks


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", list(ROW_SHAPES))
def test_per_row_matches_reference(kind: str, path: str) -> None:
    shape = ROW_SHAPES[path]
    score = make_score(kind, shape, seed=sum(shape))
    for sparsity in SPARSITIES:
        expected = ref_per_row(score, sparsity)
        assert_nontrivial(expected, sparsity, group=shape[1])
        mask = per_row_mask(score, sparsity)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert torch.equal(mask, expected), sparsity


@pytest.mark.parametrize(("kind", "path"), [(k, p) for p in MATRIX_SHAPES for k in KINDS
                                            if not (p == "sampled_band" and k == "signed")])  # "extremes" has signs
def test_per_matrix_matches_reference(kind: str, path: str) -> None:
    shape = MATRIX_SHAPES[path]
    score = make_score(kind, shape, seed=sum(shape))
    ranked = ref_rank(score.float().reshape(-1).tolist())
    levels = [0.0, 0.1, 0.7, 0.99, 1.0] if path == "sampled_band" else SPARSITIES  # the band's cut costs 0.2 s each
    for sparsity in levels:
        expected = ref_per_matrix(score, sparsity, ranked)
        assert_nontrivial(expected, sparsity)
        mask = per_matrix_mask(score, sparsity)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert torch.equal(mask, expected), sparsity


def test_per_row_keeps_exact_count_in_every_row() -> None:
    score = make_score("quantized", (9, 40))
    for sparsity in SPARSITIES:
        kept = per_row_mask(score, sparsity).sum(dim=1)
        assert kept.tolist() == [40 - ref_num_pruned(40, sparsity)] * 9


def test_per_matrix_keeps_exact_count() -> None:
    score = make_score("all_equal", (9, 40))
    for sparsity in SPARSITIES:
        assert int(per_matrix_mask(score, sparsity).sum()) == 360 - ref_num_pruned(360, sparsity)


def test_all_equal_scores_keep_lowest_indices() -> None:
    score = make_score("all_equal", (2, 8))
    expected_row = [True] * 4 + [False] * 4
    assert per_row_mask(score, 0.5).tolist() == [expected_row, expected_row]
    assert per_matrix_mask(score, 0.5).reshape(-1).tolist() == [True] * 8 + [False] * 8


@pytest.mark.parametrize("kind", ["signed", "quantized"])
def test_non_contiguous_and_half_precision_inputs(kind: str) -> None:
    base = make_score(kind, (16, 8), seed=3)
    score = base.t()  # [8, 16] view, not contiguous
    assert not score.is_contiguous()
    assert torch.equal(per_row_mask(score, 0.5), ref_per_row(score, 0.5))
    assert torch.equal(per_matrix_mask(score, 0.5), ref_per_matrix(score, 0.5))
    half = score.to(torch.bfloat16)
    assert torch.equal(per_row_mask(half, 0.7), ref_per_row(half, 0.7))
    assert torch.equal(nm_mask(half, 2, 4), ref_nm(half, 2, 4))


# --------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("kind", list(KINDS))
def test_nm_matches_reference(kind: str) -> None:
    for n, m in NM_PATTERNS:
        score = make_score(kind, (5, 24), seed=n + m)
        expected = ref_nm(score, n, m)
        assert_nontrivial(expected, 1 - n / m, group=m)
        mask = nm_mask(score, n, m)
        assert mask.dtype == torch.bool and mask.shape == score.shape
        assert torch.equal(mask, expected), (n, m)


@pytest.mark.parametrize("kind", ["random", "quantized", "extremes"])
def test_nm_with_groups_longer_than_64_matches_reference(kind: str) -> None:
    """Groups of more than 64 entries take the selection path (the usual 2:4 and 4:8 take the sort)."""
    score = make_score(kind, (3, 256), seed=5)
    assert torch.equal(nm_mask(score, 50, 128), ref_nm(score, 50, 128))


@pytest.mark.parametrize(("n", "m"), NM_PATTERNS)
def test_nm_keeps_exactly_n_per_group(n: int, m: int) -> None:
    score = make_score("quantized", (6, 32))
    groups = nm_mask(score, n, m).reshape(6, 32 // m, m).sum(dim=-1)
    assert groups.eq(n).all()


def test_nm_groups_are_consecutive_columns() -> None:
    # Row 0 is increasing: 2:4 must keep columns 2, 3 of each group of four consecutive columns.
    score = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    assert nm_mask(score, 2, 4).tolist() == [[False, False, True, True] * 2]


@pytest.mark.parametrize(("n", "m"), [(4, 4), (5, 4), (0, 4), (-1, 4)])
def test_nm_rejects_bad_pattern(n: int, m: int) -> None:
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        nm_mask(make_score("random", (2, 8)), n, m)
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        check_nm_applicable({"a": (2, 8)}, n, m)


def test_nm_rejects_indivisible_in_features() -> None:
    with pytest.raises(ValueError, match=r"2:4.*\(3, 6\)") as info:
        nm_mask(make_score("random", (3, 6)), 2, 4, name="layer.x")
    assert "layer.x" in str(info.value)


def test_check_nm_applicable_lists_all_bad_layers() -> None:
    shapes = {"a": (4, 6), "ok": (4, 8), "b": (2, 10)}
    with pytest.raises(ValueError) as info:
        check_nm_applicable(shapes, 2, 4)
    assert str(info.value) == (
        "pattern 2:4 cannot be applied: in_features not divisible by 4 for layers: "
        "a (in=6), b (in=10)"
    )
    check_nm_applicable({"ok": (4, 8), "also": (1, 16)}, 2, 4)  # must not raise


def test_nm_masks_checks_all_layers_before_work() -> None:
    scores = {"good": make_score("random", (2, 8)), "bad": make_score("random", (2, 6))}
    with pytest.raises(ValueError, match=r"bad \(in=6\)"):
        nm_masks(scores, 2, 4)


@pytest.mark.parametrize("kind", ["random", "quantized", "extremes"])
def test_nm_masks_matches_reference(kind: str) -> None:
    scores = {"a": make_score(kind, (3, 8)), "b": make_score(kind, (2, 16), seed=1)}
    expected = {name: ref_nm(score, 2, 4) for name, score in scores.items()}
    assert_masks_equal(nm_masks(scores, 2, 4), expected)


# --------------------------------------------------------------------------- global


@pytest.mark.parametrize("kind", list(KINDS))
def test_global_matches_concatenating_reference(kind: str) -> None:
    scores = make_layers(kind, seed=7)
    for sparsity in SPARSITIES:
        expected = ref_global(scores, sparsity)
        assert_nontrivial(torch.cat([m.reshape(-1) for m in expected.values()]), sparsity)
        assert_masks_equal(global_masks(scores, sparsity), expected)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.99])
def test_global_ties_span_layers_in_mapping_order(sparsity: float) -> None:
    # Same values everywhere: which layer is pruned must follow the mapping's order.
    scores = {"z": torch.ones(3, 4), "a": torch.ones(2, 4), "m": torch.ones(4, 4)}
    assert_masks_equal(global_masks(scores, sparsity), ref_global(scores, sparsity))
    reordered = {name: scores[name] for name in ["m", "a", "z"]}
    assert_masks_equal(global_masks(reordered, sparsity), ref_global(reordered, sparsity))


def test_global_mixed_kinds_and_non_contiguous() -> None:
    scores = {
        "quant": make_score("quantized", (4, 8)),
        "equal": torch.full((3, 8), 6.0),
        "view": make_score("quantized", (8, 5), seed=2).t(),
        "signed": make_score("signed", (2, 8)),
    }
    for sparsity in SPARSITIES:
        assert_masks_equal(global_masks(scores, sparsity), ref_global(scores, sparsity))


@pytest.mark.parametrize("kind", ["random", "all_equal", "quantized", "extremes"])
def test_global_keeps_exact_total(kind: str) -> None:
    scores = make_layers(kind, seed=11)
    total = sum(score.numel() for score in scores.values())
    for sparsity in SPARSITIES:
        kept = sum(int(mask.sum()) for mask in global_masks(scores, sparsity).values())
        assert kept == total - ref_num_pruned(total, sparsity)


def test_global_handles_empty_layer() -> None:
    scores = {"empty": torch.zeros(0, 4), "a": make_score("quantized", (3, 8))}
    assert_masks_equal(global_masks(scores, 0.5), ref_global(scores, 0.5))


# --------------------------------------------------------------------------- properties


def _global_single(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    return global_masks({"layer": score, "other": score.flip(0)}, sparsity)["layer"]


ALLOCATORS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "per_row": per_row_mask,
    "per_matrix": per_matrix_mask,
    "global": _global_single,
}


def _ref_global_single(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    return ref_global({"layer": score, "other": score.flip(0)}, sparsity)["layer"]


REFERENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "per_row": ref_per_row,
    "per_matrix": ref_per_matrix,
    "global": _ref_global_single,
}


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
@pytest.mark.parametrize("kind", ["random", "all_equal", "many_zeros", "quantized", "extremes"])
def test_masks_are_nested_across_sparsities(allocator: str, kind: str) -> None:
    score = make_score(kind, (6, 100), seed=5)  # rows of 100: per row and per matrix by selection
    levels = [0.0, 0.1, 0.25, 0.5, 0.6, 0.7, 0.9, 0.99, 1.0]
    masks = [ALLOCATORS[allocator](score, s) for s in levels]
    for looser, tighter in zip(masks, masks[1:]):
        assert not (tighter & ~looser).any()
    assert masks[0].all() and not masks[-1].any()


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_inputs_are_not_modified(allocation: str) -> None:
    scores = make_layers("many_zeros", seed=4)
    scores["fp32"] = make_score("signed", (4, 8))
    before = {name: score.clone() for name, score in scores.items()}
    masks_for(scores, 0.5, allocation)
    nm_masks({"fp32": scores["fp32"]}, 2, 4)
    for name, score in scores.items():
        # Bitwise comparison so that a -0.0 turned into +0.0 would be caught too.
        as_int = torch.int16 if score.element_size() == 2 else torch.int32
        assert torch.equal(score.view(as_int), before[name].view(as_int)), name


# --------------------------------------------------------------------------- masks_for


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_masks_for_dispatches_to_each_allocation(sparsity: float) -> None:
    scores = make_layers("quantized", seed=2)
    expected = {
        "per_row": {name: ref_per_row(s, sparsity) for name, s in scores.items()},
        "per_matrix": {name: ref_per_matrix(s, sparsity) for name, s in scores.items()},
        "global": ref_global(scores, sparsity),
    }
    for allocation, masks in expected.items():
        assert_masks_equal(masks_for(scores, sparsity, allocation), masks)
    assert_masks_equal(masks_for(scores, sparsity), expected["per_matrix"])


def test_masks_for_rejects_unknown_allocation() -> None:
    with pytest.raises(ValueError) as info:
        masks_for({"a": torch.ones(2, 4)}, 0.5, "per_column")
    message = str(info.value)
    assert "per_column" in message
    assert all(name in message for name in ("per_row", "per_matrix", "global"))


# --------------------------------------------------------------------------- NaN


def _with_nan(shape: tuple[int, int] = (2, 8)) -> torch.Tensor:
    score = make_score("random", shape)
    score[1, 3] = float("nan")
    return score


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_nan_scores_raise_with_layer_name(allocation: str) -> None:
    scores = {"fine": make_score("random", (2, 8)), "model.layers.3.q_proj": _with_nan()}
    with pytest.raises(ValueError, match=r"NaN.*model\.layers\.3\.q_proj"):
        masks_for(scores, 0.5, allocation)
    with pytest.raises(ValueError, match=r"NaN.*model\.layers\.3\.q_proj"):
        nm_masks(scores, 2, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: per_row_mask(s, 0.5),
        lambda s: per_matrix_mask(s, 0.5),
        lambda s: nm_mask(s, 2, 4),
        lambda s: per_row_mask(s, 0.0),
    ],
)
def test_nan_scores_raise_without_name(call: Callable[[torch.Tensor], torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="NaN"):
        call(_with_nan())


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5), (4, 16), (2, 3, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_matches_reference_and_round_trips(shape: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(mask.numel() / 8)
    assert packed.tolist() == ref_pack(mask)
    unpacked = unpack_mask(packed, shape)
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)


def test_pack_bit_order_is_little_endian() -> None:
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert pack_mask(mask).tolist() == [0b0000_0001, 0b0000_0010]


def test_unpack_rejects_wrong_length_and_dtype() -> None:
    with pytest.raises(ValueError, match="bytes"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (4, 4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(torch.zeros(2, dtype=torch.int32), (4, 4))
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.ones(4))


# --------------------------------------------------------------------------- mask_sparsity


def test_mask_sparsity_is_fraction_of_false() -> None:
    for sparsity in SPARSITIES:
        mask = ref_per_matrix(make_score("random", (5, 13)), sparsity)
        expected = sum(1 for kept in mask.reshape(-1).tolist() if not kept) / mask.numel()
        assert mask_sparsity(mask) == pytest.approx(expected, abs=0)
        assert mask_sparsity(mask) == pytest.approx(ref_num_pruned(65, sparsity) / 65, abs=0)


def test_mask_sparsity_of_empty_mask_is_zero() -> None:
    assert mask_sparsity(torch.zeros(0, 4, dtype=torch.bool)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool])
def test_count_zeros_matches_the_obvious_count(dtype):
    from unipruning_cli.pruning.masks import count_zeros

    t = (torch.randn(37, 29) * (torch.rand(37, 29) > 0.4)).to(dtype)
    t.view(-1)[5] = -0.0 if dtype != torch.bool else False  # a negative zero is a zero
    assert count_zeros(t) == int((t == 0).sum())
    assert count_zeros(torch.zeros(0)) == 0
