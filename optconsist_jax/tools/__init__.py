"""Tools around training: the TPU planner, the Cloud TPU launcher, TPU hardware facts,
step-time estimates, layout search and sweeps."""
