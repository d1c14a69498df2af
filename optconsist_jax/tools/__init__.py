"""Tools around training: TPU hardware facts, step-time estimates, layout search and sweeps."""
