"""Training runs that differ only in seed and learning rate, as one population.

Contract (the reproduction driver relies on it): `train_population(configs,
workdirs)` takes ordinary `optconsist_jax.train` experiment configs that agree
on everything except `train.seed`, `data.seed`, `train.dropout_seed`, the
base they start from (`init_from.path`: pretraining seeds of one base
architecture) and the optimizer's learning rate (any setting of the groups'
`schedule`, the peak included), and leaves each workdir as `train.train(config, workdir)` would:
W/config.json (that member's resolved config), W/checkpoints/<step>/ in the
same Orbax layout (io/checkpoint_layout.py; the eval job reads them
unchanged), W/metrics/. It returns one `train.TrainResult` per member, in order. Members
that differ in anything else are refused with a ValueError naming the keys,
before anything is written.

How (one compiled program for the whole population): every member is set up
as `train.train` sets up a run (its config checked against its workdir, its
own data pipeline, its initial state: resumed from its newest checkpoint,
else `init_from`, else random init from its own `train.seed`, LoRA adapters
from `train.seed + 1`). The member states are stacked on a leading axis and
one jitted `jax.vmap` of `step.train_step_fn` advances all of them per
step (`PopulationStep`, the step program of the loop in loop.py, which a run
alone shares):
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
others go on to their end, then `guards.NonFiniteError` names the failed
members.

Sequential fallback (`train.train` per member): a single member, or more
than one process (multi-host runs are not vmapped).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from optconsist_jax import errors
from optconsist_jax import optim as optim_lib
from optconsist_jax import platforms
from optconsist_jax import sharding
from optconsist_jax.train import config as config_types
from optconsist_jax.train import loop
from optconsist_jax.train import step as step_lib

# The keys members may differ in (besides each optimizer group's schedule).
MEMBER_KEYS = ("train.seed", "train.dropout_seed", "data.seed",
               "init_from.path")


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


def _stacked(sh: NamedSharding) -> NamedSharding:
  """The sharding of a member array with a leading (unsharded) member axis."""
  return NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))


def _own_schedule(schedules, index):
  """Member `index`'s schedule (traced index) among the members' schedules."""

  def schedule(count):
    return jax.lax.select_n(index,
                            *[jnp.asarray(fn(count)) for fn in schedules])
  return schedule


class PopulationStep:
  """The loop's step program for a population: jit(vmap(member step)).

  Owns the members' states stacked on a leading [P] axis; one call advances
  every active member (an inactive one keeps its state).
  """

  def __init__(self, members: list[loop.Member], mesh: jax.sharding.Mesh):
    p = len(members)
    s0, c0 = members[0].setup, members[0].config
    rules = sharding.as_rules(s0.rules)
    constrain = sharding.LogicalConstraint(mesh, rules)
    used = sorted(set(s0.param_groups.values()))
    schedules = {g: [optim_lib.make_schedule(m.config.optim.groups[g].schedule)
                     for m in members] for g in used}

    def member_step(state, batch, index, dropout_seed, active):
      tx = optim_lib.build(
          c0.optim, s0.builder.abstract_params, mesh=mesh,
          schedules={g: _own_schedule(fns, index)
                     for g, fns in schedules.items()},
          schedule_offset=s0.schedule_offset)
      step = step_lib.train_step_fn(
          s0.graphdef, tx, constrain=constrain,
          grad_accum_steps=c0.train.grad_accum_steps,
          param_groups=s0.param_groups)
      new_state, metrics = step(state, batch, dropout_seed)
      # A member past its end (or stopped) keeps its state.
      new_state = jax.tree.map(lambda n, o: jnp.where(active, n, o),
                               new_state, state)
      return new_state, metrics

    state_sh = jax.tree.map(_stacked, s0.shardings)
    self._batch_sh = _stacked(sharding.batch_sharding(mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    self._step = jax.jit(
        jax.vmap(member_step),
        in_shardings=(state_sh, self._batch_sh, replicated, replicated,
                      replicated),
        out_shardings=(state_sh, replicated), donate_argnums=(0,))
    self._stats = jax.jit(jax.vmap(step_lib.stats_fn(s0.graphdef)))
    self._unstack = jax.jit(
        lambda st: tuple(jax.tree.map(lambda x, k=k: x[k], st)
                         for k in range(p)),
        out_shardings=tuple(m.setup.shardings for m in members))
    stack = jax.jit(
        lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
        out_shardings=state_sh)
    self._state = stack([m.state for m in members])
    for m in members:
      m.state = None  # The stacked state owns the arrays now.
    self._index = jnp.arange(p, dtype=jnp.int32)
    self._seeds = None
    if any(m.dropout_seed is not None for m in members):
      self._seeds = jnp.asarray(
          [m.dropout_seed if m.dropout_seed is not None
           else m.config.train.seed for m in members], jnp.int32)
    self._size = p

  def __call__(self, local_batches, stats_due, active):
    batch = {k: np.stack([np.asarray(b[k]) for b in local_batches])
             for k in step_lib.BATCH_KEYS}
    batch = jax.device_put(batch, self._batch_sh)  # One process: all rows.
    stats = (self._stats(self._state.params, self._state.frozen, batch)
             if any(stats_due) else None)
    self._state, metrics = self._step(self._state, batch, self._index,
                                      self._seeds, jnp.asarray(active))
    return metrics, stats

  def member_states(self):
    return self._unstack(self._state)

  def of_member(self, tree, k):
    return jax.tree.map(lambda v: v[k], tree)

  def perf(self, perf):
    return {**perf, "population_size": self._size,
            "population_tokens_per_s": self._size * perf["tokens_per_s"]}


def train_population(configs: Sequence[config_types.ExperimentConfig],
                     workdirs: Sequence[str | os.PathLike], *,
                     stop_after: int | None = None) -> list[loop.TrainResult]:
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
    return [loop.train(c, w, stop_after=stop_after)
            for c, w in zip(configs, workdirs)]

  loop.enable_compilation_cache(configs[0], workdirs[0])
  with errors.user_input():
    mesh = sharding.make_mesh(configs[0].mesh)
    members, tokenizer = [], None
    for i, (c, w) in enumerate(zip(configs, workdirs)):
      members.append(loop.prepare_member(
          c, w, mesh, name=f"population member {i} ({w})",
          tokenizer=tokenizer))
      tokenizer = members[-1].pipe.tokenizer
  return loop.train_members(
      members, lambda training: PopulationStep(training, mesh),
      stop_after=stop_after)
