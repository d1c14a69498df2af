"""How a training run stops early: SIGTERM (preemption) and NaN/Inf.

`Preemption` turns SIGTERM into a flag the loop checks after each step (all
hosts agree on the step); `check_finite` raises `NonFiniteError` (exit code
errors.NONFINITE) naming the step and the last good checkpoint.
"""

from __future__ import annotations

import signal
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from optconsist_jax import errors
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import checkpointer


class NonFiniteError(errors.CommandError, FloatingPointError):
  """The loss or gradient norm became NaN/Inf."""

  exit_code = errors.NONFINITE


def _preemption_service() -> bool:
  """Whether jax.distributed runs its preemption sync manager."""
  # pylint: disable-next=protected-access
  from jax._src import distributed  # deferred: jax's private module, read once.
  return getattr(distributed.global_state, "preemption_sync_manager",
                 None) is not None


class Preemption:
  """Turns SIGTERM into a step the loop stops at, the same on every host.

  One process: a Python handler sets a flag the loop checks after each step.
  Several (jax.distributed): SIGTERM may reach one host only (a maintenance
  event, a supervisor stopping one worker), yet every host must save the same
  step together. jax.distributed's preemption sync manager catches SIGTERM
  itself (its handler is installed by `jax.distributed.initialize`) and,
  through the coordination service, makes
  `multihost_utils.reached_preemption_sync_point(step)` true at the same step
  on every host ("Preemption" in JAX's multi-process docs), so no Python
  handler is installed then: it would replace that one and stop only the
  host it reached. Without the sync manager each host stops on its own
  SIGTERM (right when all hosts receive it, as a whole slice's do).
  """

  def __init__(self):
    self.requested = False
    self._synced = False  # jax's sync manager decides the step.
    self._installed = False
    self._previous = None

  def __enter__(self):
    self._synced = jax.process_count() > 1 and _preemption_service()
    if self._synced:
      return self
    def handler(signum, frame):
      del frame
      logging.warning("signal %d: saving a checkpoint and stopping", signum)
      self.requested = True
    self._previous = signal.signal(signal.SIGTERM, handler)
    self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

  def reached(self, step: int) -> bool:
    if self._synced and not self.requested:
      # All hosts agree on the step to stop at.
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption notice (SIGTERM to a host): saving step"
                        " %d on every host and stopping", step)
        self.requested = True
    return self.requested


def check_finite(step: int, m: dict[str, Any],
                 ckpts: checkpointer.RunCheckpoints,
                 workdir: epath.Path) -> None:
  """Raises NonFiniteError when a fetched step's loss/norms are NaN/Inf."""
  # The update norms catch a step whose own loss was finite but whose update
  # (and so the state it leaves behind) is not.
  keys = ["loss", "grad_norm", *sorted(k for k in m if k.startswith(
      "update_norm/"))]
  bad = {k: float(m[k]) for k in keys if k in m and not np.isfinite(m[k])}
  if not bad:
    return
  ckpts.wait()
  good = [c for c in ckpt_lib.list_checkpoints(workdir)
          if c.complete and c.step < step]
  last = (f"{good[-1].path} (step {good[-1].step})" if good
          else "none (no checkpoint was saved before this step)")
  raise NonFiniteError(
      f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step"
      f" {step}; stopping without saving. Last good checkpoint: {last}")
