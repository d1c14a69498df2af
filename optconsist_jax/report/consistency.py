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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import itertools
import math

import numpy as np


from optconsist_jax.evaluate import results
from optconsist_jax.report import statistics as stats

# front_P2: frontier points (learning, retention), increasing learning.
Frontiers = dict[tuple[str, str], dict[int, np.ndarray]]


def seed_frontiers(records: Sequence[results.EvalRecord]) -> Frontiers:
  """(base, method) -> seed -> the frontier of that seed's checkpoints."""
  points: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = {}
  for r in records:
    if not r.is_base:
      points.setdefault((r.base, r.method), {}).setdefault(r.seed, []).append(
          (r.learning, r.retention))
  out: Frontiers = {}
  for key, by_seed in sorted(points.items()):
    out[key] = {}
    for seed, pts in sorted(by_seed.items()):
      front = results.pareto_frontier(pts)
      out[key][seed] = np.array([pts[i] for i in front], np.float64)
  return out


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


def role_of(method: str, base: str) -> str:
  if method.lower() == "lora":
    return "lora"
  return "matched" if method == base else "mismatched"


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


def tested(by_seed: Mapping[int, float], **ci) -> tuple[stats.Interval, float]:
  """(interval over seeds, t-test p) of per-seed values; (EMPTY, NaN) if none."""
  values = [by_seed[s] for s in sorted(by_seed)]
  if not values:
    return stats.EMPTY, math.nan
  return stats.mean_ci(values, **ci), stats.t_test_p(values)


def holm_by_key(p_by_key: Mapping) -> tuple[dict, int]:
  """Holm-adjusted p per key (`statistics.holm`) and the family size."""
  keys = list(p_by_key)
  adjusted = stats.holm([p_by_key[k] for k in keys])
  return dict(zip(keys, adjusted)), stats.family_size(list(p_by_key.values()))


def consistency_summary(records: Sequence[results.EvalRecord],
                        **ci) -> list[MethodSummary]:
  """Matched vs mismatched vs LoRA, by area and at the common level, per base.

  Verdicts come from the area gaps, Holm-corrected over every gap of the
  table. Keyword args go to `statistics.mean_ci` (the interval method, level).
  """
  fronts = seed_frontiers(records)
  levels = base_levels(fronts)
  area, p = {}, {}
  for base, method in fronts:
    if method != base and (base, base) in fronts:
      area[(base, method)], p[(base, method)] = tested(
          area_gap_by_seed(fronts, base, base, method), **ci)
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
    gap, words = stats.EMPTY, ""
    if method != base and (base, base) not in fronts:
      words = "no matched run to compare"
    elif method != base:
      gap = stats.paired_gap_ci(
          retention_by_seed(fronts, base, base, level), mine, **ci)
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
        family=family if (base, method) in p else 0))
  return out


def holm_note(family: int, level: float = stats.LEVEL) -> str:
  """The line under a table that says how its verdicts were corrected."""
  return (f"Multiplicity: Holm's step-down correction (Holm 1979) over the"
          f" {family} comparison{'s' if family != 1 else ''} of this table;"
          " p = two-sided one-sample t test of the per-seed differences,"
          " verdicts from the Holm-adjusted p (< "
          f"{1 - level:.2g}); intervals are the unadjusted {level:.0%} ones.")


def variance_note(records: Sequence[results.EvalRecord]) -> str:
  """The line under a table that says what its intervals cover."""
  seeds = sorted({r.seed for r in records if not r.is_base})
  bases: dict[str, set[str]] = {}
  for r in records:
    if r.is_base:
      bases.setdefault(r.base, set()).add(r.checkpoint or r.run)
  counts = ", ".join(f"{b}: {len(c)}" for b, c in sorted(bases.items()))
  pretraining = (
      "pretraining variance is not covered (one base checkpoint per"
      " pretraining optimizer in these results)"
      if bases and all(len(c) == 1 for c in bases.values()) else
      "the pretraining seed is covered only where finetuning seed s started"
      " from its own pretraining seed s (base checkpoints in these results:"
      f" {counts or 'none'}; the rows do not record which one a run started"
      " from)")
  return (f"Variance covered by the intervals: finetuning seeds"
          f" ({len(seeds)}: {', '.join(map(str, seeds))}; paired by seed);"
          f" {pretraining}. Evaluation items are not resampled: the sampling"
          " error of the eval sets is not in the intervals.")


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


def interactions(records: Sequence[results.EvalRecord],
                 **ci) -> list[Interaction]:
  """I_ij for every pair of optimizers with both bases, Holm over the pairs.

  Keyword args go to `statistics.mean_ci`.
  """
  fronts = seed_frontiers(records)
  levels = base_levels(fronts)
  parts = {}
  for i, j in itertools.combinations(sorted(levels), 2):
    missing = [f"{m} on the {b} base" for b, m in ((i, i), (i, j), (j, j),
                                                   (j, i))
               if (b, m) not in fronts]
    if missing:
      parts[(i, j)] = ({}, {}, "no run of " + ", ".join(missing))
      continue
    area_i = area_gap_by_seed(fronts, i, i, j)
    area_j = area_gap_by_seed(fronts, j, j, i)
    by_area = {s: area_i[s] + area_j[s] for s in set(area_i) & set(area_j)}
    at = [{s: r[s] - o[s] for s in set(r) & set(o)}
          for r, o in ((retention_by_seed(fronts, i, i, levels[i]),
                        retention_by_seed(fronts, i, j, levels[i])),
                       (retention_by_seed(fronts, j, j, levels[j]),
                        retention_by_seed(fronts, j, i, levels[j])))]
    at_level = {s: at[0][s] + at[1][s] for s in set(at[0]) & set(at[1])}
    parts[(i, j)] = (by_area, at_level,
                     "" if by_area else "no seed with all four runs")
  tests = {k: tested(v[0], **ci) for k, v in parts.items()}
  p_holm, family = holm_by_key({k: t[1] for k, t in tests.items()})
  out = []
  for (i, j), (by_area, at_level, why) in parts.items():
    area, p = tests[(i, j)]
    out.append(Interaction(
        i=i, j=j, seeds=tuple(sorted(by_area)), by_area=area,
        at_level=tested(at_level, **ci)[0], levels=(levels[i], levels[j]),
        p_value=p, p_holm=p_holm[(i, j)],
        family=family if math.isfinite(p) else 0,
        verdict=why or stats.verdict(area, p_adjusted=p_holm[(i, j)])))
  return out


def interaction_markdown(rows: Sequence[Interaction], retention_name: str,
                         method: str = stats.DEFAULT_METHOD) -> str:
  """The Interaction table: one row per optimizer pair with both bases."""
  lines = [
      "## Interaction", "",
      "I_ij = [R(i-base, i-ft) - R(i-base, j-ft)] + [R(j-base, j-ft) -"
      " R(j-base, i-ft)], R = retention"
      f" ({retention_name}) at equal learning; > 0: matched finetuning"
      " forgets less, net of any method that is better on every base. By"
      " area: each bracket the mean retention gap over the learning range"
      " both frontiers cover (per seed); at L: each bracket at its base's"
      " common level L. Mean over the seeds with all four runs"
      f" [{stats.LEVEL:.0%} interval, {method}].", "",
      "| i, j | seeds | I by area | I at L | L (i, j) | p | p (Holm) |"
      " verdict |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r.i}, {r.j} | {len(r.seeds)} | {r.by_area.format(signed=True)}"
        f" | {r.at_level.format(signed=True)} | {r.levels[0]:.3f},"
        f" {r.levels[1]:.3f} | {format_p(r.p_value)} | {format_p(r.p_holm)} |"
        f" {r.verdict} |")
  if not rows:
    lines.append("| (no two optimizers with both bases) | | | | | | | |")
  lines += ["", holm_note(max((r.family for r in rows), default=0))]
  return "\n".join(lines) + "\n"


def format_p(p: float) -> str:
  return f"{p:.3g}" if math.isfinite(p) else "n/a"


def consistency_markdown(summary: Sequence[MethodSummary],
                         learning_name: str, retention_name: str,
                         method: str = stats.DEFAULT_METHOD,
                         interaction_rows: Sequence[Interaction] | None = None,
                         variance: str = "") -> str:
  """The summary as a markdown table plus one verdict line per base.

  Then, given `interaction_rows`, the Interaction table; `variance`
  (`variance_note`) goes under each table.
  """
  level = stats.LEVEL
  lines = [
      f"Learning = {learning_name}; retention = {retention_name} (both"
      " higher is better). Every number is the mean over seeds with its"
      f" {level:.0%} interval ({method}; see"
      " optconsist_jax/report/statistics.py). L = the base's common"
      " learning level"
      " (the highest learning every method reaches on every seed); retention"
      " at L is read off each seed's learning/retention frontier. Gap ="
      " matched's retention at L minus this method's, paired by seed (> 0:"
      " matched forgot less; a secondary reading). Gap by area (the primary"
      " comparison) = matched minus this method, mean retention gap per unit"
      " of learning over the learning range both frontiers cover on a seed"
      " (no extrapolation), paired by seed. The verdict is the area gap's:"
      f" it needs >= {stats.MIN_SEEDS} seeds and a Holm-adjusted p below"
      f" {1 - level:.2g}.", "",
      "| base | method | role | seeds | points | best learning | retention"
      " there | L | retention at L | gap vs matched at L | verdict |"
      " gap vs matched by area | p | p (Holm) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(
        f"| {s.base} | {s.method} | {s.role} | {len(s.seeds)} | {s.points} |"
        f" {s.best_learning.format()} | {s.retention_at_best.format()} |"
        f" {s.level:.3f} | {s.retention_at_level.format()} |"
        f" {s.gap_vs_matched.format(signed=True) if s.gap_vs_matched.n else ''}"
        f" | {s.verdict} |"
        f" {s.gap_area.format(signed=True) if s.gap_area.n else ''} |"
        f" {format_p(s.p_value) if s.role != 'matched' else ''} |"
        f" {format_p(s.p_holm) if s.role != 'matched' else ''} |")
  lines += ["", holm_note(max((s.family for s in summary), default=0))]
  if variance:
    lines.append(variance)
  lines.append("")
  for base in sorted({s.base for s in summary}):
    others = [s for s in summary if s.base == base and s.role != "matched"]
    if not any(s.base == base and s.role == "matched" for s in summary):
      lines.append(f"- {base} base: no matched run to compare.")
      continue
    parts = [f"vs {s.method}: {s.verdict} (gap by area"
             f" {s.gap_area.format(signed=True)}, {s.gap_area.n} seeds;"
             f" at L {s.gap_vs_matched.format(signed=True)},"
             f" {s.gap_vs_matched.n} seeds)" for s in others]
    lines.append(f"- {base} base, matched = {base}, at learning L ="
                 f" {summary_level(summary, base):.3f}: "
                 + ("; ".join(parts) if parts else "no other method") + ".")
  if interaction_rows is not None:
    lines += ["", interaction_markdown(interaction_rows, retention_name,
                                       method).rstrip("\n")]
    if variance:
      lines.append(variance)
  return "\n".join(lines) + "\n"


def summary_level(summary: Sequence[MethodSummary], base: str) -> float:
  return next(s.level for s in summary if s.base == base)


def strict_json(x):
  """NaN / +-inf (no interval, an unbounded end) as null: strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: strict_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [strict_json(v) for v in x]
  return x


def summary_json(summary: Sequence[MethodSummary],
                 interaction_rows: Sequence[Interaction] = ()) -> list[dict]:
  """One dict per row; a matched row also carries `interactions`, the
  Interaction rows its optimizer is in (empty on the other rows)."""
  out = []
  for s in summary:
    d = dataclasses.asdict(s)
    d["interactions"] = [dataclasses.asdict(r) for r in interaction_rows
                         if s.role == "matched" and s.base in (r.i, r.j)]
    out.append(strict_json(d))
  return out


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
