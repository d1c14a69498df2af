"""Learning-rate refinement near each base's common learning level L (#27).

The report reads every value at L between the two frontier checkpoints of a
(base, method, seed) that bracket L (report/brackets.py); issue #27 asks
that they be at most `brackets.MAX_WIDTH` apart in learning. A fixed grid
x2 apart can leave wider brackets where learning moves fast with the
learning rate. `plan` looks at the evaluated records and, for each
(base, method) whose bracket on some seed is wider than the bar and whose
two bracketing checkpoints come from two learning rates lr_a < lr_b
adjacent on that method's grid on that base, adds their geometric midpoint
sqrt(lr_a * lr_b) (the grids are geometric) for every seed. `refine_grid`
(from reproduce.run, `finetune.refine_rounds` rounds) trains and evaluates
those runs, recomputes L and the brackets, and plans again.

Nothing is extrapolated: a bracket whose two checkpoints share a learning
rate (two epochs of one run), whose learning rates have another grid rate
between them (that rate's checkpoints are off the frontier there), or a
seed whose frontier does not reach L (L outside the grid's range: the grid
needs a wider end, which the report already flags) gets no midpoint; `plan`
lists them with why.

`plan` is a pure function of the records and the grids, and the rounds
(`refine_grid`) feed it the records of the runs planned so far only, so a
rerun after an interruption plans the same learning rates (each stage skips
what is done).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import math
from typing import Any

import numpy as np

from optconsist_jax.evaluate import results
from optconsist_jax.experiments import study
from optconsist_jax.report import brackets
from optconsist_jax.report import consistency

# A record's learning rate is the grid's when they agree to this relative
# tolerance (both come from the same float through JSON; this only guards
# against a printed-and-parsed one).
_LR_RTOL = 1e-9

# (base, method) -> that method's learning rates on that base.
Grids = Mapping[tuple[str, str], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class WideBracket:
  """A seed's bracket at L wider than the bar that gets no midpoint.

  Attributes:
    base, method, seed: whose frontier.
    width: the learning distance of the two bracketing checkpoints (NaN
      when L is outside the frontier).
    lrs: the learning rates of the lower and the upper checkpoint (() when
      outside).
    why: "one learning rate", "not adjacent on the grid", "off the grid" or
      "L outside the frontier".
  """

  base: str
  method: str
  seed: int
  width: float
  lrs: tuple[float, ...]
  why: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """One round of refinement: where L is, how wide, what to add.

  Attributes:
    levels: base -> its common learning level L (consistency.base_levels).
    widths: (base, method) -> the widest bracket at L over its seeds (the
      report's `brackets.Bracket.width`; NaN when L is outside every seed).
    added: (base, method) -> the learning rates to add (increasing); only
      the (base, method)s that get any.
    wide: the seeds' brackets wider than the bar that get no midpoint.
  """

  levels: dict[str, float]
  widths: dict[tuple[str, str], float]
  added: dict[tuple[str, str], tuple[float, ...]]
  wide: tuple[WideBracket, ...]


def _grid_index(grid: Sequence[float], lr: float) -> int | None:
  for i, g in enumerate(grid):
    if math.isclose(g, lr, rel_tol=_LR_RTOL):
      return i
  return None


def _frontiers_with_lrs(records: Sequence[results.EvalRecord]
                        ) -> dict[tuple[str, str, int],
                                  tuple[np.ndarray, list[float]]]:
  """(base, method, seed) -> (frontier points, each point's learning rate):
  consistency.seed_frontiers's frontiers, from its run sets."""
  points_N2 = np.array([(r.learning, r.retention) for r in records],
                       np.float64).reshape(-1, 2)
  out = {}
  for (base, method), by_seed in consistency.run_sets(records).items():
    for seed, idx in by_seed.items():
      front = idx[results.pareto_frontier(points_N2[idx])]
      out[(base, method, seed)] = (points_N2[front],
                                   [records[i].lr for i in front])
  return out


def _canonical(records: Iterable[results.EvalRecord]
               ) -> list[results.EvalRecord]:
  """The records in one order whatever order they came in (ties between
  equal frontier points then resolve the same way)."""
  return sorted(records, key=lambda r: (
      r.is_base, r.base, r.method, r.seed, r.lr, r.epoch, r.step, r.run,
      r.checkpoint, r.learning, r.retention))


def plan(records: Sequence[results.EvalRecord], grids: Grids,
         max_width: float = brackets.MAX_WIDTH) -> Plan:
  """The learning rates one round of refinement adds (module docstring).

  Args:
    records: every evaluated checkpoint of the runs so far (base points are
      ignored), in any order.
    grids: (base, method) -> that method's learning rates on that base
      (`grids_of`); adjacency is read on it.
    max_width: the widest bracket accepted (learning units).

  Returns:
    The `Plan`: L per base, the bracket widths, the added learning rates.
  """
  records = _canonical(records)
  fronts = consistency.seed_frontiers(records)
  if not fronts:
    return Plan({}, {}, {}, ())
  levels = consistency.base_levels(fronts)
  widths = {(b, m): brackets.Bracket.of(
      brackets.bound_by_seed(fronts, b, m, levels[b])).width
            for b, m in fronts}
  added: dict[tuple[str, str], set[float]] = {}
  wide = []
  for (base, method, seed), (front_P2, lrs) in sorted(
      _frontiers_with_lrs(records).items()):
    around = brackets.indices_around(front_P2, levels[base])
    if around is None:
      wide.append(WideBracket(base, method, seed, math.nan, (),
                              "L outside the frontier"))
      continue
    lo, hi = around
    width = float(front_P2[hi, 0] - front_P2[lo, 0])
    if not width > max_width:
      continue
    pair = (float(lrs[lo]), float(lrs[hi]))
    grid = sorted(float(x) for x in grids.get((base, method), ()))
    ia, ib = sorted((_grid_index(grid, pair[0]), _grid_index(grid, pair[1])),
                    key=lambda i: -1 if i is None else i)
    why = ("off the grid" if ia is None else
           "one learning rate" if ia == ib else
           "not adjacent on the grid" if ib != ia + 1 else "")
    if why:
      wide.append(WideBracket(base, method, seed, width, pair, why))
      continue
    added.setdefault((base, method), set()).add(
        math.sqrt(grid[ia] * grid[ib]))
  return Plan(levels, widths,
              {k: tuple(sorted(v)) for k, v in sorted(added.items())},
              tuple(wide))


def grids_of(labels: Iterable[Mapping[str, Any]]
             ) -> dict[tuple[str, str], list[float]]:
  """(base, method) -> its learning rates, increasing, from the runs'
  labels (study.Run.labels)."""
  out: dict[tuple[str, str], set[float]] = {}
  for lab in labels:
    out.setdefault((lab["base"], lab["method"]), set()).add(float(lab["lr"]))
  return {k: sorted(v) for k, v in sorted(out.items())}


def _finite(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def round_entries(round_: int, before: Plan, after: Plan
                  ) -> list[dict[str, Any]]:
  """run_info.json's record of one round: per (base, method) refined, the
  learning rates added, the bracket width and L before and after it."""
  return [{"round": round_, "base": b, "method": m, "lrs": list(lrs),
           "width_before": _finite(before.widths.get((b, m), math.nan)),
           "width_after": _finite(after.widths.get((b, m), math.nan)),
           "level_before": _finite(before.levels.get(b, math.nan)),
           "level_after": _finite(after.levels.get(b, math.nan))}
          for (b, m), lrs in before.added.items()]


def wide_entries(final: Plan) -> list[dict[str, Any]]:
  """The brackets still wider than the bar that refinement cannot split."""
  return [{"base": w.base, "method": w.method, "seed": w.seed,
           "width": _finite(w.width), "lrs": list(w.lrs), "why": w.why}
          for w in final.wide]


def note(rounds: int, max_width: float,
         added: Sequence[Mapping[str, Any]],
         wide: Sequence[Mapping[str, Any]],
         pending: Mapping[tuple[str, str], Sequence[float]]) -> str:
  """The report's sentence on what refinement did (`round_entries`,
  `wide_entries`; `pending`: what another round would add)."""
  head = (f"Learning-rate grid refined near L (finetune.refine_rounds="
          f"{rounds}): each bracket wider than {max_width:g} between two"
          " adjacent learning rates got their geometric midpoint on every"
          " seed (run_info.json \"refinement\").")
  if not added:
    head += " No bracket needed one; the grid is as configured."
  for e in added:
    before, after = e["width_before"], e["width_after"]
    head += (f" Round {e['round']}: {e['base']} base, {e['method']} +"
             f" {', '.join(f'{x:.3g}' for x in e['lrs'])} (width"
             f" {'n/a' if before is None else f'{before:.3f}'} ->"
             f" {'n/a' if after is None else f'{after:.3f}'}).")
  if pending:
    head += (f" After the last round, {len(pending)} (base, method)"
             f"{'s' if len(pending) > 1 else ''} still had a bracket wider"
             f" than {max_width:g} that another round would split: "
             + ", ".join(f"{b} base, {m}" for b, m in pending) + ".")
  if wide:
    whys: dict[str, int] = {}
    for w in wide:
      whys[w["why"]] = whys.get(w["why"], 0) + 1
    head += (f" Still wider than {max_width:g} or outside, without a"
             " midpoint to add: " + ", ".join(
                 f"{n} seed bracket{'s' if n > 1 else ''} ({why})"
                 for why, n in sorted(whys.items())) + ".")
  return head


# ---------------------------------------------------------------------------
# The rounds (reproduce.run calls them after the grid's stages).


def _records(runs: Sequence[study.Run]) -> list[results.EvalRecord]:
  out = []
  for r in runs:
    out += results.read_workdir(r.workdir)
  return out


def _plan_of(runs: Sequence[study.Run], max_width: float) -> Plan:
  return plan(_records(runs), grids_of(r.labels for r in runs), max_width)


def refine_grid(rc: study.ReproConfig, workdir: str, train_file: str,
                runs: Sequence[study.Run],
                train_and_evaluate: Callable[[list, list, str], None]
                ) -> tuple[list[study.Run], dict[str, Any]]:
  """Up to `finetune.refine_rounds` rounds of refinement of the evaluated
  `runs`.

  Each round plans from the records of the runs planned so far only (so a
  rerun plans the same learning rates), then trains and evaluates the
  added runs with `train_and_evaluate(groups, runs, stage_prefix)`, the
  grid's own stages (each skips what is done).

  Returns:
    Every run, and run_info.json's "refinement": per round and (base,
    method) the learning rates added with the bracket width and L before
    and after ("added"), the wide brackets no midpoint can split
    ("unsplit"), what another round would add ("pending") and the report's
    sentence ("note").
  """
  f = rc.finetune
  extra: dict[tuple[str, str], list[float]] = {}
  runs = list(runs)
  entries = []
  current = _plan_of(runs, f.refine_max_width)
  for k in range(1, f.refine_rounds + 1):
    if not current.added:
      break
    for key, lrs in current.added.items():
      extra.setdefault(key, []).extend(lrs)
    names = {r.name for r in runs}
    _, runs = study.plan_runs(rc, workdir, train_file, extra_lrs=extra)
    new = [r for r in runs if r.name not in names]
    print(f"refinement round {k}: " + "; ".join(
        f"{b}-base {m} + {', '.join(f'{x:.3g}' for x in lrs)}"
        for (b, m), lrs in current.added.items()), flush=True)
    train_and_evaluate(study.population_groups(rc, [], new), new,
                       f"refine{k}/")
    after = _plan_of(runs, f.refine_max_width)
    entries += round_entries(k, current, after)
    current = after
  wide = wide_entries(current)
  return runs, {
      "rounds": f.refine_rounds, "max_width": f.refine_max_width,
      "added": entries, "unsplit": wide,
      "pending": [{"base": b, "method": m, "lrs": list(v)}
                  for (b, m), v in current.added.items()],
      "note": note(f.refine_rounds, f.refine_max_width, entries, wide,
                   current.added)}
