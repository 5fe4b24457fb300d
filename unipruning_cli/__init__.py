"""unipruning: post-training pruning of LLMs (UniPruning, arXiv 2510.03291, and the baselines it is judged against)."""

__version__ = "0.1.0"
