"""Tests for the local metrics against slow, loop-based references written straight from spec §2.

The references work on Python floats (fp64) element by element, so they share no code, no
vectorisation trick and no dtype with the implementations they check.
"""

from __future__ import annotations

import math

import pytest
import torch

from unipruning_cli.metrics import METRICS, LocalMetric, build_metric
from unipruning_cli.metrics.stochria import draw_subsets, subset_size
from unipruning_cli.core.registry import UnknownNameError
from unipruning_cli.data.stats import ActivationStats

EPS = 1e-12
Matrix = list[list[float]]
# The metrics have no size-dependent code path: what matters is what reaches the sums, the floors and the
# exponents. Wide and tall shapes, with stochRIA subsets of several entries (τ = floor(β·min) = 3 at β = 0.2).
WIDE, TALL = (16, 24), (24, 16)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_weight(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A weight matrix of one of the adversarial kinds: random, ties, zero_row, zero_col, constant_rows."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    if kind == "ties":
        return torch.randint(-6, 7, shape, generator=gen).float()
    if kind == "constant_rows":  # row i is all (i - 2): includes a zero row and negative rows
        return (torch.arange(out_features, dtype=torch.float32) - 2).unsqueeze(1).expand(
            out_features, in_features
        ).clone()
    weight = torch.randn(shape, generator=gen)
    if kind == "zero_row":
        weight[2] = 0.0
    elif kind == "zero_col":
        weight[:, 3] = 0.0
    return weight


def make_stats(kind: str, in_features: int, count: int = 7, seed: int = 1) -> ActivationStats:
    """Activation statistics of one of the kinds: random, zero, some_zero (two channels that never fired)."""
    gen = torch.Generator().manual_seed(seed)
    sq_sum = torch.rand(in_features, generator=gen, dtype=torch.float64) * 5 + 0.1
    if kind == "zero":
        sq_sum = torch.zeros(in_features, dtype=torch.float64)
    elif kind == "some_zero":
        sq_sum[0] = 0.0
        sq_sum[in_features // 2] = 0.0
    return ActivationStats(sq_sum=sq_sum, count=count)


def to_lists(weight: torch.Tensor) -> Matrix:
    return weight.double().tolist()


def as_tensor(values: Matrix) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: Matrix, min_distinct: int = 3) -> None:
    """``actual`` against the loop reference, which must be non-trivial: distinct non-zero values (an all-zero
    or constant output compared with an all-zero or constant reference proves nothing)."""
    assert actual.dtype == torch.float32
    distinct = {v for row in expected for v in row}
    assert len(distinct) >= min_distinct and any(v != 0 for v in distinct), "trivial reference"
    torch.testing.assert_close(actual, as_tensor(expected), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Slow references, one loop per index, straight from the formulas.
# --------------------------------------------------------------------------------------------


def ref_magnitude(w: Matrix) -> Matrix:
    return [[abs(w[i][j]) for j in range(len(w[0]))] for i in range(len(w))]


def ref_wanda(w: Matrix, stats: ActivationStats) -> Matrix:
    sq_sum = stats.sq_sum.tolist()
    out_features, in_features = len(w), len(w[0])
    result = [[0.0] * in_features for _ in range(out_features)]
    for i in range(out_features):
        for j in range(in_features):
            result[i][j] = abs(w[i][j]) * math.sqrt(sq_sum[j])
    return result


def ref_ria(w: Matrix, stats: ActivationStats, a: float) -> Matrix:
    sq_sum = stats.sq_sum.tolist()
    out_features, in_features = len(w), len(w[0])
    col_sum = [0.0] * in_features
    row_sum = [0.0] * out_features
    for i in range(out_features):
        for j in range(in_features):
            col_sum[j] += abs(w[i][j])
            row_sum[i] += abs(w[i][j])
    result = [[0.0] * in_features for _ in range(out_features)]
    for i in range(out_features):
        for j in range(in_features):
            ri = abs(w[i][j]) / max(col_sum[j], EPS) + abs(w[i][j]) / max(row_sum[i], EPS)
            result[i][j] = ri * math.sqrt(sq_sum[j]) ** a
    return result


def top_indices(values: list[float], k: int) -> list[int]:
    """Indices of the ``k`` largest values (uniform noise has no ties in practice)."""
    return sorted(range(len(values)), key=lambda idx: -values[idx])[:k]


def ref_stochria(
    w: Matrix,
    stats: ActivationStats,
    seed: int,
    beta: float = 0.2,
    act_exponent: float = 0.35,
    rescale_subsums: bool = False,
    normalize: str = "mean_abs",
    sampler: str = "exact",
) -> Matrix:
    """Re-draws the documented noise (exact: row matrix first, then column matrix; cyclic: see
    ``ref_cyclic_sums``) and loops."""
    out_features, in_features = len(w), len(w[0])
    tau = max(1, math.floor(beta * min(out_features, in_features)))
    if sampler == "cyclic":
        row_sum, col_sum = ref_cyclic_sums(w, tau, seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        row_noise = torch.rand(out_features, in_features, generator=gen).tolist()
        col_noise = torch.rand(out_features, in_features, generator=gen).tolist()
        row_sum = [0.0] * out_features
        for i in range(out_features):
            for j in top_indices(row_noise[i], tau):
                row_sum[i] += abs(w[i][j])
        col_sum = [0.0] * in_features
        for j in range(in_features):
            column_noise = [col_noise[i][j] for i in range(out_features)]
            for i in top_indices(column_noise, tau):
                col_sum[j] += abs(w[i][j])
    if rescale_subsums:
        row_sum = [r * in_features / tau for r in row_sum]
        col_sum = [c * out_features / tau for c in col_sum]

    mean_sq = [s / stats.count for s in stats.sq_sum.tolist()]
    result = [[0.0] * in_features for _ in range(out_features)]
    for i in range(out_features):
        for j in range(in_features):
            ri = abs(w[i][j]) / max(col_sum[j], EPS) + abs(w[i][j]) / max(row_sum[i], EPS)
            result[i][j] = ri * mean_sq[j] ** act_exponent

    if normalize == "mean_abs":
        mean_abs = sum(abs(v) for row in result for v in row) / (out_features * in_features)
        if mean_abs > 0 and math.isfinite(mean_abs):
            result = [[v / mean_abs for v in row] for row in result]
    return result


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Registry and construction
# --------------------------------------------------------------------------------------------


def test_registry_holds_every_metric_under_its_own_name() -> None:
    assert METRICS.names() == ["magnitude", "ria", "stochria", "wanda"]
    for name in METRICS:
        metric = build_metric(name)
        assert isinstance(metric, LocalMetric)
        assert metric.name == name
        assert metric.stochastic == (name == "stochria")


def test_defaults_match_the_spec() -> None:
    assert build_metric("ria").a == 0.5
    stoch = build_metric("stochria")
    assert (stoch.beta, stoch.act_exponent, stoch.rescale_subsums, stoch.normalize) == (
        0.2,
        0.35,
        False,
        "mean_abs",
    )


def test_unknown_metric_suggests_the_close_name() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'wanda'"):
        build_metric("wnda")


def test_unknown_knob_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(TypeError, match=r"'betta'.*did you mean 'beta'.*act_exponent"):
        build_metric("stochria", betta=0.3)
    with pytest.raises(TypeError, match=r"'a'.*\(none\)"):
        build_metric("wanda", a=1.0)


@pytest.mark.parametrize(
    ("name", "knobs", "field"),
    [
        ("stochria", {"beta": 0}, "beta"),
        ("stochria", {"beta": 1.5}, "beta"),
        ("stochria", {"beta": float("nan")}, "beta"),
        ("stochria", {"act_exponent": -0.1}, "act_exponent"),
        ("stochria", {"normalize": "l2"}, "normalize"),
        ("stochria", {"rescale_subsums": "yes"}, "rescale_subsums"),
        ("ria", {"a": -0.5}, "a"),
        ("ria", {"a": "0.5"}, "a"),
        ("ria", {"a": True}, "a"),
    ],
)
def test_bad_knob_values_raise_naming_the_field(name: str, knobs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        build_metric(name, **knobs)


def test_integer_knobs_are_accepted_as_floats() -> None:
    metric = build_metric("stochria", beta=1, act_exponent=0)
    assert isinstance(metric.beta, float) and metric.beta == 1.0


# --------------------------------------------------------------------------------------------
# Statistics handling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wanda", "ria", "stochria"])
def test_activation_metrics_require_stats(name: str) -> None:
    with pytest.raises(ValueError, match="activation statistics are required"):
        build_metric(name).score(torch.randn(4, 6), None, seeded(0))


@pytest.mark.parametrize("name", ["wanda", "ria", "stochria"])
def test_stats_of_the_wrong_width_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        build_metric(name).score(torch.randn(4, 6), make_stats("random", 5), seeded(0))


def test_magnitude_works_without_stats() -> None:
    weight = torch.randn(4, 6)
    torch.testing.assert_close(build_metric("magnitude").score(weight, None), weight.abs())


# --------------------------------------------------------------------------------------------
# Each metric against its reference
# --------------------------------------------------------------------------------------------


# (weight kind, shape, stats kind): each case reaches something the others do not. "zero_row" / "zero_col" floor a
# sum at SUM_EPS; "some_zero" stats zero an activation term (and 0 ** 0 = 1 at exponent 0); "ties" and
# "constant_rows" give equal sums; TALL swaps which dimension τ and the normalisers come from.
CASES = [
    ("random", WIDE, "random"),
    ("ties", TALL, "some_zero"),
    ("zero_row", WIDE, "some_zero"),
    ("zero_col", TALL, "random"),
    ("constant_rows", WIDE, "random"),
]


def case_id(case: tuple) -> str:
    kind, shape, stats_kind = case
    return f"{kind}-{shape[0]}x{shape[1]}-{stats_kind}"


@pytest.mark.parametrize("case", CASES[:2], ids=case_id)
def test_magnitude_matches_reference(case: tuple) -> None:
    kind, shape, stats_kind = case
    weight = make_weight(kind, shape)
    close(build_metric("magnitude").score(weight, make_stats(stats_kind, shape[1])), ref_magnitude(to_lists(weight)))


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=case_id)
def test_wanda_matches_reference(case: tuple) -> None:
    kind, shape, stats_kind = case
    weight, stats = make_weight(kind, shape), make_stats(stats_kind, shape[1])
    close(build_metric("wanda").score(weight, stats), ref_wanda(to_lists(weight), stats))


@pytest.mark.parametrize(("case", "a"), [(CASES[0], 0.5), (CASES[1], 0.0), (CASES[2], 0.5), (CASES[3], 1.0),
                                         (CASES[4], 0.5)], ids=lambda v: case_id(v) if isinstance(v, tuple) else str(v))
def test_ria_matches_reference(case: tuple, a: float) -> None:
    kind, shape, stats_kind = case
    weight, stats = make_weight(kind, shape), make_stats(stats_kind, shape[1])
    close(build_metric("ria", a=a).score(weight, stats), ref_ria(to_lists(weight), stats, a))


STOCH_CONFIGS = [
    {},
    {"rescale_subsums": True},
    {"normalize": "none"},
    {"beta": 0.5, "rescale_subsums": True, "normalize": "none"},
    {"beta": 1.0, "act_exponent": 0.7},  # every row of the wide matrix sums 16 of its 24 columns
    {"beta": 0.01, "act_exponent": 0.0},  # τ_s floors to 0 -> clamped to 1
]


def knobs_id(knobs: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in knobs.items()) or "defaults"


@pytest.mark.parametrize("knobs", STOCH_CONFIGS, ids=knobs_id)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=case_id)
def test_stochria_matches_reference(case: tuple, knobs: dict) -> None:
    kind, shape, stats_kind = case
    weight, stats = make_weight(kind, shape), make_stats(stats_kind, shape[1])
    tau = subset_size(knobs.get("beta", 0.2), *shape)
    assert tau >= 3 or knobs.get("beta") == 0.01  # subsets of several entries, except the clamp case
    seed = 11
    actual = build_metric("stochria", **knobs).score(weight, stats, seeded(seed))
    close(actual, ref_stochria(to_lists(weight), stats, seed, **knobs))


# --------------------------------------------------------------------------------------------
# Properties shared by all metrics
# --------------------------------------------------------------------------------------------


REFERENCES = {
    "magnitude": lambda w, stats, seed: ref_magnitude(w),
    "wanda": lambda w, stats, seed: ref_wanda(w, stats),
    "ria": lambda w, stats, seed: ref_ria(w, stats, 0.5),
    "stochria": lambda w, stats, seed: ref_stochria(w, stats, seed),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "stochria"])
def test_low_precision_weights_score_in_fp32(name: str, dtype: torch.dtype) -> None:
    """The scores of a half-precision weight are its exact values' scores (fp64 loop reference), in fp32."""
    weight = torch.randn(16, 24, generator=seeded(0)).to(dtype)
    stats = make_stats("random", 24)
    actual = build_metric(name).score(weight, stats, seeded(3))
    assert actual.dtype == torch.float32 and actual.shape == weight.shape
    close(actual, REFERENCES[name](to_lists(weight), stats, 3))


@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "stochria"])
def test_weight_is_not_modified(name: str) -> None:
    weight = torch.randn(6, 10, requires_grad=True)
    before = weight.detach().clone()
    scores = build_metric(name).score(weight, make_stats("random", 10), seeded(0))
    scores.add_(1.0)  # writing into the result must not reach the weight either
    assert torch.equal(weight.detach(), before)
    assert not scores.requires_grad


@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "stochria"])
def test_all_zero_matrix_with_zero_activations_scores_zero(name: str) -> None:
    scores = build_metric(name).score(torch.zeros(5, 12), make_stats("zero", 12), seeded(0))
    assert torch.equal(scores, torch.zeros(5, 12))


# --------------------------------------------------------------------------------------------
# stochRIA specifics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "beta"), [((6, 10), 0.2), ((6, 10), 0.5), ((12, 5), 1.0)])
def test_subsets_hold_tau_distinct_valid_indices(shape: tuple[int, int], beta: float) -> None:
    out_features, in_features = shape
    tau = subset_size(beta, out_features, in_features)
    assert tau == max(1, math.floor(beta * min(shape)))
    row_cols, col_rows = draw_subsets(out_features, in_features, tau, seeded(5))
    assert row_cols.shape == (out_features, tau) and col_rows.shape == (tau, in_features)
    for i in range(out_features):
        columns = row_cols[i].tolist()
        assert len(set(columns)) == tau and all(0 <= j < in_features for j in columns)
    for j in range(in_features):
        rows = col_rows[:, j].tolist()
        assert len(set(rows)) == tau and all(0 <= i < out_features for i in rows)


def test_each_seed_gives_its_own_reference_draws() -> None:
    weight, stats = make_weight("random", WIDE), make_stats("random", WIDE[1])
    metric = build_metric("stochria")
    first, second = ref_stochria(to_lists(weight), stats, 1), ref_stochria(to_lists(weight), stats, 2)
    assert first != second
    close(metric.score(weight, stats, seeded(1)), first)
    close(metric.score(weight, stats, seeded(2)), second)


def test_without_generator_the_global_rng_is_used() -> None:
    weight, stats = make_weight("random", WIDE), make_stats("random", WIDE[1])
    torch.manual_seed(4)
    close(build_metric("stochria").score(weight, stats), ref_stochria(to_lists(weight), stats, 4))


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", ["random", "ties", "zero_row", "zero_col"])
def test_full_subsets_on_a_square_matrix_equal_ria(kind: str, rescale: bool) -> None:
    """β = 1 on a square matrix sums every entry; with count = 1, E[x²]^(a/2) = ‖X‖^a."""
    weight, stats = make_weight(kind, (8, 8)), make_stats("random", 8, count=1)
    a = 0.5
    stoch = build_metric(
        "stochria", beta=1.0, act_exponent=a / 2, normalize="none", rescale_subsums=rescale
    )
    torch.testing.assert_close(
        stoch.score(weight, stats, seeded(9)), build_metric("ria", a=a).score(weight, stats)
    )


def test_mean_abs_normalisation_gives_unit_mean() -> None:
    stats = make_stats("some_zero", 12)
    for seed, kind in enumerate(["random", "ties", "zero_row", "constant_rows"]):
        scores = build_metric("stochria").score(make_weight(kind, (5, 12)), stats, seeded(seed))
        torch.testing.assert_close(scores.abs().mean(), torch.tensor(1.0))


def test_rescaling_multiplies_each_term_by_its_subset_ratio() -> None:
    """With only one row, the column term is constant (c_j = |W_0j|), isolating the row term."""
    weight, stats = make_weight("random", (1, 10)) + 3.0, make_stats("random", 10)
    plain = build_metric("stochria", beta=1.0, act_exponent=0.0, normalize="none")
    rescaled = build_metric(
        "stochria", beta=1.0, act_exponent=0.0, normalize="none", rescale_subsums=True
    )
    tau = 1  # min(out, in) = 1
    abs_w = weight.abs()
    col_term = torch.ones_like(abs_w)  # |W_0j| / |W_0j|
    row_plain = plain.score(weight, stats, seeded(0)) - col_term
    row_rescaled = rescaled.score(weight, stats, seeded(0)) - col_term
    torch.testing.assert_close(row_rescaled * (10 / tau), row_plain)


def test_rescaled_stochastic_ri_averages_to_exact_ri() -> None:
    """Over many draws the rescaled subset sums estimate the full sums (Jensen bias is small)."""
    gen = seeded(123)
    weight = torch.rand(12, 16, generator=gen) + 0.5  # positive, low spread: low estimator noise
    ones = ActivationStats(sq_sum=torch.ones(16, dtype=torch.float64), count=1)
    abs_w = weight.abs()
    col_term = abs_w / abs_w.sum(dim=0, keepdim=True)
    row_term = abs_w / abs_w.sum(dim=1, keepdim=True)
    tau = subset_size(0.5, 12, 16)

    def average(rescale: bool) -> torch.Tensor:
        metric = build_metric(
            "stochria", beta=0.5, act_exponent=0.0, normalize="none", rescale_subsums=rescale
        )
        return torch.stack([metric.score(weight, ones, gen) for _ in range(400)]).mean(dim=0)

    torch.testing.assert_close(average(True), col_term + row_term, rtol=0.05, atol=0.0)
    # Not rescaled: the column term is up-weighted by out/τ and the row term by in/τ (spec §2.4).
    torch.testing.assert_close(
        average(False), col_term * (12 / tau) + row_term * (16 / tau), rtol=0.05, atol=0.0
    )


# --------------------------------------------------------------------------------------------
# stochRIA samplers: cyclic windows, and "auto"
# --------------------------------------------------------------------------------------------


def ref_cyclic_sums(w: Matrix, tau: int, seed: int) -> tuple[list[float], list[float]]:
    """Re-draws the documented draws (column permutation, row offsets, row permutation, column
    offsets) and sums each row's and column's τ cyclic neighbours in plain loops."""
    out_features, in_features = len(w), len(w[0])
    gen = torch.Generator().manual_seed(seed)
    perm_cols = torch.randperm(in_features, generator=gen).tolist()
    row_offsets = torch.randint(0, in_features, (out_features,), generator=gen).tolist()
    perm_rows = torch.randperm(out_features, generator=gen).tolist()
    col_offsets = torch.randint(0, out_features, (in_features,), generator=gen).tolist()
    rows = [sum(abs(w[i][perm_cols[(row_offsets[i] + t) % in_features]]) for t in range(tau))
            for i in range(out_features)]
    cols = [sum(abs(w[perm_rows[(col_offsets[j] + t) % out_features]][j]) for t in range(tau))
            for j in range(in_features)]
    return rows, cols


@pytest.mark.parametrize("shape", [WIDE, TALL, (1, 5)])
@pytest.mark.parametrize("beta", [0.2, 1.0])
def test_cyclic_subset_sums_match_the_loop_reference(shape: tuple[int, int], beta: float) -> None:
    from unipruning_cli.metrics.stochria import cyclic_subset_sums

    weight = make_weight("random", shape)
    tau = subset_size(beta, *shape)
    rows, cols = cyclic_subset_sums(weight.abs(), tau, seeded(5))
    ref_rows, ref_cols = ref_cyclic_sums(to_lists(weight), tau, 5)
    close(rows.unsqueeze(1), [[v] for v in ref_rows], min_distinct=1)
    close(cols.unsqueeze(1), [[v] for v in ref_cols], min_distinct=min(3, shape[1]))


def test_cyclic_and_exact_samplers_average_to_the_same_scores() -> None:
    """Same marginals, so the same expectation per entry: what a frozen search's Γ estimates."""
    gen = seeded(321)
    weight = torch.rand(12, 20, generator=gen) + 0.2
    stats = ActivationStats(sq_sum=torch.rand(20, dtype=torch.float64) + 0.5, count=1)

    def average(sampler: str) -> torch.Tensor:
        metric = build_metric("stochria", beta=0.3, normalize="none", sampler=sampler)
        return torch.stack([metric.score(weight, stats, gen) for _ in range(600)]).mean(dim=0)

    torch.testing.assert_close(average("cyclic"), average("exact"), rtol=0.04, atol=0.0)


def test_auto_sampler_is_exact_for_one_score_and_cyclic_for_repeated_scoring() -> None:
    weight, stats = make_weight("random", WIDE), make_stats("random", WIDE[1])
    w = to_lists(weight)
    exact_ref, cyclic_ref = ref_stochria(w, stats, 3), ref_stochria(w, stats, 3, sampler="cyclic")
    assert exact_ref != cyclic_ref
    auto = build_metric("stochria", sampler="auto")
    close(auto.score(weight, stats, seeded(3)), exact_ref)
    close(build_metric("stochria", sampler="exact").score(weight, stats, seeded(3)), exact_ref)
    close(build_metric("stochria", sampler="cyclic").score(weight, stats, seeded(3)), cyclic_ref)
    repeated = auto.for_repeated_scoring()
    assert repeated.sampler == "cyclic"
    close(repeated.score(weight, stats, seeded(3)), cyclic_ref)
    exact = build_metric("stochria", sampler="exact")
    assert exact.for_repeated_scoring() is exact  # an explicit choice is kept
    assert build_metric("wanda").for_repeated_scoring().name == "wanda"
