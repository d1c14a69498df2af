"""Typed optimizer configuration (the boundary with ml_collections configs).

  groups:      name -> GroupConfig(optimizer, kwargs, schedule, weight_decay)
  routes:      ordered (pattern, group) rules, see optim/routing.py
  route_mode:  'strict' (each param matches exactly one rule) or 'first'
  clip_norm:   global-norm gradient clipping over all trainable params
               (None or 0 = off)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optconsist_jax import typed_config
from optconsist_jax.optim import routing
from optconsist_jax.optim.schedules import ScheduleConfig


def _plain(d: Any) -> dict[str, Any]:
  if hasattr(d, "to_dict"):  # ml_collections.ConfigDict
    d = d.to_dict()
  return dict(d)


def _check_keys(d: dict[str, Any], cls, where: str) -> None:
  typed_config.check_keys(cls, d, f"optim config {where}")


@dataclasses.dataclass(frozen=True)
class GroupConfig:
  """One optimizer group.

  Attributes:
    optimizer: an optimizer name: any Optax optimizer (`lion`,
      `contrib.prodigy`), `muon`, or an import path `pkg.module:function`
      (optim/registry.py).
    kwargs: extra keyword arguments of that optimizer.
    schedule: its learning-rate schedule.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    state_specs: import path `pkg.module:function` of the family's spec hook
      naming its state's PartitionSpecs (optim/state_specs.py); None: the
      default rule of sharding.state_shardings.
  """
  optimizer: str = "adamw"
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  schedule: ScheduleConfig = ScheduleConfig()
  weight_decay: float = 0.0
  state_specs: str | None = None

  @classmethod
  def from_dict(cls, d: Any, where: str) -> GroupConfig:
    if isinstance(d, GroupConfig):
      return d
    d = _plain(d)
    _check_keys(d, cls, where)
    if "schedule" in d:
      d["schedule"] = ScheduleConfig.from_dict(_plain(d["schedule"]),
                                               f"{where}.schedule")
    d["kwargs"] = _plain(d.get("kwargs", {}))
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The whole optimizer: groups, routing and clipping."""
  groups: dict[str, GroupConfig] = dataclasses.field(
      default_factory=lambda: {"adamw": GroupConfig()})
  routes: tuple[tuple[str, str], ...] = (("all", "adamw"),)
  route_mode: str = "strict"
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if not self.groups:
      raise ValueError("optim config: groups is empty")
    if self.route_mode not in routing.MODES:
      raise ValueError(f"optim config: route_mode={self.route_mode!r}; "
                       f"expected one of {routing.MODES}")
    for i, route in enumerate(self.routes):
      if len(route) != 2:
        raise ValueError(f"optim config: routes[{i}]={route!r} is not a "
                         "(pattern, group) pair")
      if route[1] not in self.groups:
        raise ValueError(
            f"optim config: routes[{i}] sends {route[0]!r} to group "
            f"{route[1]!r}, which is not in groups {sorted(self.groups)}")

  @classmethod
  def from_dict(cls, d: Any) -> OptimConfig:
    """From a dict / ConfigDict (or an OptimConfig, returned as is)."""
    if isinstance(d, OptimConfig):
      return d
    d = _plain(d)
    _check_keys(d, cls, "optim")
    if "groups" in d:
      d["groups"] = {
          name: GroupConfig.from_dict(g, f"optim.groups.{name}")
          for name, g in _plain(d["groups"]).items()}
    if "routes" in d:
      routes = []
      for i, r in enumerate(d["routes"]):
        if isinstance(r, dict) or hasattr(r, "to_dict"):
          r = _plain(r)
          _check_keys(r, _Route, f"optim.routes[{i}]")
          r = (r["pattern"], r["group"])
        routes.append(tuple(r))
      d["routes"] = tuple(routes)
    return cls(**d)

  def label(self) -> str:
    """The optimizer of the group the hidden matrices go to (else the first
    route's group): what names this config in tables and plots."""
    return self.groups[self.label_group()].optimizer

  def label_group(self) -> str:
    """The group `label` names (its schedule's peak is the run's LR label)."""
    group = next((g for pattern, g in self.routes
                  if pattern == "hidden_matrix"), None)
    if group is None:
      group = self.routes[0][1] if self.routes else sorted(self.groups)[0]
    return group

  def resolve_total_steps(self, total_steps: int) -> OptimConfig:
    """Schedules with total_steps 0 ("the run's length") get `total_steps`."""
    return dataclasses.replace(self, groups={
        name: dataclasses.replace(g, schedule=g.schedule.resolved(total_steps))
        for name, g in self.groups.items()})

  def to_dict(self) -> dict[str, Any]:
    """Plain nested dict (for an ml_collections.ConfigDict)."""
    return {
        "groups": {n: {"optimizer": g.optimizer, "kwargs": dict(g.kwargs),
                       "schedule": dataclasses.asdict(g.schedule),
                       "weight_decay": g.weight_decay,
                       "state_specs": g.state_specs}
                   for n, g in self.groups.items()},
        "routes": [list(r) for r in self.routes],
        "route_mode": self.route_mode,
        "clip_norm": self.clip_norm,
    }


@dataclasses.dataclass(frozen=True)
class _Route:
  pattern: str
  group: str
