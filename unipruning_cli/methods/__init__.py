"""Pruning methods, one module each (:mod:`.local`, :mod:`.sparsegpt`, :mod:`.unipruning`), on the interface of
:mod:`.base`; what a run cuts (:mod:`.targets`), the block-wise pruners (:mod:`.blockwise`) and weight mutation
(:mod:`.weights`). A new method is one module here and one ``configs/method/<name>.yaml`` (docs/extending.md)."""

from .base import METHODS, Cuts, Method, method_name, method_of, register_method
from .blockwise import LocalMetricPruning, PruningMethod, SparseGPTPruning
from .targets import (DEFAULT_ALLOCATION, NM_TAG, Target, baselines_of, calibration_mode, check_targets_fit,
                      default_allocation, extra_patterns, extra_sparsities, make_target, nm_of_tag, targets_of)
from .weights import apply_masks, restore_weights

__all__ = ["METHODS", "Cuts", "Method", "method_name", "method_of", "register_method",
           "LocalMetricPruning", "PruningMethod", "SparseGPTPruning", "DEFAULT_ALLOCATION", "NM_TAG", "Target",
           "baselines_of", "calibration_mode", "check_targets_fit", "default_allocation", "extra_patterns",
           "extra_sparsities", "make_target", "nm_of_tag", "targets_of", "apply_masks", "restore_weights"]
