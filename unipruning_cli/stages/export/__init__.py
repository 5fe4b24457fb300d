"""Shipping a pruned model: a finished run read, its masks applied, the folder written, measured and described."""
