"""Training runs that differ only in seed and learning rate, as one population.

Contract (the reproduction driver relies on it): `train_population(configs,
workdirs)` takes ordinary `optconsist_jax.train` experiment configs that agree
on everything except `train.seed`, `data.seed`, `train.dropout_seed` and the
optimizer's learning rate (any setting of the groups' `schedule`, the peak
included), and leaves each workdir as `train.train(config, workdir)` would:
W/config.json (that member's resolved config), W/checkpoints/<step>/ in the
same Orbax layout (io/checkpoints.py; the eval job reads them unchanged),
W/metrics/. It returns one `train.TrainResult` per member, in order. Members
that differ in anything else are refused with a ValueError naming the keys,
before anything is written.

How (one compiled program for the whole population): every member is set up
as `train.train` sets up a run (its config checked against its workdir, its
own data pipeline, its initial state: resumed from its newest checkpoint,
else `init_from`, else random init from its own `train.seed`, LoRA adapters
from `train.seed + 1`). The member states are stacked on a leading axis and
one jitted `jax.vmap` of `train_step.train_step_fn` advances all of them per
step:
  - batch:    [P, B, T], row k from member k's own grain iterator (its
              `data.seed`'s packing and order);
  - dropout:  member k's seed (`train.dropout_seed`, else `train.seed` under
              LoRA dropout), folded with its step as in a single run;
  - learning rate: the optimizer is built inside the vmapped function
              (`optim.build(..., schedules=)`), each group's schedule being
              member k's own schedule selected by a traced member index, so
              every optimizer family sees its member's learning rate exactly
              where a single run's does (in its state too, e.g. Adafactor's
              momentum, Prodigy), with no proportionality assumption;
  - length:   members may differ in length (`num_epochs` x steps per epoch
              depends on the packing, so on `data.seed`) or start at
              different steps (a resumed population): a member past its end
              keeps its state (a masked update) while the others go on.
Member k saves exactly when its own run would (its epoch ends,
`checkpoint.every_steps`, its end), from its slice of the population state.
The result equals `train.train` run alone up to floating-point reassociation
of the batched matmuls (tests/test_population.py compares losses and params).

Resume and skip: a finished member (its newest checkpoint at its last step)
is not trained and returns as `train.train` does on a finished workdir; a
population stopped by SIGTERM (or `stop_after`) saves every member and
resumes where each stopped. A member whose loss or update turns NaN/Inf is
stopped without saving its bad state (as `train.train` would stop); the
others go on to their end, then `train_guards.NonFiniteError` names the failed
members.

Sequential fallback (`train.train` per member): a single member, or more
than one process (multi-host runs are not vmapped).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from optconsist_jax import platforms
from optconsist_jax.train import config as config_types
from optconsist_jax import errors
from optconsist_jax.train import guards as train_guards
from optconsist_jax.train import setup as train_setup
from optconsist_jax.io import weights

# The keys members may differ in (besides each optimizer group's schedule).
MEMBER_KEYS = ("train.seed", "train.dropout_seed", "data.seed")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}."))
  return out


def _shared_part(config: config_types.ExperimentConfig) -> dict[str, Any]:
  """The flattened config without the keys members may differ in."""
  d = json.loads(config.to_json())
  out = {k: v for k, v in _flat(d).items() if k not in MEMBER_KEYS}
  return {k: v for k, v in out.items()
          if not (k.startswith("optim.groups.") and ".schedule." in k)}


def check_members(configs: Sequence[config_types.ExperimentConfig]) -> None:
  """Raises ValueError unless the configs differ only in seeds and schedules."""
  first = _shared_part(configs[0])
  for i, c in enumerate(configs[1:], 1):
    other = _shared_part(c)
    diff = sorted(k for k in first.keys() | other.keys()
                  if first.get(k, "<absent>") != other.get(k, "<absent>"))
    if diff:
      shown = ", ".join(f"{k} ({first.get(k, '<absent>')!r} vs"
                        f" {other.get(k, '<absent>')!r})" for k in diff[:5])
      raise ValueError(
          f"population member {i} differs from member 0 in {shown}"
          f"{' ...' if len(diff) > 5 else ''}; members may differ only in"
          f" {', '.join(MEMBER_KEYS)} and optim.groups.*.schedule: train"
          " the others as another population")


@dataclasses.dataclass
class _Member:
  """One run of the population, set up as train.train sets up a run."""

  index: int
  config: config_types.ExperimentConfig  # resolved (total steps filled in)
  resolved: dict[str, Any]
  workdir: epath.Path
  pipe: Any
  setup: Any
  total_steps: int
  dropout_seed: int | None
  # Filled in by _start.
  ckpts: Any = None
  data_iter: Any = None
  writer: Any = None
  state: Any = None
  step: int = 0
  start: int = 0
  rng: Any = None
  losses: dict[int, float] = dataclasses.field(default_factory=dict)
  stopped: str = "done"
  failed: Exception | None = None
  last_batch: dict[str, np.ndarray] | None = None
  log_t: float | None = None
  log_step: int = 0
  log_tokens: float = 0.0

  @property
  def spe(self) -> int:
    return self.pipe.steps_per_epoch


def _prepare(index: int, config, workdir: epath.Path, mesh, tokenizer):
  """Checks and builds what train.train does before writing anything."""
  config, pipe, resolved, total = train_setup.prepare(
      config, workdir, mesh, tokenizer=tokenizer)
  tc = config.train
  dropout_seed = tc.dropout_seed
  if dropout_seed is None and config.lora is not None and config.lora.dropout:
    dropout_seed = tc.seed  # As train.train: LoRA dropout needs randomness.
  return _Member(index=index, config=config, resolved=resolved,
                 workdir=workdir, pipe=pipe, setup=train_setup.setup(config, mesh),
                 total_steps=total, dropout_seed=dropout_seed)


def _start(m: _Member) -> None:
  """config.json, checkpoints, data iterator and initial state of a member."""
  from optconsist_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import checkpointer as run_checkpoints  # pylint: disable=g-import-not-at-top
  train_setup.write_config(m.config, m.workdir)
  m.ckpts = run_checkpoints.RunCheckpoints(m.workdir, m.config.checkpoint,
                                    weights.identity(m.config.model, m.config.lora),
                                    run_config=m.resolved)
  m.data_iter = m.pipe.iterator()
  m.state, _, how = train_setup.initial_state(m.config, m.setup, m.ckpts,
                                        m.data_iter)
  m.start = m.step = int(jax.device_get(m.state.step))
  logging.info("population member %d (%s): %s at step %d of %d", m.index,
               m.workdir, how, m.start, m.total_steps)
  m.writer = metrics_lib.Writer(
      os.fspath(m.workdir), num_train_steps=m.total_steps,
      progress_every_secs=m.config.train.progress_every_secs)
  tc = m.config.train
  if tc.parameter_overview and m.start == 0:
    m.writer.parameter_overview(m.state.params, "trainable params")
  m.rng = jax.random.key(m.dropout_seed if m.dropout_seed is not None
                         else tc.seed)


def _stacked(sh: NamedSharding) -> NamedSharding:
  """The sharding of a member array with a leading (unsharded) member axis."""
  return NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))


def _own_schedule(schedules, index):
  """Member `index`'s schedule (traced index) among the members' schedules."""

  def schedule(count):
    return jax.lax.select_n(index,
                            *[jnp.asarray(fn(count)) for fn in schedules])
  return schedule


def _population_step(members: list[_Member], mesh):
  """jit(vmap(member step)): (state, batch, index, seed, active) over [P]."""
  from optconsist_jax import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  s0, c0 = members[0].setup, members[0].config
  rules = sharding.as_rules(s0.rules)
  constrain = sharding.LogicalConstraint(mesh, rules)
  used = sorted(set(s0.param_groups.values()))
  schedules = {g: [optim_lib.make_schedule(m.config.optim.groups[g].schedule)
                   for m in members] for g in used}

  def member_step(state, batch, index, dropout_seed, active):
    tx = optim_lib.build(
        c0.optim, s0.abstract_state.params, mesh=mesh,
        schedules={g: _own_schedule(fns, index)
                   for g, fns in schedules.items()})
    step = step_lib.train_step_fn(
        s0.graphdef, tx, constrain=constrain,
        grad_accum_steps=c0.train.grad_accum_steps,
        param_groups=s0.param_groups)
    new_state, metrics = step(state, batch, dropout_seed)
    # A member past its end (or stopped) keeps its state.
    new_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_state,
                             state)
    return new_state, metrics

  state_sh = jax.tree.map(_stacked, s0.shardings)
  batch_sh = _stacked(sharding.batch_sharding(mesh, rules))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      jax.vmap(member_step),
      in_shardings=(state_sh, batch_sh, replicated, replicated, replicated),
      out_shardings=(state_sh, replicated), donate_argnums=(0,)), batch_sh


def _log(m: _Member, step: int, metrics: dict[str, Any], tokens_per_step: int):
  """Member m's metrics of `step`, written as train.train writes them."""
  tc = m.config.train
  m.losses[step] = float(metrics["loss"])
  m.log_tokens += float(metrics.get("num_tokens", 0.0))
  if m.log_t is None:  # First step: includes compilation.
    m.log_t, m.log_step, m.log_tokens = time.perf_counter(), step, 0.0
    m.writer.scalars(step, {"loss": metrics["loss"],
                            "grad_norm": metrics["grad_norm"]})
    return
  if step % tc.log_every and step != m.total_steps:
    return
  dt = time.perf_counter() - m.log_t
  n = step - m.log_step
  out = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
  if n > 0 and dt > 0:
    out["step_time_s"] = dt / n
    out["tokens_per_s"] = n * tokens_per_step / dt
    out["target_tokens_per_s"] = m.log_tokens / dt
  for g, fn in m.setup.lr_fns.items():
    out[f"lr/{g}"] = float(fn(step - 1))
  out["epoch"] = (step - 1) / m.spe
  m.writer.scalars(step, out)
  m.log_t, m.log_step, m.log_tokens = time.perf_counter(), step, 0.0


def train_population(configs: Sequence[config_types.ExperimentConfig],
                     workdirs: Sequence[str | os.PathLike], *,
                     stop_after: int | None = None) -> list:
  """Trains (or resumes) every member; see the module docstring.

  Args:
    configs: the members' typed experiment configs.
    workdirs: one distinct workdir per member.
    stop_after: stop each member (with a checkpoint, as on SIGTERM) once it
      has done this many steps; for tests and time-sliced jobs.

  Returns:
    One `train.TrainResult` per member, in order. `perf` holds the
    population's step time (`population_size` members per step).
  """
  from optconsist_jax import train  # pylint: disable=g-import-not-at-top
  from optconsist_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import checkpoint_layout as ckpt_lib  # pylint: disable=g-import-not-at-top
  configs, workdirs = list(configs), [epath.Path(w) for w in workdirs]
  if len(configs) != len(workdirs):
    raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs")
  if len({os.path.realpath(w) for w in workdirs}) != len(workdirs):
    raise ValueError(f"population workdirs are not distinct: "
                     f"{[os.fspath(w) for w in workdirs]}")
  if not configs:
    return []
  check_members(configs)
  platforms.maybe_initialize_distributed()
  if len(configs) == 1 or jax.process_count() > 1:
    return [train.train(c, w, stop_after=stop_after)
            for c, w in zip(configs, workdirs)]

  with errors.user_input():
    mesh = sharding.make_mesh(configs[0].mesh)
    members, tokenizer = [], None
    for i, (c, w) in enumerate(zip(configs, workdirs)):
      members.append(_prepare(i, c, w, mesh, tokenizer))
      tokenizer = members[-1].pipe.tokenizer
  c0 = members[0].config
  tokens_per_step = c0.data.global_batch_size * c0.data.seq_len
  flops_per_token = c0.model.flops_per_token(c0.data.seq_len)
  perf = {"t0": None, "n": 0, "t": None}
  train_members = []
  try:
    for m in members:
      _start(m)
    train_members = [m for m in members if m.step < m.total_steps]
    logging.info("population: %d members, %d to train", len(members),
                 len(train_members))
    if train_members:
      _train(train_members, mesh, stop_after, tokens_per_step, perf)
  finally:
    errors_closing = []
    for m in members:
      try:
        if m.ckpts is not None:
          m.ckpts.close()
      except Exception as e:  # pylint: disable=broad-exception-caught
        errors_closing.append(e)
      finally:
        if m.writer is not None:
          m.writer.close()
    if errors_closing:
      raise errors_closing[0]

  failed = [m for m in members if m.failed is not None]
  if failed:
    raise train_guards.NonFiniteError("; ".join(
        f"population member {m.index} ({m.workdir}): {m.failed}"
        for m in failed) + ". The other members finished.")
  summary = {}
  if perf["t"] is not None and perf["n"] > 0:
    dt = (perf["t"] - perf["t0"]) / perf["n"]
    p = len(train_members)
    summary = {"steps_timed": perf["n"], "step_time_s": dt,
               "tokens_per_s": tokens_per_step / dt,
               "population_size": p,
               "population_tokens_per_s": p * tokens_per_step / dt,
               "mfu": metrics_lib.mfu(flops_per_token,
                                      p * tokens_per_step / dt,
                                      jax.device_count(),
                                      metrics_lib.peak_flops())}
  results = []
  for m in members:
    done = [c for c in ckpt_lib.list_checkpoints(m.workdir) if c.complete]
    results.append(train.TrainResult(
        step=m.step, losses=m.losses, stopped=m.stopped,
        workdir=os.fspath(m.workdir),
        last_checkpoint=os.fspath(done[-1].path) if done else None,
        perf=dict(summary) if m in train_members else {}))
  return results


def _train(members: list[_Member], mesh, stop_after: int | None,
           tokens_per_step: int, perf: dict[str, Any]) -> None:
  """The loop of train.train, over the population."""
  from optconsist_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  p = len(members)
  step_fn, batch_sh = _population_step(members, mesh)
  state_sh = [m.setup.shardings for m in members]
  stack = jax.jit(lambda states: jax.tree.map(lambda *xs: jnp.stack(xs),
                                              *states),
                  out_shardings=jax.tree.map(_stacked, state_sh[0]))
  unstack = jax.jit(
      lambda st: tuple(jax.tree.map(lambda x, k=k: x[k], st)
                       for k in range(p)), out_shardings=tuple(state_sh))
  state = stack([m.state for m in members])
  for m in members:
    m.state = None  # The stacked state owns the arrays now.
  stats_fn = jax.jit(jax.vmap(step_lib.stats_fn(members[0].setup.graphdef)))
  index = jnp.arange(p, dtype=jnp.int32)
  seeds = None
  if any(m.dropout_seed is not None for m in members):
    seeds = jnp.asarray([m.dropout_seed if m.dropout_seed is not None
                         else m.config.train.seed for m in members],
                        jnp.int32)
  pending = metrics_lib.DeferredFetch()
  stats_every = members[0].config.train.stats_every

  def live(m):
    return m.failed is None and m.stopped == "done" and m.step < m.total_steps

  def report(fetched):
    if fetched is None:
      return
    _, metrics, _ = fetched
    steps, was_live = fetched_steps.pop(0)
    now = time.perf_counter()
    if perf["t0"] is None:
      perf["t0"] = now
    else:
      perf["t"], perf["n"] = now, perf["n"] + 1
    for k, m in enumerate(members):
      if not was_live[k] or m.failed is not None:
        continue
      mk = {name: v[k] for name, v in metrics.items()}
      _log(m, steps[k], mk, tokens_per_step)
      if m.config.train.stop_on_nonfinite:
        try:
          train_guards.check_finite(steps[k], mk, m.ckpts, m.workdir)
        except train_guards.NonFiniteError as e:
          logging.error("population member %d (%s): %s", m.index, m.workdir,
                        e)
          m.failed = e

  fetched_steps: list[tuple[list[int], list[bool]]] = []
  with train_guards.Preemption() as preemption:
    while any(live(m) for m in members):
      active = [live(m) for m in members]
      local = []
      for m, a in zip(members, active):
        if a:
          m.last_batch = next(m.data_iter)
        local.append(m.last_batch)
      batch = {k: np.stack([np.asarray(b[k]) for b in local])
               for k in step_lib.BATCH_KEYS}
      batch = jax.device_put(batch, batch_sh)  # One process: all rows.
      due = [a and stats_every and (m.step + 1) % stats_every == 0
             for m, a in zip(members, active)]
      stats = (stats_fn(state.params, state.frozen, batch) if any(due)
               else None)
      state, metrics = step_fn(state, batch, index, seeds,
                               jnp.asarray(active))
      for m, a in zip(members, active):
        if a:
          m.step += 1
      fetched_steps.append(([m.step for m in members], active))
      for m in members:
        m.ckpts.check()
      report(pending.push(max(m.step for m in members), metrics))
      if stats is not None:
        stats = jax.device_get(stats)
        for k, m in enumerate(members):
          if due[k]:
            m.writer.scalars(m.step, metrics_lib.layer_stats_scalars(
                {name: v[k] for name, v in stats.items()}))
      preempted = preemption.reached(max(m.step for m in members))
      to_save = []
      for k, (m, a) in enumerate(zip(members, active)):
        if not a:
          continue
        m.writer.progress(m.step)
        epoch_end = m.step % m.spe == 0
        stop = preempted or (stop_after is not None and m.step >= stop_after)
        if (m.step == m.total_steps or stop
            or (epoch_end and m.config.checkpoint.save_epoch_ends)
            or m.ckpts.is_due(m.step)):
          to_save.append((k, m, epoch_end))
        if stop and m.step < m.total_steps:
          m.stopped = "preempted"
      if to_save:
        report(pending.pop())  # Never checkpoint a non-finite state.
        states = unstack(state)
        for k, m, epoch_end in to_save:
          if m.failed is not None:
            continue
          s = states[k]
          m.ckpts.save(m.step, params=train_setup.full_params(s),
                       opt_state=s.opt_state, data_iter=m.data_iter,
                       rng=m.rng, epoch=m.step // m.spe, epoch_end=epoch_end)
        del states
    report(pending.pop())
