"""The run's plumbing: config schemas, errors, registries, run directories, inputs, processes, memory, reports."""
