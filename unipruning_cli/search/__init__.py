"""The UniPruning search: saliency Γ learned by mirror descent (settings, state, regularizers, the loops).

The search's stage (Γ from this run, an earlier one or a new pass) and its store are in ``stages/``.

The names below load on first use (PEP 562), so importing ``search.settings`` (the config schema
does) does not import torch and the search loop.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "L1Prox": "regularizers", "REGULARIZERS": "regularizers", "build_regularizer": "regularizers",
    "quantile": "regularizers", "soft_threshold": "regularizers",
    "LamSibling": "mirror_descent", "search_drift": "mirror_descent", "search_frozen": "frozen",
    "SearchSettings": "settings", "ScheduleConfig": "settings",
    "SearchState": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
