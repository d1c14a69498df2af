"""The training loop: one run, or a population of runs as one vmapped state.

`train(config, workdir)` runs (or resumes) one run; the command line
(`python -m optconsist_jax.train`, train/__main__.py) says what it does step
by step. setup.py builds what the loop needs, step.py the jitted step,
guards.py the early stops, population.py the vmapped population.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from optconsist_jax import errors
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import platforms
from optconsist_jax import sharding
from optconsist_jax.train import guards as train_guards
from optconsist_jax.train import setup as train_setup
from optconsist_jax.train import step as step_lib
from optconsist_jax.train.config import ExperimentConfig
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import checkpointer as run_checkpoints
from optconsist_jax.io import weights



@dataclasses.dataclass
class TrainResult:
  """What a run did (returned by `train`, for tests and drivers).

  Attributes:
    step: optimizer steps completed (== the final checkpoint's step).
    losses: step -> training loss of that step (1-based steps of this
      process's run; steps restored from a checkpoint are absent).
    stopped: "done" | "preempted".
    workdir: W.
    last_checkpoint: path of the newest complete checkpoint.
    perf: steady-state throughput over this run's steps after the first
      (which includes compilation): steps_timed, step_time_s, tokens_per_s
      (all B x T slots), target_tokens_per_s, mfu (None off a known device).
  """

  step: int
  losses: dict[int, float]
  stopped: str
  workdir: str
  last_checkpoint: str | None
  perf: dict[str, Any] = dataclasses.field(default_factory=dict)


def train(config: ExperimentConfig, workdir: str | os.PathLike,
          *, stop_after: int | None = None) -> TrainResult:
  """Runs (or resumes) training in `workdir`.

  Args:
    config: the typed experiment config.
    workdir: W (created if missing).
    stop_after: stop (with a checkpoint, as on SIGTERM) once this many steps
      are done; for tests and time-sliced jobs.
  """
  workdir = epath.Path(workdir)
  platforms.maybe_initialize_distributed()
  # 1. Everything read from the user is checked before anything is written.
  with errors.user_input():
    mesh = sharding.make_mesh(config.mesh)
    config, pipe, resolved, total_steps = train_setup.prepare(
        config, workdir, mesh)
    tc = config.train
    # 2. Mesh-bound model and optimizer.
    s = train_setup.setup(config, mesh)
  # clu's writers import TensorFlow: overlap that with restoring/initializing.
  metrics_lib.preload_writers()
  train_setup.write_config(config, workdir)
  # 3. The initial state.
  ckpts = run_checkpoints.RunCheckpoints(
      workdir, config.checkpoint, weights.identity(config.model, config.lora),
      run_config=resolved)
  data_iter = pipe.iterator()
  state, epoch, how = train_setup.initial_state(config, s, ckpts, data_iter)
  start = int(jax.device_get(state.step))
  logging.info("%s at step %d of %d (%d steps/epoch, %d devices, mesh %s)",
               how, start, total_steps, pipe.steps_per_epoch,
               jax.device_count(), dict(mesh.shape))

  # 4. The loop.
  writer = metrics_lib.Writer(os.fspath(workdir), num_train_steps=total_steps,
                              progress_every_secs=tc.progress_every_secs)
  if tc.parameter_overview and start == 0:
    writer.parameter_overview(state.params, "trainable params")
  dropout_seed = tc.dropout_seed
  if dropout_seed is None and config.lora is not None and config.lora.dropout:
    dropout_seed = tc.seed  # LoRA dropout needs randomness.
  train_fn = step_lib.make_train_step(
      s.graphdef, s.tx, mesh=mesh, rules=s.rules,
      state_shardings=s.shardings, grad_accum_steps=tc.grad_accum_steps,
      param_groups=s.param_groups, dropout_seed=dropout_seed)
  stats_fn = jax.jit(step_lib.stats_fn(s.graphdef))
  rng = jax.random.key(dropout_seed if dropout_seed is not None else tc.seed)
  # Rates since the last log, and over the run after its first step.
  interval, whole_run = (metrics_lib.Throughput(
      config.data.global_batch_size * config.data.seq_len,
      config.model.flops_per_token(config.data.seq_len), jax.device_count(),
      metrics_lib.peak_flops()) for _ in range(2))
  losses: dict[int, float] = {}
  pending = metrics_lib.DeferredFetch()
  stopped = "done"

  def save(step: int, *, epoch_end: bool):
    ckpts.save(step, params=train_setup.full_params(state),
               opt_state=state.opt_state, data_iter=data_iter, rng=rng,
               epoch=step // pipe.steps_per_epoch, epoch_end=epoch_end)

  def report(fetched):
    """Writes one fetched step's metrics; NaN guard."""
    if fetched is None:
      return
    step, m, _ = fetched
    losses[step] = float(m["loss"])
    if tc.stop_on_nonfinite:
      train_guards.check_finite(step, m, ckpts, workdir)
    if not interval.started:  # First step: includes compilation.
      interval.start(step)
      whole_run.start(step)
      writer.scalars(step, {"loss": m["loss"], "grad_norm": m["grad_norm"]})
      return
    for window in (interval, whole_run):
      window.count(step, float(m.get("num_tokens", 0.0)))
    if step % tc.log_every and step != total_steps:
      return
    out = {k: v for k, v in m.items() if np.ndim(v) == 0}
    out.update(interval.rates())
    for g, fn in s.lr_fns.items():
      out[f"lr/{g}"] = float(fn(step - 1))
    out["epoch"] = (step - 1) / pipe.steps_per_epoch
    writer.scalars(step, out)
    interval.start(step)

  try:
    with train_guards.Preemption() as preemption:
      step = start
      while step < total_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          local = next(data_iter)
          batch = step_lib.global_batch(local, mesh, s.rules)
          if tc.stats_every and (step + 1) % tc.stats_every == 0:
            stats = stats_fn(state.params, state.frozen, batch)
          else:
            stats = None
          state, m = train_fn(state, batch)
          step += 1
        ckpts.check()  # A background save that failed stops the run here.
        report(pending.push(step, m))
        if stats is not None:
          writer.scalars(step, metrics_lib.layer_stats_scalars(
              jax.device_get(stats)))
        writer.progress(step)
        epoch_end = step % pipe.steps_per_epoch == 0
        stop = preemption.reached(step) or (
            stop_after is not None and step >= stop_after)
        if (step == total_steps or stop
            or (epoch_end and config.checkpoint.save_epoch_ends)
            or ckpts.is_due(step)):
          report(pending.pop())  # Never checkpoint a non-finite state.
          save(step, epoch_end=epoch_end)
        if stop and step < total_steps:
          stopped = "preempted"
          break
      report(pending.pop())
  finally:
    try:
      ckpts.close()  # Raises SaveFailedError if the last save did not commit.
    finally:
      writer.close()
  done = [c for c in ckpt_lib.list_checkpoints(workdir) if c.complete]
  rates = whole_run.rates()
  return TrainResult(
      step=step, losses=losses, stopped=stopped, workdir=os.fspath(workdir),
      last_checkpoint=os.fspath(done[-1].path) if done else None,
      perf={"steps_timed": whole_run.steps, **rates} if rates else {})
