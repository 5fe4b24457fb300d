"""Local pruning metrics, selectable by name (``build_metric("wanda")``).

Importing this package imports every metric module, which registers each metric in
``METRICS`` as a side effect of its ``@METRICS.register`` decorator.
"""

from __future__ import annotations

from . import magnitude, ria, stochria, wanda  # noqa: F401  (registration)
from .base import METRICS, LocalMetric, build_metric, knob_defaults, knob_names
from .magnitude import Magnitude
from .ria import RIA
from .stochria import StochRIA
from .wanda import Wanda

__all__ = [
    "METRICS",
    "LocalMetric",
    "build_metric",
    "knob_defaults",
    "knob_names",
    "Magnitude",
    "Wanda",
    "RIA",
    "StochRIA",
]
