"""The memory plan of a run, before any weight is read: the model built on the ``meta`` device, each stage's peak."""
