"""Measuring a model: perplexity by the papers' protocol, lm-eval zero-shot on the model in memory, offline tasks."""
