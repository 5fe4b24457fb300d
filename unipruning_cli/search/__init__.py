"""The UniPruning search: saliency Γ learned by mirror descent (state, regularizers, loop)."""

from .mirror_descent import LamSibling, SearchSettings, search_drift, search_frozen
from .regularizers import L1Prox, build_regularizer, quantile, soft_threshold
from .state import SearchState

__all__ = ["L1Prox", "LamSibling", "SearchSettings", "SearchState", "build_regularizer", "quantile", "search_drift",
           "search_frozen", "soft_threshold"]
