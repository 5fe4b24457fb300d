"""Shipping a pruned model: a finished run read, its masks applied, the folder written, measured and described.

``load_compressed`` (an N:M compressed folder back to the dense model) and ``to_semi_structured`` (PyTorch's 2:4
kernels, a research path) are named here because model cards and scripts point users at them."""

from .nm import load_compressed, to_semi_structured

__all__ = ["load_compressed", "to_semi_structured"]
