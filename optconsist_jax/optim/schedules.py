"""Learning-rate schedules: constant, linear or cosine, with warmup and floor.

All start at 0, rise linearly to `peak` over the warmup, then stay (constant)
or decay to `floor * peak` at `total_steps` (linear, cosine) and stay there.
The cosine form is the one of Biderman et al. 2024, "LoRA Learns Less and
Forgets Less" (arXiv 2405.09673): 10% warmup, decay to 1% of peak.

`total_steps: 0` means "the run's length": a config can say it before the
data is read; `resolved(total_steps)` fills it in (train.py does), and
`make_schedule` refuses a decaying or fraction-warmup schedule without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from optconsist_jax import typed_config

KINDS = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """A learning-rate schedule.

  Attributes:
    kind: one of KINDS.
    peak: the learning rate after warmup.
    warmup_steps: linear warmup length in steps.
    warmup_fraction: warmup as a fraction of total_steps (use one of the two).
    total_steps: step at which linear/cosine decay reaches the floor; 0 =
      the run's length, to be filled in by `resolved`.
    floor: final learning rate as a fraction of peak.
  """

  kind: str = "constant"
  peak: float = 1e-5
  warmup_steps: int = 0
  warmup_fraction: float = 0.0
  total_steps: int = 0
  floor: float = 0.0

  def __post_init__(self):
    where = "optim schedule"
    if self.kind not in KINDS:
      raise ValueError(f"{where}.kind={self.kind!r}; expected one of {KINDS}")
    if self.warmup_steps and self.warmup_fraction:
      raise ValueError(f"{where}: set warmup_steps or warmup_fraction, not "
                       "both")
    if not 0.0 <= self.warmup_fraction <= 1.0:
      raise ValueError(f"{where}.warmup_fraction={self.warmup_fraction} not in"
                       " [0, 1]")
    if not 0.0 <= self.floor <= 1.0:
      raise ValueError(f"{where}.floor={self.floor} not in [0, 1]")
    if self.total_steps < 0 or self.warmup_steps < 0:
      raise ValueError(f"{where}: total_steps={self.total_steps} and "
                       f"warmup_steps={self.warmup_steps} must be >= 0")
    if (self.kind != "constant" and self.total_steps
        and self.warmup() > self.total_steps):
      raise ValueError(f"{where}: warmup {self.warmup()} > total_steps "
                       f"{self.total_steps}")

  def warmup(self) -> int:
    if self.warmup_fraction:
      return int(round(self.warmup_fraction * self.total_steps))
    return int(self.warmup_steps)

  def needs_total_steps(self) -> bool:
    return self.kind != "constant" or bool(self.warmup_fraction)

  def resolved(self, total_steps: int) -> ScheduleConfig:
    """This schedule with total_steps 0 set to `total_steps` (> 0)."""
    if self.total_steps or total_steps <= 0:
      return self
    return dataclasses.replace(self, total_steps=int(total_steps))

  @classmethod
  def from_dict(cls, d: Any, where: str = "schedule") -> ScheduleConfig:
    if isinstance(d, ScheduleConfig):
      return d
    d = dict(d)
    typed_config.check_keys(cls, d, f"optim config {where}")
    return cls(**d)


def make_schedule(c: ScheduleConfig) -> optax.Schedule:
  """The optax schedule (a function of the 0-based step) for a config."""
  if c.needs_total_steps() and not c.total_steps:
    raise ValueError(
        f"optim schedule kind={c.kind!r}, warmup_fraction={c.warmup_fraction}"
        " has total_steps=0 (the run's length) unresolved: call"
        " OptimConfig.resolve_total_steps(n) first")
  warmup = c.warmup()
  if c.kind == "constant":
    if not warmup:
      return optax.constant_schedule(c.peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.peak, warmup),
         optax.constant_schedule(c.peak)], [warmup])
  if c.kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.peak, warmup_steps=warmup,
        decay_steps=c.total_steps, end_value=c.floor * c.peak)
  decay = optax.linear_schedule(c.peak, c.floor * c.peak,
                                max(c.total_steps - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, c.peak, warmup), decay], [warmup])
