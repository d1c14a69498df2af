"""Training: `train(config, workdir)` runs (or resumes) one run.

`python -m optconsist_jax.train --config ... --workdir W` (__main__.py) over
loop.py (the one loop, for a run and for a vmapped population of runs),
setup.py (checks, model, optimizer and the initial state;
base_optimizer_state.py, a base run's optimizer state), state.py (the
sharded train state), step.py (the jitted step), guards.py (preemption,
NaN/Inf), config.py (the typed experiment config) and population.py.
"""

from optconsist_jax.train.loop import TrainResult
from optconsist_jax.train.loop import train

__all__ = ["TrainResult", "train"]
