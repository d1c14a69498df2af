"""Old import path of the evaluations (moved to optconsist_jax.evaluate).

`optconsist_jax.evals.math`, `.multiple_choice`, `.lm_loss` and `.harness`
are the same module objects as `optconsist_jax.evaluate.<name>`; kept for one
release.
"""

import sys

from optconsist_jax.evaluate import harness
from optconsist_jax.evaluate import lm_loss
from optconsist_jax.evaluate import math
from optconsist_jax.evaluate import multiple_choice

for _module in (harness, lm_loss, math, multiple_choice):
  sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
