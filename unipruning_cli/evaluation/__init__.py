"""Measuring a model: perplexity, lm-eval zero-shot, the dense-result cache, and re-evaluating a finished run."""
