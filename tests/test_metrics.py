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
from unipruning_cli.registry import UnknownNameError
from unipruning_cli.stats import ActivationStats

EPS = 1e-12
SHAPES = [(6, 10), (8, 8), (5, 12)]
WEIGHT_KINDS = ["random", "ties", "zero_row", "zero_col", "all_zero", "constant_rows"]
STATS_KINDS = ["random", "zero", "some_zero"]
Matrix = list[list[float]]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_weight(kind: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A weight matrix of one of the adversarial kinds in ``WEIGHT_KINDS``."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    if kind == "ties":
        return torch.randint(-6, 7, shape, generator=gen).float()
    if kind == "all_zero":
        return torch.zeros(shape)
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
    """Activation statistics of one of the kinds in ``STATS_KINDS``."""
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


def close(actual: torch.Tensor, expected: Matrix) -> None:
    assert actual.dtype == torch.float32
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
) -> Matrix:
    """Re-draws the documented noise (row matrix first, then column matrix) and loops."""
    out_features, in_features = len(w), len(w[0])
    tau = max(1, math.floor(beta * min(out_features, in_features)))
    gen = torch.Generator().manual_seed(seed)
    row_noise = torch.rand(out_features, in_features, generator=gen).tolist()
    col_noise = torch.rand(out_features, in_features, generator=gen).tolist()

    row_sum = [0.0] * out_features
    for i in range(out_features):
        for j in top_indices(row_noise[i], tau):
            row_sum[i] += abs(w[i][j])
        if rescale_subsums:
            row_sum[i] *= in_features / tau
    col_sum = [0.0] * in_features
    for j in range(in_features):
        column_noise = [col_noise[i][j] for i in range(out_features)]
        for i in top_indices(column_noise, tau):
            col_sum[j] += abs(w[i][j])
        if rescale_subsums:
            col_sum[j] *= out_features / tau

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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_magnitude_matches_reference(kind: str, shape: tuple[int, int]) -> None:
    weight = make_weight(kind, shape)
    close(build_metric("magnitude").score(weight, make_stats("random", shape[1])),
          ref_magnitude(to_lists(weight)))


@pytest.mark.parametrize("stats_kind", STATS_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_wanda_matches_reference(kind: str, shape: tuple[int, int], stats_kind: str) -> None:
    weight, stats = make_weight(kind, shape), make_stats(stats_kind, shape[1])
    close(build_metric("wanda").score(weight, stats), ref_wanda(to_lists(weight), stats))


@pytest.mark.parametrize("a", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("stats_kind", STATS_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_ria_matches_reference(
    kind: str, shape: tuple[int, int], stats_kind: str, a: float
) -> None:
    weight, stats = make_weight(kind, shape), make_stats(stats_kind, shape[1])
    close(build_metric("ria", a=a).score(weight, stats), ref_ria(to_lists(weight), stats, a))


STOCH_CONFIGS = [
    {},
    {"rescale_subsums": True},
    {"normalize": "none"},
    {"beta": 0.5, "rescale_subsums": True, "normalize": "none"},
    {"beta": 1.0, "act_exponent": 0.7},
    {"beta": 0.01, "act_exponent": 0.0},  # τ_s floors to 0 -> clamped to 1
]


def knobs_id(knobs: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in knobs.items()) or "defaults"


@pytest.mark.parametrize("knobs", STOCH_CONFIGS, ids=knobs_id)
@pytest.mark.parametrize("stats_kind", STATS_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_stochria_matches_reference(
    kind: str, shape: tuple[int, int], stats_kind: str, knobs: dict
) -> None:
    weight, stats = make_weight(kind, shape), make_stats(stats_kind, shape[1])
    seed = 11
    actual = build_metric("stochria", **knobs).score(weight, stats, seeded(seed))
    close(actual, ref_stochria(to_lists(weight), stats, seed, **knobs))


# --------------------------------------------------------------------------------------------
# Properties shared by all metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "ria", "stochria"])
def test_low_precision_weights_score_like_their_fp32_cast(name: str, dtype: torch.dtype) -> None:
    weight = torch.randn(6, 10).to(dtype)
    stats = make_stats("random", 10)
    metric = build_metric(name)
    actual = metric.score(weight, stats, seeded(3))
    assert actual.dtype == torch.float32 and actual.shape == weight.shape
    torch.testing.assert_close(actual, metric.score(weight.float(), stats, seeded(3)))


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


def test_same_seed_same_scores_different_seed_different_scores() -> None:
    weight, stats = make_weight("random", (6, 10)), make_stats("random", 10)
    metric = build_metric("stochria")
    first = metric.score(weight, stats, seeded(1))
    assert torch.equal(first, metric.score(weight, stats, seeded(1)))
    assert not torch.equal(first, metric.score(weight, stats, seeded(2)))


def test_without_generator_the_global_rng_is_used() -> None:
    weight, stats = make_weight("random", (6, 10)), make_stats("random", 10)
    metric = build_metric("stochria")
    torch.manual_seed(4)
    first = metric.score(weight, stats)
    torch.manual_seed(4)
    assert torch.equal(first, metric.score(weight, stats))


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


@pytest.mark.parametrize("shape", [(7, 11), (16, 4), (1, 5), (9, 9)])
@pytest.mark.parametrize("beta", [0.2, 0.5, 1.0])
def test_cyclic_subset_sums_match_the_loop_reference(shape: tuple[int, int], beta: float) -> None:
    from unipruning_cli.metrics.stochria import cyclic_subset_sums

    weight = make_weight("random", shape)
    tau = subset_size(beta, *shape)
    rows, cols = cyclic_subset_sums(weight.abs(), tau, seeded(5))
    ref_rows, ref_cols = ref_cyclic_sums(to_lists(weight), tau, 5)
    close(rows.unsqueeze(1), [[v] for v in ref_rows])
    close(cols.unsqueeze(1), [[v] for v in ref_cols])


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
    weight, stats = make_weight("random", (6, 10)), make_stats("random", 10)
    auto, exact, cyclic = (build_metric("stochria", sampler=s) for s in ("auto", "exact", "cyclic"))
    assert torch.equal(auto.score(weight, stats, seeded(3)), exact.score(weight, stats, seeded(3)))
    repeated = auto.for_repeated_scoring()
    assert repeated.sampler == "cyclic"
    assert torch.equal(repeated.score(weight, stats, seeded(3)), cyclic.score(weight, stats, seeded(3)))
    assert exact.for_repeated_scoring() is exact  # an explicit choice is kept
    assert build_metric("wanda").for_repeated_scoring().name == "wanda"
