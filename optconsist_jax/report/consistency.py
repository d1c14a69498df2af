"""Does matched finetuning forget less at equal learning? Numbers with intervals.

Each (base, method, seed) run set - every LR and epoch checkpoint of that
method on that base with that seed - traces a learning/retention Pareto
frontier (`results.pareto_frontier`, both higher-is-better). Retention at a
learning level L is read off that frontier, piecewise linear in learning
between frontier points (non-increasing in L, as the frontier is); below the
frontier's least-learning point it is that point's retention (a checkpoint
that learned at least L), above its most-learning point it is undefined.

The common learning level of a base is the highest level every method's
frontier reaches on every seed: min over (method, seed) of the frontier's
largest learning. All methods of a base, in the summary and in the matrix,
are compared at that one level, so no number is extrapolated. The gap of a
method at L is matched's retention minus its retention at that level, per
seed (paired by seed), with its interval over seeds (`report.statistics`,
whose docstring states the method and the sign convention).

The primary comparison reads the whole common range instead of one level:
the area between two frontiers (`area_between`), the mean retention
difference per unit of learning over the learning range both frontiers
cover, per seed, then its interval over seeds. The level-L gap stays as a
secondary reading. Per-base gaps mix consistency with "this method is
better on every base"; the consistency interaction of two optimizers i, j
with both bases (`interactions`),

  I_ij = [R(i-base, i-ft) - R(i-base, j-ft)] + [R(j-base, j-ft) - R(j-base, i-ft)],

cancels such a column effect (it is the interaction contrast of the 2 x 2
base x method table). Each table's verdicts are Holm-corrected over its
family of comparisons (`statistics.holm`).

The unit of every interval is the seed: finetuning seed s starts from
pretraining seed s when a study has as many of each (experiments/study.py),
so a per-seed value varies with both. When the rows keep per-item eval
scores, every frontier and estimand is recomputed on resamples of the eval
items (report/resample.py) and the gaps, areas and interactions get the
hierarchical interval (`tested`, `statistics.hierarchical_ci`); the tables
say which sources their intervals cover (`resample.covers_note`). Every
value read at L also carries the range the two frontier checkpoints that
bracket L allow and their learning distance (report/brackets.py). The
markdown and JSON of the tables: report/consistency_markdown.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import itertools
import math

import numpy as np


from optconsist_jax.evaluate import results
from optconsist_jax.report import brackets
from optconsist_jax.report import resample
from optconsist_jax.report import statistics as stats

# front_P2: frontier points (learning, retention), increasing learning.
Frontiers = dict[tuple[str, str], dict[int, np.ndarray]]


def run_sets(records: Sequence[results.EvalRecord]
              ) -> dict[tuple[str, str], dict[int, np.ndarray]]:
  """(base, method) -> seed -> the indices of that run set's rows."""
  idx: dict[tuple[str, str], dict[int, list[int]]] = {}
  for n, r in enumerate(records):
    if not r.is_base:
      idx.setdefault((r.base, r.method), {}).setdefault(r.seed, []).append(n)
  return {k: {s: np.asarray(v[s], np.int64) for s in sorted(v)}
          for k, v in sorted(idx.items())}


def _frontiers(sets, points_N2: np.ndarray) -> Frontiers:
  out: Frontiers = {}
  for key, by_seed in sets.items():
    out[key] = {}
    for seed, idx in by_seed.items():
      pts_P2 = points_N2[idx]
      out[key][seed] = pts_P2[results.pareto_frontier(pts_P2)]
  return out


def seed_frontiers(records: Sequence[results.EvalRecord]) -> Frontiers:
  """(base, method) -> seed -> the frontier of that seed's checkpoints."""
  return _frontiers(run_sets(records), np.array(
      [(r.learning, r.retention) for r in records], np.float64).reshape(-1, 2))


def item_frontiers(records: Sequence[results.EvalRecord],
                   items: str | resample.ItemResamples = "auto"
                   ) -> tuple[list[Frontiers] | None,
                              resample.ItemResamples | None]:
  """`seed_frontiers` on each resample of the eval items, and the resamples.

  items: "auto" (resample when the rows have per-item scores), "off"
  (never), or the resamples (`resample.item_resamples` of these same
  `records`; their frontiers are computed once and cached in them).
  (None, ...) when nothing is resampled.
  """
  if isinstance(items, str):
    if items not in ("auto", "off"):
      raise ValueError(f"report: items={items!r}; expected 'auto', 'off' or"
                       " resample.ItemResamples")
    items = (resample.item_resamples(records)
             if items == "auto" and records else None)
  if items is None or not items.items:
    return None, items
  if "frontiers" not in items.cache:  # once for the summary, interactions
    sets = run_sets(records)         # and matrix of one report
    items.cache["frontiers"] = [_frontiers(sets, p_N2)
                                for p_N2 in items.points_BN2]
  return items.cache["frontiers"], items


def retention_at(front_P2: np.ndarray, level: float) -> float:
  """Retention on a frontier at learning `level` (module docstring); NaN above."""
  learning, retention = front_P2[:, 0], front_P2[:, 1]
  if level > learning[-1]:
    return math.nan
  return float(np.interp(level, learning, retention))


def area_between(front_a_P2: np.ndarray, front_b_P2: np.ndarray) -> float:
  """Mean of R_a(l) - R_b(l) over the learning range both frontiers cover.

  The integral of the difference of the two piecewise-linear frontiers
  (`retention_at`) over [l_lo, l_hi], the intersection of their learning
  ranges [least, most learning of the frontier's points], divided by
  l_hi - l_lo: retention difference per unit of learning. Exact (trapezoids
  between the union of both frontiers' points). NaN when the ranges overlap
  in less than an interval: nothing is extrapolated.
  """
  lo = max(front_a_P2[0, 0], front_b_P2[0, 0])
  hi = min(front_a_P2[-1, 0], front_b_P2[-1, 0])
  if not hi > lo:
    return math.nan
  grid_G = np.unique(np.concatenate([[lo, hi], front_a_P2[:, 0],
                                     front_b_P2[:, 0]]))
  grid_G = grid_G[(grid_G >= lo) & (grid_G <= hi)]
  diff_G = (np.interp(grid_G, front_a_P2[:, 0], front_a_P2[:, 1])
            - np.interp(grid_G, front_b_P2[:, 0], front_b_P2[:, 1]))
  area = np.sum((diff_G[1:] + diff_G[:-1]) / 2 * np.diff(grid_G))
  return float(area / (hi - lo))


def common_level(fronts: Sequence[np.ndarray]) -> float:
  """The highest learning level every frontier reaches."""
  if not fronts:
    raise ValueError("common_level: no frontiers")
  return float(min(f[-1, 0] for f in fronts))


def base_levels(fronts: Frontiers) -> dict[str, float]:
  """Per base, the common learning level of all its (method, seed) frontiers."""
  bases = sorted({b for b, _ in fronts})
  return {b: common_level([f for (bb, _), by_seed in fronts.items() if bb == b
                           for f in by_seed.values()]) for b in bases}


# A method's base-state variant (experiments/finetune_methods.py) -> its words.
_VARIANT_WORDS = {"carried": "carried state", "frozen_nu": "frozen nu"}


def role_of(method: str, base: str) -> str:
  """lora, matched or mismatched; a base-state variant `FAMILY+VARIANT`
  (e.g. adamw+carried) is "matched, carried state" (compared, like every
  method, with the fresh matched method of its base)."""
  if method.lower() == "lora":
    return "lora"
  family, _, variant = method.partition("+")
  role = "matched" if family == base else "mismatched"
  return f"{role}, {_VARIANT_WORDS.get(variant, variant)}" if variant else role


@dataclasses.dataclass(frozen=True)
class MethodSummary:
  """One finetuning method on one base (a row of the consistency table).

  Intervals are over seeds (`statistics.Interval`, mean with 95% interval).

  Attributes:
    base: the base model's pretraining optimizer.
    method: finetuning method.
    role: "matched" (same optimizer as pretraining), "mismatched" or "lora".
    seeds: the seeds this method ran with.
    points: evaluated checkpoints (all LRs, epochs and seeds).
    best_learning: per seed the highest learning over LRs and epochs.
    retention_at_best: retention of that checkpoint.
    level: the base's common learning level.
    retention_at_level: retention on this method's frontier at `level`.
    gap_vs_matched: matched's retention at `level` minus this method's,
      paired by seed (> 0: matched forgot less); empty for matched itself
      and when the base has no matched run. The secondary reading.
    verdict: `statistics.verdict` of `gap_area` with its Holm-adjusted p;
      "" for matched.
    gap_area: matched minus this method by area (`area_between` of their
      frontiers per seed, paired by seed): the primary comparison.
    p_value: two-sided t test of `gap_area`'s per-seed values (NaN: none).
    p_holm: `p_value` Holm-adjusted over the table's comparisons.
    family: how many comparisons that Holm family has.
    retention_bracket: the range of `retention_at_level` that the
      checkpoints bracketing L allow (`brackets.Bracket`).
    gap_bracket: the same for `gap_vs_matched` (empty for matched).
  """

  base: str
  method: str
  role: str
  seeds: tuple[int, ...]
  points: int
  best_learning: stats.Interval
  retention_at_best: stats.Interval
  level: float
  retention_at_level: stats.Interval
  gap_vs_matched: stats.Interval
  verdict: str
  gap_area: stats.Interval = stats.EMPTY
  p_value: float = math.nan
  p_holm: float = math.nan
  family: int = 0
  retention_bracket: brackets.Bracket = brackets.EMPTY
  gap_bracket: brackets.Bracket = brackets.EMPTY


def retention_by_seed(fronts: Frontiers, base: str, method: str,
                      level: float) -> dict[int, float]:
  return {s: retention_at(f, level)
          for s, f in fronts.get((base, method), {}).items()}


def area_gap_by_seed(fronts: Frontiers, base: str, a: str,
                     b: str) -> dict[int, float]:
  """Per seed both ran, `area_between` a's and b's frontiers on `base`
  (seeds whose frontiers share no learning range left out)."""
  fa, fb = fronts.get((base, a), {}), fronts.get((base, b), {})
  areas = {s: area_between(fa[s], fb[s]) for s in sorted(set(fa) & set(fb))}
  return {s: v for s, v in areas.items() if math.isfinite(v)}


def seed_units(records: Sequence[results.EvalRecord]) -> dict[int, tuple]:
  """Finetuning seed -> its unit of replication.

  With several base checkpoints per pretraining optimizer, the unit is the
  set of base checkpoints the seed's runs started from (`EvalRecord.
  base_id`): finetuning seeds that share one are averaged into one unit
  before an interval (`tested`), so n counts pretraining seeds. With one
  checkpoint per optimizer, or rows that do not say, each finetuning seed
  is its own unit (the intervals then leave the pretraining seed out, and
  `resample.covers_note` says so).
  """
  found: dict[int, set] = {}
  per_base: dict[str, set] = {}
  for r in records:
    if not r.is_base:
      ckpt = r.base_id.get("checkpoint") if r.base_id else None
      found.setdefault(r.seed, set()).add((r.base, ckpt) if ckpt else None)
      per_base.setdefault(r.base, set()).add(ckpt)
  nested = (all(None not in u for u in found.values())
            and all(len(c) >= 2 for c in per_base.values()))
  return {s: tuple(sorted(u)) if nested else (("seed", s),)
          for s, u in found.items()}


def _by_unit(by_seed: Mapping[int, float], seeds: Sequence[int],
             units: Mapping[int, tuple] | None) -> list[float]:
  groups: dict[tuple, list[float]] = {}
  for s in seeds:
    key = units.get(s, (("seed", s),)) if units else (("seed", s),)
    groups.setdefault(key, []).append(by_seed[s])
  return [float(np.mean(v)) for _, v in sorted(groups.items())]


def tested(by_seed: Mapping[int, float],
           replicates: Sequence[Mapping[int, float]] | None = None,
           units: Mapping[int, tuple] | None = None,
           **ci) -> tuple[stats.Interval, float]:
  """(interval, p) of per-seed values over their units; (EMPTY, NaN) if none.

  `units` (`seed_units`): seeds of one unit are averaged first, so the
  interval's n counts pretraining seeds. With `replicates` (the same
  per-seed values on each resample of the eval items) and the t method,
  `statistics.hierarchical_ci`: units and items; otherwise the units alone
  (`mean_ci`, `t_test_p`).
  """
  seeds = sorted(by_seed)
  if not seeds:
    return stats.EMPTY, math.nan
  values = _by_unit(by_seed, seeds, units)
  if replicates is not None and ci.get("method", "t") == "t":
    means = [float(np.mean(_by_unit(r, seeds, units))) for r in replicates
             if all(math.isfinite(r.get(s, math.nan)) for s in seeds)]
    if len(means) >= resample.MIN_REPLICATES:
      return stats.hierarchical_ci(values, means,
                                   level=ci.get("level", stats.LEVEL))
  return stats.mean_ci(values, **ci), stats.t_test_p(values)


def over(reps: Sequence[Frontiers] | None, fn) -> list | None:
  """fn(frontiers, their base levels) on each item resample (None: none)."""
  if reps is None:
    return None
  return [fn(f, base_levels(f)) for f in reps]


def level_gap_by_seed(fronts: Frontiers, levels: Mapping[str, float],
                      base: str, a: str, b: str) -> dict[int, float]:
  """Per seed both ran, a's retention minus b's at the base's level L."""
  ra = retention_by_seed(fronts, base, a, levels[base])
  rb = retention_by_seed(fronts, base, b, levels[base])
  return {s: ra[s] - rb[s] for s in sorted(set(ra) & set(rb))}


def holm_by_key(p_by_key: Mapping) -> tuple[dict, int]:
  """Holm-adjusted p per key (`statistics.holm`) and the family size."""
  keys = list(p_by_key)
  adjusted = stats.holm([p_by_key[k] for k in keys])
  return dict(zip(keys, adjusted)), stats.family_size(list(p_by_key.values()))


def consistency_summary(records: Sequence[results.EvalRecord], *,
                        items: str | resample.ItemResamples = "auto",
                        **ci) -> list[MethodSummary]:
  """Matched vs mismatched vs LoRA, by area and at the common level, per base.

  Verdicts come from the area gaps, Holm-corrected over every gap of the
  table. The gaps' intervals cover the eval items too when the rows have
  per-item scores (`items`, `item_frontiers`; `tested`). Keyword args go to
  `statistics.mean_ci` (the interval method, level).
  """
  fronts = seed_frontiers(records)
  reps, _ = item_frontiers(records, items)
  units = seed_units(records)
  levels = base_levels(fronts)
  area, p = {}, {}
  for base, method in fronts:
    if method != base and (base, base) in fronts:
      area[(base, method)], p[(base, method)] = tested(
          area_gap_by_seed(fronts, base, base, method),
          over(reps, lambda f, _, b=base, m=method:
               area_gap_by_seed(f, b, b, m)), units, **ci)
  p_holm, family = holm_by_key(p)
  out = []
  for (base, method), by_seed in fronts.items():
    level = levels[base]
    pts = [r for r in records
           if not r.is_base and r.base == base and r.method == method]
    best = {}
    for r in pts:
      if r.seed not in best or (r.learning, r.retention) > best[r.seed]:
        best[r.seed] = (r.learning, r.retention)
    seeds = sorted(by_seed)
    mine = retention_by_seed(fronts, base, method, level)
    gap, words, gap_bracket = stats.EMPTY, "", brackets.EMPTY
    if method != base and (base, base) not in fronts:
      words = "no matched run to compare"
    elif method != base:
      gap = tested(level_gap_by_seed(fronts, levels, base, base, method),
                   over(reps, lambda f, lv, b=base, m=method:
                        level_gap_by_seed(f, lv, b, b, m)), units, **ci)[0]
      gap_bracket = brackets.Bracket.of(
          brackets.level_gap_bounds(fronts, levels, base, base, method))
      words = (stats.verdict(area[(base, method)],
                             p_adjusted=p_holm[(base, method)])
               if area[(base, method)].n else
               "no seed in common with matched" if not gap.n else
               "no learning range in common with matched")
    out.append(MethodSummary(
        base=base, method=method, role=role_of(method, base),
        seeds=tuple(seeds), points=len(pts),
        best_learning=stats.mean_ci([best[s][0] for s in seeds], **ci),
        retention_at_best=stats.mean_ci([best[s][1] for s in seeds],
                                             **ci),
        level=level,
        retention_at_level=stats.mean_ci([mine[s] for s in seeds],
                                              **ci),
        gap_vs_matched=gap, verdict=words,
        gap_area=area.get((base, method), stats.EMPTY),
        p_value=p.get((base, method), math.nan),
        p_holm=p_holm.get((base, method), math.nan),
        family=family if (base, method) in p else 0,
        retention_bracket=brackets.Bracket.of(
            brackets.bound_by_seed(fronts, base, method, level)),
        gap_bracket=gap_bracket))
  return out


@dataclasses.dataclass(frozen=True)
class Interaction:
  """The consistency interaction of two optimizers that both have a base.

  I_ij = [R(i-base, i-ft) - R(i-base, j-ft)] + [R(j-base, j-ft)
  - R(j-base, i-ft)] (module docstring), per seed that has all four runs,
  with its interval over those seeds; > 0: matched finetuning forgets less
  beyond what either method does on every base.

  Attributes:
    i, j: the two optimizers (i < j).
    seeds: the seeds of the by-area interval.
    by_area: each bracket the area gap (`area_between`) of that seed: the
      primary comparison.
    at_level: each bracket the retention gap at its base's common level L.
    levels: (L of the i base, L of the j base).
    p_value: two-sided t test of `by_area`'s per-seed values.
    p_holm: `p_value` Holm-adjusted over the table's pairs.
    family: how many pairs that Holm family has.
    verdict: `statistics.verdict` of `by_area` with `p_holm`, or why none.
    at_level_bracket: the range of `at_level` that the checkpoints
      bracketing each L allow (`brackets.Bracket`).
  """

  i: str
  j: str
  seeds: tuple[int, ...]
  by_area: stats.Interval
  at_level: stats.Interval
  levels: tuple[float, float]
  p_value: float
  p_holm: float
  family: int
  verdict: str
  at_level_bracket: brackets.Bracket = brackets.EMPTY


def interaction_by_seed(fronts: Frontiers, levels: Mapping[str, float],
                        i: str, j: str) -> tuple[dict[int, float],
                                                 dict[int, float]]:
  """I_ij per seed with all four runs: (by area, at each base's level L)."""
  area_i = area_gap_by_seed(fronts, i, i, j)
  area_j = area_gap_by_seed(fronts, j, j, i)
  at_i = level_gap_by_seed(fronts, levels, i, i, j)
  at_j = level_gap_by_seed(fronts, levels, j, j, i)
  return ({s: area_i[s] + area_j[s] for s in sorted(set(area_i) & set(area_j))},
          {s: at_i[s] + at_j[s] for s in sorted(set(at_i) & set(at_j))})


def interactions(records: Sequence[results.EvalRecord], *,
                 items: str | resample.ItemResamples = "auto",
                 **ci) -> list[Interaction]:
  """I_ij for every pair of optimizers with both bases, Holm over the pairs.

  Intervals over seeds and, with per-item scores, eval items (`tested`).
  Keyword args go to `statistics.mean_ci`.
  """
  fronts = seed_frontiers(records)
  reps, _ = item_frontiers(records, items)
  units = seed_units(records)
  levels = base_levels(fronts)
  parts = {}
  for i, j in itertools.combinations(sorted(levels), 2):
    missing = [f"{m} on the {b} base" for b, m in ((i, i), (i, j), (j, j),
                                                   (j, i))
               if (b, m) not in fronts]
    if missing:
      parts[(i, j)] = ({}, {}, None, "no run of " + ", ".join(missing))
      continue
    by_area, at_level = interaction_by_seed(fronts, levels, i, j)
    rep = over(reps, lambda f, lv, i=i, j=j: interaction_by_seed(f, lv, i, j))
    parts[(i, j)] = (by_area, at_level, rep,
                     "" if by_area else "no seed with all four runs")
  tests = {k: tested(v[0], v[2] and [r[0] for r in v[2]], units, **ci)
           for k, v in parts.items()}
  p_holm, family = holm_by_key({k: t[1] for k, t in tests.items()})
  out = []
  for (i, j), (by_area, at_level, rep, why) in parts.items():
    area, p = tests[(i, j)]
    out.append(Interaction(
        i=i, j=j, seeds=tuple(sorted(by_area)), by_area=area,
        at_level=tested(at_level, rep and [r[1] for r in rep], units,
                        **ci)[0],
        levels=(levels[i], levels[j]),
        p_value=p, p_holm=p_holm[(i, j)],
        family=family if math.isfinite(p) else 0,
        verdict=why or stats.verdict(area, p_adjusted=p_holm[(i, j)]),
        at_level_bracket=(brackets.interaction_bounds(fronts, levels, i, j)
                          if at_level else brackets.EMPTY)))
  return out



def summary_level(summary: Sequence[MethodSummary], base: str) -> float:
  return next(s.level for s in summary if s.base == base)


def mean_frontier(by_seed: Mapping[int, np.ndarray], levels_L: np.ndarray,
                  **ci) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean, lo, hi over seeds of retention at each learning level (NaN above
  the level every seed reaches)."""
  mean, lo, hi = (np.full(len(levels_L), np.nan) for _ in range(3))
  for i, level in enumerate(levels_L):
    vals = [retention_at(f, level) for f in by_seed.values()]
    if all(math.isfinite(v) for v in vals):
      iv = stats.mean_ci(vals, **ci)
      mean[i], lo[i], hi[i] = iv.mean, iv.lo, iv.hi
  return mean, lo, hi
