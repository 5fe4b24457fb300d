"""Causal LMs: loading, the prunable layers by role, other weight layouts, sequential onloading."""
