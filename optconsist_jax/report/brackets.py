"""Frontier hygiene: the checkpoints that bracket a learning level L.

The report reads retention at a base's common learning level L off each
(base, method, seed) frontier, linearly between the two frontier points
that bracket L: the nearest evaluated checkpoint with learning <= L and the
nearest with learning >= L (report/consistency.py `retention_at`). Between
them the frontier is only known to be non-increasing (it is a Pareto
frontier of higher-is-better learning and retention), so the retention a
denser grid would find at L lies anywhere between the upper point's
retention and the lower point's: those are the value's bracket bounds
(`bound_at`). The learning distance between the two points says how dense
the grid is there; issue #27 asks for grids whose brackets are at most
`MAX_WIDTH` (0.3 nats of learning when learning is a loss) apart.

A gap or interaction read at L gets the range its formula takes over its
terms' bounds (`difference`, `total`: the min and the max of a difference
or sum of independent terms), per seed; the mean over seeds of a value lies
between the means of its per-seed bounds (`Bracket.of`). A range that
straddles zero means the grid cannot tell the sign at L, whatever the
seeds say. Nothing is extrapolated: a seed whose frontier does not reach L
on both sides (L below its least-learning point, or above its most) has no
bound, and the cell says so.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math

import numpy as np

# Issue #27: brackets at most this far apart in learning (nats for a loss).
MAX_WIDTH = 0.3
# Per seed: (lower bound, upper bound, learning distance of the brackets);
# NaNs when L is outside a term's frontier.
SeedBound = tuple[float, float, float]
_OUTSIDE: SeedBound = (math.nan, math.nan, math.nan)


def indices_around(front_P2: np.ndarray, level: float
                   ) -> tuple[int, int] | None:
  """The indices of the frontier points with the nearest learning <=
  `level` and >= `level` (the same index when one is at L); None when L is
  outside the frontier's learning range."""
  learning = front_P2[:, 0]
  if not learning[0] <= level <= learning[-1]:  # False for NaN
    return None
  below = int(np.searchsorted(learning, level, side="right")) - 1
  above = int(np.searchsorted(learning, level, side="left"))
  return below, above


def points_around(front_P2: np.ndarray, level: float
                  ) -> tuple[np.ndarray, np.ndarray] | None:
  """The frontier points (learning, retention) at `indices_around`; None
  when L is outside the frontier's learning range."""
  around = indices_around(front_P2, level)
  if around is None:
    return None
  return front_P2[around[0]], front_P2[around[1]]


def bound_at(front_P2: np.ndarray, level: float) -> SeedBound:
  """(upper point's retention, lower point's retention, their learning
  distance) around `level` (module docstring); NaNs outside."""
  around = points_around(front_P2, level)
  if around is None:
    return _OUTSIDE
  lower, upper = around
  return (float(min(lower[1], upper[1])), float(max(lower[1], upper[1])),
          float(upper[0] - lower[0]))


def difference(a: SeedBound, b: SeedBound) -> SeedBound:
  """The range of a - b over both bounds, and the wider bracket."""
  return (a[0] - b[1], a[1] - b[0], max(a[2], b[2]))


def total(a: SeedBound, b: SeedBound) -> SeedBound:
  """The range of a + b over both bounds, and the wider bracket."""
  return (a[0] + b[0], a[1] + b[1], max(a[2], b[2]))


@dataclasses.dataclass(frozen=True)
class Bracket:
  """The bracket range of a value read at L, over seeds.

  Attributes:
    lo, hi: the means over seeds of the per-seed bounds: the mean value at
      L lies between them; NaN when a seed has no bound.
    width: the largest learning distance between two bracketing points
      over the seeds (and the value's terms) that have a bound.
    widths: that distance per seed (in `seeds` order; NaN outside).
    dense: width <= MAX_WIDTH on every seed, none outside.
    straddles_zero: lo <= 0 <= hi (the grid cannot tell the sign at L);
      None without a range.
    seeds: the seeds that entered.
    outside: seeds where L is outside a term's frontier (no bound).
  """

  lo: float
  hi: float
  width: float
  widths: tuple[float, ...]
  dense: bool
  straddles_zero: bool | None
  seeds: tuple[int, ...]
  outside: tuple[int, ...]

  @classmethod
  def of(cls, by_seed: Mapping[int, SeedBound]) -> Bracket:
    seeds = tuple(sorted(by_seed))
    outside = tuple(s for s in seeds
                    if not all(math.isfinite(v) for v in by_seed[s]))
    inside = [by_seed[s] for s in seeds if s not in outside]
    width = max((b[2] for b in inside), default=math.nan)
    widths = tuple(float(by_seed[s][2]) for s in seeds)
    if outside or not inside:
      return cls(math.nan, math.nan, width, widths, False, None, seeds,
                 outside)
    lo = float(np.mean([b[0] for b in inside]))
    hi = float(np.mean([b[1] for b in inside]))
    return cls(lo, hi, width, widths, width <= MAX_WIDTH, lo <= 0 <= hi,
               seeds, outside)


EMPTY = Bracket.of({})


# fronts: (base, method) -> seed -> frontier points (learning, retention),
# increasing learning (report/consistency.py `Frontiers`).
def bound_by_seed(fronts: Mapping[tuple[str, str], Mapping[int, np.ndarray]],
                  base: str, method: str, level: float
                  ) -> dict[int, SeedBound]:
  """Per seed, `bound_at` of the method's frontier on `base` at `level`."""
  return {s: bound_at(f, level)
          for s, f in fronts.get((base, method), {}).items()}


def level_gap_bounds(fronts, levels: Mapping[str, float], base: str, a: str,
                     b: str) -> dict[int, SeedBound]:
  """Per seed both ran, the range of a's retention minus b's at the base's
  level L (consistency.level_gap_by_seed's value)."""
  ba = bound_by_seed(fronts, base, a, levels[base])
  bb = bound_by_seed(fronts, base, b, levels[base])
  return {s: difference(ba[s], bb[s]) for s in sorted(set(ba) & set(bb))}


def interaction_bounds(fronts, levels: Mapping[str, float], i: str,
                       j: str) -> Bracket:
  """The range of I_ij at L (consistency.interactions) over the seeds with
  all four runs."""
  gi = level_gap_bounds(fronts, levels, i, i, j)
  gj = level_gap_bounds(fronts, levels, j, j, i)
  return Bracket.of({s: total(gi[s], gj[s])
                     for s in sorted(set(gi) & set(gj))})


def range_text(b: Bracket, signed: bool = False, digits: int = 3) -> str:
  """E.g. "[-5.261, -5.220]"; why not when there is no range."""
  if b.outside:
    return ("L outside the frontier of seed"
            f"{'s' if len(b.outside) > 1 else ''}"
            f" {', '.join(map(str, b.outside))}")
  if not b.seeds:
    return ""
  f = f"{{:{'+' if signed else ''}.{digits}f}}"
  return f"[{f.format(b.lo)}, {f.format(b.hi)}]"


def width_text(b: Bracket) -> str:
  """E.g. "0.214 (<= 0.3: yes)"."""
  if not math.isfinite(b.width):
    return ""
  return (f"{b.width:.3f} (<= {MAX_WIDTH:g}:"
          f" {'yes' if b.dense else 'no'})")


def sign_text(b: Bracket) -> str:
  """Whether a gap's bracket range straddles zero."""
  if b.straddles_zero is None:
    return ""
  return "straddles 0" if b.straddles_zero else "excludes 0"
