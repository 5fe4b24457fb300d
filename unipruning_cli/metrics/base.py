"""Local pruning metrics: the common interface, the registry that names them, and shared checks.

A local metric turns one weight matrix (plus the activation statistics of that layer's input)
into one importance score per weight; a higher score means "keep longer". Pruning methods and
baselines only see this interface, so adding a metric is one decorated dataclass away.

Conventions every metric follows, so callers never have to special-case one:

* ``weight`` is laid out as ``nn.Linear`` stores it, ``[out, in]``; column ``j`` is input
  channel ``j``, which is what the activation statistics are indexed by.
* Scores are fp32 of the weight's shape whatever the weight dtype: bf16 sums over thousands of
  entries lose too many bits for rankings to be stable, and a fixed dtype keeps masks
  reproducible across model dtypes.
* The weight is never modified (scores are computed from a detached fp32 copy of ``|W|``).
* Knobs are dataclass fields, validated in ``__post_init__``, so a bad YAML value fails when
  the metric is built rather than hours later inside a pruning loop.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..core.errors import UserError
from ..core.registry import Registry
from ..data.stats import ActivationStats

#: Floor for sums of |W| used as denominators. An all-zero row or column then yields a zero
#: score for its term (0 / 1e-12) instead of NaN, matching the RIA reference implementation.
SUM_EPS = 1e-12


class LocalMetric(ABC):
    """A per-weight importance score for one linear layer.

    Subclasses are dataclasses whose fields are the metric's knobs, registered in ``METRICS``.
    ``stochastic`` metrics draw random numbers in ``score``; pass a ``torch.Generator`` to make
    them reproducible (without one they use the global torch RNG). ``uses_activations``: False for a
    data-free metric (magnitude), which needs no calibration pass at all.
    """

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False
    uses_activations: ClassVar[bool] = True

    @abstractmethod
    def score(
        self,
        weight: torch.Tensor,
        stats: ActivationStats | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return fp32 scores of ``weight``'s shape ``[out, in]``; ``weight`` is left untouched."""

    def for_repeated_scoring(self) -> "LocalMetric":
        """The metric to use when one fixed W is scored at every step of a search (frozen mode).

        Only stochastic metrics have a reason to differ (a cheaper sampler with the same
        per-entry expectation, see ``StochRIA``); every other metric is its own answer.
        """
        return self


METRICS: Registry[type[LocalMetric]] = Registry("local metric")


# --------------------------------------------------------------------------------------------
# Helpers shared by the metric implementations.
# --------------------------------------------------------------------------------------------


def abs_fp32(weight: torch.Tensor) -> torch.Tensor:
    """|W| as a new fp32 tensor, detached from autograd.

    ``abs`` always allocates, so the caller's weight can never be written through the result.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.float32).abs()


def require_stats(
    metric_name: str, stats: ActivationStats | None, in_features: int
) -> ActivationStats:
    """Return ``stats`` after checking it exists and has one entry per input channel.

    A missing or mis-sized statistic is a wiring error (calibration skipped, or stats of another
    layer); failing loudly here beats broadcasting silently into wrong scores: ``ValueError``. Statistics holding
    NaN or inf are the user's model overflowing its dtype: :class:`UserError` (a ``ValueError``), with what to do
    (the calibration stages name the layer first, :func:`unipruning_cli.data.stats.check_finite`).
    """
    if stats is None:
        raise ValueError(
            f"local metric '{metric_name}': activation statistics are required "
            "(run calibration first, or use the 'magnitude' metric)"
        )
    if tuple(stats.sq_sum.shape) != (in_features,):
        raise ValueError(
            f"local metric '{metric_name}': activation statistics have shape "
            f"{tuple(stats.sq_sum.shape)}, expected ({in_features},) for {in_features} input "
            "channels"
        )
    if not torch.isfinite(stats.sq_sum).all():  # NaN or an overflow: no score can be right
        kind = "NaN" if torch.isnan(stats.sq_sum).any() else "inf"
        raise UserError(
            f"local metric '{metric_name}': activation statistics hold {kind} (an overflow of the model's "
            "activations in its dtype, e.g. float16 above 65504); try model.dtype=bfloat16 or float32"
        )
    return stats


def check_float(
    metric_name: str,
    field: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
) -> float:
    """Validate a finite real knob against ``[low, high]`` (or ``(low, high]``), return a float.

    Integers are accepted (YAML writes ``a: 1``); booleans and strings are not, since they would
    otherwise be silently coerced to 0/1 or fail deep inside torch.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"local metric '{metric_name}': {field} must be a number, got {value!r}"
        )
    value = float(value)
    above_low = value >= low if low_inclusive else value > low
    if not math.isfinite(value) or not above_low or value > high:
        opening = "[" if low_inclusive else "("
        closing = ")" if math.isinf(high) else "]"
        raise ValueError(
            f"local metric '{metric_name}': {field}={value!r} is out of range; "
            f"allowed {field} in {opening}{low}, {high}{closing}"
        )
    return value


def set_knob(metric: LocalMetric, field: str, value: Any) -> None:
    """Store a normalised knob value on a (frozen) metric dataclass from ``__post_init__``."""
    object.__setattr__(metric, field, value)


# --------------------------------------------------------------------------------------------
# Construction by name.
# --------------------------------------------------------------------------------------------


def knob_names(metric_cls: type[LocalMetric]) -> list[str]:
    """The knobs (dataclass fields settable in ``__init__``) that ``metric_cls`` accepts."""
    if not dataclasses.is_dataclass(metric_cls):
        return []
    return [f.name for f in dataclasses.fields(metric_cls) if f.init]


def knob_defaults(metric_cls: type[LocalMetric]) -> dict[str, Any]:
    """The default value of each knob of ``metric_cls`` (the YAML a registered metric would have)."""
    if not dataclasses.is_dataclass(metric_cls):
        return {}
    out = {}
    for f in dataclasses.fields(metric_cls):
        if f.init and f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.init and f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def build_metric(name: str, **knobs: Any) -> LocalMetric:
    """Instantiate the metric registered as ``name`` with the given knobs.

    Unknown names raise the registry's ``UnknownNameError`` (with a "did you mean" hint);
    unknown knobs raise ``TypeError`` naming the knob and listing the metric's known knobs,
    which is friendlier than the dataclass's bare "unexpected keyword argument".
    """
    metric_cls = METRICS.get(name)
    known = knob_names(metric_cls)
    for knob in knobs:
        if knob not in known:
            close = difflib.get_close_matches(knob, known, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            listed = ", ".join(known) if known else "(none)"
            raise TypeError(
                f"local metric '{name}' has no knob '{knob}'{hint} Known knobs: {listed}"
            )
    return metric_cls(**knobs)
