"""The training loop: one run, or a population of runs, as one loop.

`train(config, workdir)` runs (or resumes) one run; the command line
(`python -m optconsist_jax.train`, train/__main__.py) says what it does step
by step. The loop (`train_members`) steps a list of `Member`s through a step
program: for one run, `RunStep` (the jitted step on the global batch,
multi-host capable); for a population (population.py), one jit(vmap) over the
members' stacked states. Everything else is shared: when a member saves, that
no non-finite state is saved, the NaN/Inf and SIGTERM stops (guards.py), the
metrics written and the throughput measured, the profile of
`config.profile.steps`, and the `TrainResult`s. setup.py builds what the loop
needs, state.py the state, step.py the step.

Scalars every `log_every` steps, besides the step's own (loss, grad norm,
update norms): lr/<group>, epoch, step_time_s, tokens_per_s (all B x T
slots), tokens_per_s_per_chip (per JAX device: a chip on v4, v5e, v5p, v6e;
for a population, all members' tokens over all devices), target_tokens_per_s,
mfu (on devices of known peak), and where the backend reports device memory
(TPU, GPU; not CPU, whose `memory_stats()` is None) memory/bytes_in_use and
memory/peak_bytes_in_use, the largest over this host's devices. Every host
logs them; process 0 also writes W/metrics (metrics.Writer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import os
from typing import Any, Protocol

from absl import logging
from etils import epath
import jax
import numpy as np

from optconsist_jax import errors
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import platforms
from optconsist_jax.platforms import allocator
from optconsist_jax import sharding
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import checkpointer
from optconsist_jax.io import weights
from optconsist_jax.train import guards as train_guards
from optconsist_jax.train import setup as train_setup
from optconsist_jax.train import state as state_lib
from optconsist_jax.train import step as step_lib
from optconsist_jax.train.config import ExperimentConfig


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
      (all B x T slots), tokens_per_s_per_chip, target_tokens_per_s, mfu
      (None off a known device); a population member's also population_size
      and population_tokens_per_s.
  """

  step: int
  losses: dict[int, float]
  stopped: str
  workdir: str
  last_checkpoint: str | None
  perf: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Member:
  """One run in the loop: what it trains on, where it writes, how far it is.

  `prepare_member` fills the first block (nothing written yet); `_start` the
  rest (its config.json, checkpoints, data iterator, initial state, writer).
  """

  name: str  # how messages name it ("" for a run alone)
  config: ExperimentConfig  # resolved (total steps filled in)
  resolved: dict[str, Any]
  workdir: epath.Path
  pipe: Any
  setup: train_setup.Setup
  total_steps: int
  dropout_seed: int | None
  ckpts: checkpointer.RunCheckpoints | None = None
  data_iter: Any = None
  writer: metrics_lib.Writer | None = None
  state: state_lib.TrainState | None = None  # until the step program owns it
  rng: Any = None
  step: int = 0
  losses: dict[int, float] = dataclasses.field(default_factory=dict)
  stopped: str = "done"
  failed: train_guards.NonFiniteError | None = None
  last_batch: dict[str, np.ndarray] | None = None
  # Rates since the last log, and over the run after its first step.
  interval: metrics_lib.Throughput | None = None
  whole_run: metrics_lib.Throughput | None = None

  @property
  def steps_per_epoch(self) -> int:
    return self.pipe.steps_per_epoch

  @property
  def live(self) -> bool:
    return (self.failed is None and self.stopped == "done"
            and self.step < self.total_steps)


class StepProgram(Protocol):
  """Advances the live members by one step (owns their state meanwhile)."""

  def __call__(self, local_batches: list[dict[str, np.ndarray]],
               stats_due: list[bool], active: list[bool]) -> tuple[Any, Any]:
    """(device metrics, device layer stats or None) of one step.

    local_batches[k] is member k's rows of this process (an inactive
    member's last batch, its update masked); stats_due[k] asks for member
    k's layer statistics before the step.
    """

  def member_states(self) -> Sequence[state_lib.TrainState]:
    """Each member's current state (for saving)."""

  def of_member(self, tree: Any, k: int) -> Any:
    """Member k's part of fetched metrics or stats."""

  def perf(self, perf: dict[str, Any]) -> dict[str, Any]:
    """A member's TrainResult.perf, with what the program adds."""


class RunStep:
  """The step program of a run alone: the jitted step on the global batch."""

  def __init__(self, member: Member, mesh: jax.sharding.Mesh):
    s = member.setup
    self._mesh, self._rules = mesh, s.rules
    self._step = step_lib.make_train_step(
        s.graphdef, s.tx, mesh=mesh, rules=s.rules,
        state_shardings=s.shardings,
        grad_accum_steps=member.config.train.grad_accum_steps,
        param_groups=s.param_groups, dropout_seed=member.dropout_seed)
    self._stats = jax.jit(step_lib.stats_fn(s.graphdef))
    self._state, member.state = member.state, None

  def __call__(self, local_batches, stats_due, active):
    del active  # A run alone is live while the loop runs.
    batch = step_lib.global_batch(local_batches[0], self._mesh, self._rules)
    stats = (self._stats(self._state.params, self._state.frozen, batch)
             if stats_due[0] else None)
    self._state, metrics = self._step(self._state, batch)
    return metrics, stats

  def member_states(self):
    return [self._state]

  def of_member(self, tree, k):
    del k
    return tree

  def perf(self, perf):
    return perf


def prepare_member(config: ExperimentConfig, workdir: epath.Path, mesh, *,
                   name: str = "", tokenizer: Any = None) -> Member:
  """Checks and builds what a run needs before anything is written."""
  config, pipe, resolved, total_steps = train_setup.prepare(
      config, workdir, mesh, tokenizer=tokenizer)
  tc = config.train
  dropout_seed = tc.dropout_seed
  if dropout_seed is None and config.lora is not None and config.lora.dropout:
    dropout_seed = tc.seed  # LoRA dropout needs randomness.
  return Member(name=name, config=config, resolved=resolved, workdir=workdir,
                pipe=pipe, setup=train_setup.setup(config, mesh),
                total_steps=total_steps, dropout_seed=dropout_seed)


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
  enable_compilation_cache(config, workdir)
  # Everything read from the user is checked before anything is written.
  with errors.user_input():
    mesh = sharding.make_mesh(config.mesh)
    member = prepare_member(config, workdir, mesh)
  [result] = train_members([member], lambda ms: RunStep(ms[0], mesh),
                           stop_after=stop_after)
  return result


def enable_compilation_cache(config: ExperimentConfig,
                             workdir: epath.Path) -> None:
  """JAX's persistent compilation cache per config.train (before compiling)."""
  where = platforms.enable_compilation_cache(
      config.train.compilation_cache_dir, os.fspath(workdir))
  logging.info("persistent compilation cache: %s", where or "off")
  if jax.default_backend() == "cpu":
    logging.info("CPU allocator: %s", allocator.current())


def train_members(members: list[Member],
                  make_program: Callable[[list[Member]], StepProgram], *,
                  stop_after: int | None = None) -> list[TrainResult]:
  """Starts every member, trains those not finished, returns their results.

  Args:
    members: from `prepare_member`.
    make_program: the step program of the members still to train.
    stop_after: stop each member (with a checkpoint, as on SIGTERM) once it
      has done this many steps.

  Raises:
    NonFiniteError: a member's loss or update turned NaN/Inf (it stopped
      without saving; the others went on to their end).
  """
  program = None
  try:
    for m in members:
      _start(m)
    training = [m for m in members if m.live]
    if len(members) > 1:
      logging.info("population: %d members, %d to train", len(members),
                   len(training))
    for m in training:
      m.interval, m.whole_run = (_throughput(m, len(training))
                                 for _ in range(2))
    if training:
      program = make_program(training)
      _loop(training, program, stop_after)
  finally:
    _close(members)
  failed = [m for m in members if m.failed is not None]
  if len(members) == 1 and failed:
    raise failed[0].failed
  if failed:
    raise train_guards.NonFiniteError("; ".join(
        f"{m.name}: {m.failed}" for m in failed)
        + ". The other members finished.")
  return [_result(m, program) for m in members]


def _start(m: Member) -> None:
  """config.json, checkpoints, data iterator, initial state, metrics writer."""
  tc = m.config.train
  train_setup.write_config(m.config, m.workdir)
  m.ckpts = checkpointer.RunCheckpoints(
      m.workdir, m.config.checkpoint,
      weights.identity(m.config.model, m.config.lora), run_config=m.resolved)
  m.data_iter = m.pipe.iterator()
  m.state, _, how = train_setup.initial_state(m.config, m.setup, m.ckpts,
                                              m.data_iter)
  m.step = int(jax.device_get(m.state.step))
  logging.info("%s%s at step %d of %d (%d steps/epoch, %d devices, mesh %s)",
               f"{m.name}: " if m.name else "", how, m.step, m.total_steps,
               m.steps_per_epoch, jax.device_count(),
               dict(m.setup.mesh.shape))
  m.writer = metrics_lib.Writer(os.fspath(m.workdir),
                                num_train_steps=m.total_steps,
                                progress_every_secs=tc.progress_every_secs)
  if tc.parameter_overview and m.step == 0:
    m.writer.parameter_overview(m.state.params, "trainable params")
  m.rng = jax.random.key(m.dropout_seed if m.dropout_seed is not None
                         else tc.seed)


def _throughput(m: Member, members_per_step: int) -> metrics_lib.Throughput:
  # Members stepped together share the devices: MFU counts all their flops.
  c = m.config
  return metrics_lib.Throughput(
      c.data.global_batch_size * c.data.seq_len,
      c.model.flops_per_token(c.data.seq_len),
      jax.device_count() / members_per_step, metrics_lib.peak_flops())


def _rates(window: metrics_lib.Throughput) -> dict[str, Any]:
  """The window's rates, with tokens/s per device (chip) it steps on."""
  out = window.rates()
  if out:
    out["tokens_per_s_per_chip"] = out["tokens_per_s"] / window.num_devices
  return out


def device_memory() -> dict[str, float]:
  """memory/bytes_in_use and memory/peak_bytes_in_use: the largest over this
  host's devices; {} where the backend keeps no statistics (CPU)."""
  out: dict[str, float] = {}
  for d in jax.local_devices():
    stats = d.memory_stats() or {}
    for k in ("bytes_in_use", "peak_bytes_in_use"):
      if k in stats:
        out[f"memory/{k}"] = max(out.get(f"memory/{k}", 0.0), float(stats[k]))
  return out


def _record(m: Member, step: int, metrics: dict[str, Any]) -> None:
  """Member m's fetched metrics of `step`: loss, NaN guard, scalars, rates."""
  tc = m.config.train
  m.losses[step] = float(metrics["loss"])
  if tc.stop_on_nonfinite:
    try:
      train_guards.check_finite(step, metrics, m.ckpts, m.workdir)
    except train_guards.NonFiniteError as e:
      logging.error("%s%s", f"{m.name}: " if m.name else "", e)
      m.failed = e  # Stopped without saving; the others go on.
      return
  if not m.interval.started:  # First step: includes compilation.
    m.interval.start(step)
    m.whole_run.start(step)
    m.writer.scalars(step, {"loss": metrics["loss"],
                            "grad_norm": metrics["grad_norm"]})
    return
  for window in (m.interval, m.whole_run):
    window.count(step, float(metrics.get("num_tokens", 0.0)))
  if step % tc.log_every and step != m.total_steps:
    return
  out = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
  out.update(_rates(m.interval))
  out.update(device_memory())
  for g, fn in m.setup.lr_fns.items():
    out[f"lr/{g}"] = float(fn(step - 1))
  out["epoch"] = (step - 1) / m.steps_per_epoch
  m.writer.scalars(step, out)
  m.interval.start(step)


PROFILE_DIR = "profile"


class StepTrace:
  """A `jax.profiler` trace of steps START..END (config.profile), process 0.

  Starts before step START's batch is read and stops once step END's
  outputs are ready, so the trace holds whole steps; a run that stops inside the
  window (or fails) closes it with what it traced. jax writes
  <logdir>/plugins/profile/<run>/<host>.xplane.pb.
  """

  def __init__(self, window: tuple[int, int] | None, logdir: epath.Path):
    self._window = window if jax.process_index() == 0 else None
    self._logdir = logdir
    self._on, self._first, self._last = False, 0, 0

  def __enter__(self) -> StepTrace:
    return self

  def before(self, step: int) -> None:
    """Step `step` (1-based) is next: its batch is about to be read."""
    if (self._window and not self._on
        and self._window[0] <= step <= self._window[1]):
      self._logdir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(os.fspath(self._logdir))
      self._on, self._first, self._last = True, step, step - 1

  def after(self, step: int, outputs: Any) -> None:
    """Step `step` was dispatched with `outputs`."""
    if self._on:
      self._last = step
      if step >= self._window[1]:
        jax.block_until_ready(outputs)
        self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._on, self._window = False, None
    train_setup.say(f"profile of steps {self._first}-{self._last} in"
                    f" {self._logdir} (tensorboard --logdir {self._logdir},"
                    " Profile tab)")

  def __exit__(self, *exc) -> None:
    if self._on:
      self._stop()


def _loop(members: list[Member], program: StepProgram,
          stop_after: int | None) -> None:
  """Steps the members until each is done, stopped or failed."""
  pending = metrics_lib.DeferredFetch()
  trace = StepTrace(members[0].config.profile.window(),
                    members[0].workdir / PROFILE_DIR)
  # Per pushed step: each member's step and whether it took part.
  pushed: list[tuple[list[int], list[bool]]] = []

  def report(fetched):
    if fetched is None:
      return
    steps, took_part = pushed.pop(0)
    for k, m in enumerate(members):
      if took_part[k] and m.failed is None:
        _record(m, steps[k], program.of_member(fetched[1], k))

  with train_guards.Preemption() as preemption, trace:
    while any(m.live for m in members):
      trace.before(max(m.step for m in members) + 1)  # Its batch included.
      active = [m.live for m in members]
      local, due = [], []
      for m, a in zip(members, active):
        if a:
          m.last_batch = next(m.data_iter)
        local.append(m.last_batch)
        every = m.config.train.stats_every
        due.append(bool(a and every and (m.step + 1) % every == 0))
      with jax.profiler.StepTraceAnnotation(
          "train", step_num=max(m.step for m in members)):
        metrics, stats = program(local, due, active)
      for m, a in zip(members, active):
        if a:
          m.step += 1
      trace.after(max(m.step for m in members), metrics)
      pushed.append(([m.step for m in members], active))
      for m in members:
        m.ckpts.check()  # A background save that failed stops the run here.
      report(pending.push(max(m.step for m in members), metrics))
      if stats is not None:
        stats = jax.device_get(stats)
        for k, m in enumerate(members):
          if due[k]:
            m.writer.scalars(m.step, metrics_lib.layer_stats_scalars(
                program.of_member(stats, k)))
      preempted = preemption.reached(max(m.step for m in members))
      to_save = []
      for k, (m, a) in enumerate(zip(members, active)):
        if not a:
          continue
        m.writer.progress(m.step)
        epoch_end = m.step % m.steps_per_epoch == 0
        stop = preempted or (stop_after is not None and m.step >= stop_after)
        if (m.step == m.total_steps or stop
            or (epoch_end and m.config.checkpoint.save_epoch_ends)
            or m.ckpts.is_due(m.step)):
          to_save.append((k, m, epoch_end))
        if stop and m.step < m.total_steps:
          m.stopped = "preempted"
      if to_save:
        report(pending.pop())  # Never checkpoint a non-finite state.
        states = program.member_states()
        for k, m, epoch_end in to_save:
          if m.failed is None:
            _save(m, states[k], epoch_end)
        del states
    report(pending.pop())


def _save(m: Member, state: state_lib.TrainState, epoch_end: bool) -> None:
  m.ckpts.save(m.step, params=state_lib.full_params(state),
               opt_state=state.opt_state, data_iter=m.data_iter, rng=m.rng,
               epoch=m.step // m.steps_per_epoch, epoch_end=epoch_end)


def _close(members: list[Member]) -> None:
  """Closes every member's checkpoints (waiting for the last save) and writer.

  Raises the first SaveFailedError (a last save that did not commit) once
  all are closed.
  """
  failures = []
  for m in members:
    try:
      if m.ckpts is not None:
        m.ckpts.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      failures.append(e)
    finally:
      if m.writer is not None:
        m.writer.close()
  if failures:
    raise failures[0]


def _result(m: Member, program: StepProgram | None) -> TrainResult:
  done = [c for c in ckpt_lib.list_checkpoints(m.workdir) if c.complete]
  rates = _rates(m.whole_run) if m.whole_run is not None else {}
  perf = {"steps_timed": m.whole_run.steps, **rates} if rates else {}
  return TrainResult(
      step=m.step, losses=m.losses, stopped=m.stopped,
      workdir=os.fspath(m.workdir),
      last_checkpoint=os.fspath(done[-1].path) if done else None,
      perf=program.perf(perf) if perf else {})
