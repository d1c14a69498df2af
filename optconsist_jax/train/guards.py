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


class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      logging.warning("signal %d: saving a checkpoint and stopping", signum)
      self.requested = True
    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      # All hosts must agree on the step to stop at.
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:
        pass
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
