"""Methods outside the UniPruning search that the runner compares it with: SparseGPT."""
