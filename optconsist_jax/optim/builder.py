"""optim.build: the optax transformation for an OptimConfig and a param tree.

  clip_by_global_norm(clip_norm)            (over all trainable params)
  -> optax.partition({group: optimizer(schedule, weight_decay, **kwargs)},
                     labels from the routing rules)

A group with `state_specs` has its optimizer wrapped so that its state
carries the PartitionSpecs its spec hook names (optim/state_specs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh
import optax

from optconsist_jax.optim import registry
from optconsist_jax.optim import routing
from optconsist_jax.optim import state_specs
from optconsist_jax.optim.config import OptimConfig
from optconsist_jax.sharding import leaf_shardings
from optconsist_jax.optim.schedules import make_schedule


def assign_groups(optim_config: OptimConfig | Any,
                  abstract_params: Any) -> dict[str, str]:
  """{param path: group name}; errors name unrouted / doubly routed params."""
  c = OptimConfig.from_dict(optim_config)
  return routing.assign(abstract_params, c.routes, c.route_mode)


def build(optim_config: OptimConfig | Any, abstract_params: Any, *,
          mesh: Mesh | None = None,
          schedules: Mapping[str, optax.Schedule] | None = None,
          schedule_offset: int = 0) -> optax.GradientTransformation:
  """The optimizer for `abstract_params` (the trainable params only).

  Args:
    optim_config: OptimConfig or its dict form.
    abstract_params: pytree (e.g. `nnx.state(model, nnx.Param)`) of arrays or
      ShapeDtypeStructs; NamedShardings on the leaves tell Muon the layout.
    mesh: the device mesh (Muon's `stacked` strategy), else taken from the
      leaves' shardings.
    schedules: {group: learning-rate schedule} used in place of those the
      config's groups describe (e.g. one that depends on a traced value, as
      when a vmapped population of runs selects each member's own).
    schedule_offset: every schedule is read at (state count -
      schedule_offset): an optimizer state carried over from a run of that
      many steps keeps its counts (Adam's bias correction goes on from
      there) while the new run's schedule starts at its step 0.

  Returns:
    An optax.GradientTransformation whose updates are added to the params.
  """
  c = OptimConfig.from_dict(optim_config)
  assignment = routing.assign(abstract_params, c.routes, c.route_mode)
  context = registry.BuildContext(mesh=mesh,
                                  shardings=leaf_shardings(abstract_params))
  used = sorted(set(assignment.values()))
  schedules = dict(schedules or {})
  transforms = {}
  for name in used:
    g, where = c.groups[name], f"optim.groups.{name}"
    schedule = schedules.get(name) or make_schedule(g.schedule)
    if schedule_offset:
      schedule = _shifted(schedule, schedule_offset)
    transforms[name] = registry.make(
        g.optimizer, schedule, g.weight_decay, g.kwargs, context, where=where)
    if g.state_specs:
      try:
        hook = registry.import_callable(g.state_specs)
      except ValueError as e:
        raise ValueError(f"{where}.state_specs: {e}") from None
      transforms[name] = state_specs.with_state_specs(
          transforms[name], hook,
          {**g.kwargs, "weight_decay": g.weight_decay}, context.shardings,
          where=f"{where}.state_specs")
  if len(used) == 1:
    tx = transforms[used[0]]
  else:
    tx = optax.partition(transforms,
                         lambda tree: routing.labels(assignment, tree))
  if c.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
  return tx


def _shifted(schedule: optax.Schedule, offset: int) -> optax.Schedule:
  return lambda count: schedule(count - offset)


def learning_rates(optim_config: OptimConfig | Any,
                   step: int | jax.Array) -> dict[str, float]:
  """Each group's learning rate at `step` (0-based), for logging."""
  c = OptimConfig.from_dict(optim_config)
  return {name: float(make_schedule(g.schedule)(step))
          for name, g in c.groups.items()}
