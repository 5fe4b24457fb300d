"""The steps of a run, each built from primitives: checks, calibration, pruning, search, evaluation, export, plan."""
