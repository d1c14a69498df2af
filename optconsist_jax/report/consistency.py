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
method is matched's retention minus its retention at that level, per seed
(paired by seed), with its interval over seeds (`experiments.statistics`,
whose docstring states the method and the sign convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
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
      and when the base has no matched run.
    verdict: `statistics.verdict(gap_vs_matched)`; "" for matched.
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


def retention_by_seed(fronts: Frontiers, base: str, method: str,
                      level: float) -> dict[int, float]:
  return {s: retention_at(f, level)
          for s, f in fronts.get((base, method), {}).items()}


def consistency_summary(records: Sequence[results.EvalRecord],
                        **ci) -> list[MethodSummary]:
  """Matched vs mismatched vs LoRA at the common learning level, per base.

  Keyword args go to `statistics.mean_ci` (the interval method, level).
  """
  fronts = seed_frontiers(records)
  levels = base_levels(fronts)
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
      words = stats.verdict(gap) if gap.n else "no seed in common with matched"
    out.append(MethodSummary(
        base=base, method=method, role=role_of(method, base),
        seeds=tuple(seeds), points=len(pts),
        best_learning=stats.mean_ci([best[s][0] for s in seeds], **ci),
        retention_at_best=stats.mean_ci([best[s][1] for s in seeds],
                                             **ci),
        level=level,
        retention_at_level=stats.mean_ci([mine[s] for s in seeds],
                                              **ci),
        gap_vs_matched=gap, verdict=words))
  return out


def consistency_markdown(summary: Sequence[MethodSummary],
                         learning_name: str, retention_name: str,
                         method: str = stats.DEFAULT_METHOD) -> str:
  """The summary as a markdown table plus one verdict line per base."""
  level = stats.LEVEL
  lines = [
      f"Learning = {learning_name}; retention = {retention_name} (both"
      " higher is better). Every number is the mean over seeds with its"
      f" {level:.0%} interval ({method}; see"
      " optconsist_jax/experiments/statistics.py). L = the base's common"
      " learning level"
      " (the highest learning every method reaches on every seed); retention"
      " at L is read off each seed's learning/retention frontier. Gap ="
      " matched's retention at L minus this method's, paired by seed (> 0:"
      f" matched forgot less); a verdict needs >= {stats.MIN_SEEDS} seeds and"
      " an interval that excludes 0.", "",
      "| base | method | role | seeds | points | best learning | retention"
      " there | L | retention at L | gap vs matched at L | verdict |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(
        f"| {s.base} | {s.method} | {s.role} | {len(s.seeds)} | {s.points} |"
        f" {s.best_learning.format()} | {s.retention_at_best.format()} |"
        f" {s.level:.3f} | {s.retention_at_level.format()} |"
        f" {s.gap_vs_matched.format(signed=True) if s.gap_vs_matched.n else ''}"
        f" | {s.verdict} |")
  lines.append("")
  for base in sorted({s.base for s in summary}):
    others = [s for s in summary if s.base == base and s.role != "matched"]
    if not any(s.base == base and s.role == "matched" for s in summary):
      lines.append(f"- {base} base: no matched run to compare.")
      continue
    parts = [f"vs {s.method}: {s.verdict} (gap"
             f" {s.gap_vs_matched.format(signed=True)}, {s.gap_vs_matched.n}"
             " seeds)" for s in others]
    lines.append(f"- {base} base, matched = {base}, at learning L ="
                 f" {summary_level(summary, base):.3f}: "
                 + ("; ".join(parts) if parts else "no other method") + ".")
  return "\n".join(lines) + "\n"


def summary_level(summary: Sequence[MethodSummary], base: str) -> float:
  return next(s.level for s in summary if s.base == base)


@dataclasses.dataclass(frozen=True)
class MatrixRow:
  """One pretraining optimizer (a row of the consistency matrix).

  Attributes:
    base: the pretraining optimizer.
    level: the row's common learning level.
    cells: finetuning method -> retention at `level` over seeds.
    seeds: the seeds every method of the row has (the margin's sample).
    diagonal_margin: diagonal's mean retention minus the best other
      method's, paired by seed (`statistics.margin_over_best_other`); > 0:
      the diagonal is best. Empty without a diagonal, another method or a
      common seed.
    diagonal_best: "yes" / "no" when the margin's interval excludes 0,
      "not resolved" otherwise, "n/a" when there is no margin.
  """

  base: str
  level: float
  cells: dict[str, stats.Interval]
  seeds: tuple[int, ...]
  diagonal_margin: stats.Interval
  diagonal_best: str


def matrix_columns(bases: Sequence[str], methods: Sequence[str]) -> list[str]:
  """Pretraining optimizers first (so the diagonal is a diagonal), LoRA last."""
  rest = sorted(set(methods) - set(bases), key=lambda m: (m == "lora", m))
  return [b for b in bases if b in methods] + rest


def consistency_matrix(records: Sequence[results.EvalRecord],
                       **ci) -> list[MatrixRow]:
  """Rows = pretraining optimizers, cells = retention at the row's level."""
  fronts = seed_frontiers(records)
  levels = base_levels(fronts)
  rows = []
  for base, level in levels.items():
    methods = sorted(m for b, m in fronts if b == base)
    by_method = {m: retention_by_seed(fronts, base, m, level) for m in methods}
    cells = {m: stats.mean_ci([v[s] for s in sorted(v)], **ci)
             for m, v in by_method.items()}
    common = sorted(set.intersection(*(set(v) for v in by_method.values())))
    margin, best = stats.EMPTY, "n/a"
    if base in methods and len(methods) > 1 and common:
      table_SK = np.array([[by_method[m][s] for m in methods] for s in common])
      margin = stats.margin_over_best_other(table_SK, methods.index(base),
                                            **ci)
      best = {1: "yes", -1: "no", 0: "not resolved"}[margin.sign()]
    rows.append(MatrixRow(base=base, level=level, cells=cells,
                          seeds=tuple(common), diagonal_margin=margin,
                          diagonal_best=best))
  return rows


def matrix_markdown(rows: Sequence[MatrixRow], retention_name: str,
                    method: str = stats.DEFAULT_METHOD) -> str:
  """Cells with intervals, the diagonal in bold, the diagonal's margin."""
  columns = matrix_columns([r.base for r in rows],
                           [m for r in rows for m in r.cells])
  lines = [
      f"Rows: pretraining optimizer; columns: finetuning method. Cell ="
      f" retention ({retention_name}, higher is better) at the row's common"
      f" learning level L, mean over seeds [{stats.LEVEL:.0%} interval,"
      f" {method}]; the diagonal (matched) in bold. Margin ="
      " diagonal minus the best other cell of the row (the strongest on the"
      " mean over seeds), paired by seed.", "",
      "| pretrained with | L | " + " | ".join(columns)
      + " | diagonal minus best other | diagonal best? |",
      "|---" * (len(columns) + 4) + "|"]
  for r in rows:
    cells = []
    for m in columns:
      text = r.cells[m].format() if m in r.cells else ""
      cells.append(f"**{text}**" if m == r.base and text else text)
    lines.append(f"| {r.base} | {r.level:.3f} | " + " | ".join(cells)
                 + f" | {r.diagonal_margin.format(signed=True)}"
                 f" | {r.diagonal_best} |")
  return "\n".join(lines) + "\n"


def _strict_json(x):
  """NaN / +-inf (no interval, an unbounded end) as null: strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _strict_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict_json(v) for v in x]
  return x


def summary_json(summary: Sequence[MethodSummary]) -> list[dict]:
  return [_strict_json(dataclasses.asdict(s)) for s in summary]


def matrix_json(rows: Sequence[MatrixRow]) -> list[dict]:
  return [_strict_json(dataclasses.asdict(r)) for r in rows]


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
