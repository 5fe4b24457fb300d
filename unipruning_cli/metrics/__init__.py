"""Local pruning metrics, selectable by name (``build_metric("wanda")``).

Importing this package imports every metric module, which registers each metric in
``METRICS`` as a side effect of its ``@METRICS.register`` decorator.
"""

from __future__ import annotations

from unipruning_cli.metrics import magnitude, ria, stochria, wanda  # noqa: F401  (registration)
from unipruning_cli.metrics.base import METRICS, LocalMetric, build_metric, knob_defaults, knob_names
from unipruning_cli.metrics.magnitude import Magnitude
from unipruning_cli.metrics.ria import RIA
from unipruning_cli.metrics.stochria import StochRIA
from unipruning_cli.metrics.wanda import Wanda

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
