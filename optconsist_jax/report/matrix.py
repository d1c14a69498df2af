"""The consistency matrix: pretraining optimizer x finetuning method.

Rows are pretraining optimizers, columns finetuning methods (LoRA last), a
cell is retention at the row's common learning level L with its interval
over seeds (report/consistency.py reads the frontiers). "Diagonal best?" is
yes only if the diagonal's area gap to every other cell of the row is
resolved positive after Holm's correction over all the gaps of the matrix,
no if any is resolved negative.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import consistency_markdown as markdown
from optconsist_jax.report import resample
from optconsist_jax.report import statistics as stats


@dataclasses.dataclass(frozen=True)
class MatrixRow:
  """One pretraining optimizer (a row of the consistency matrix).

  Attributes:
    base: the pretraining optimizer.
    level: the row's common learning level.
    cells: finetuning method -> retention at `level` over seeds.
    seeds: the seeds every method of the row has (the margin's sample).
    diagonal_margin: the diagonal's retention at `level` minus that of the
      other method best on the mean over seeds, paired by seed (descriptive:
      the closest competitor at L). Empty without a diagonal, another
      method or a common seed.
    diagonal_best: "yes" when the diagonal's area gap to every other cell
      of the row is resolved > 0 after Holm's correction over the table,
      "no" when any is resolved < 0, "not resolved" otherwise, "n/a"
      without a diagonal or another method.
    gaps_area: other method -> diagonal minus it by area (`area_between`
      per seed, paired by seed).
    p_holm: other method -> the t-test p of that gap, Holm-adjusted over
      every gap of the matrix.
    family: how many gaps that Holm family has.
  """

  base: str
  level: float
  cells: dict[str, stats.Interval]
  seeds: tuple[int, ...]
  diagonal_margin: stats.Interval
  diagonal_best: str
  gaps_area: dict[str, stats.Interval] = dataclasses.field(
      default_factory=dict)
  p_holm: dict[str, float] = dataclasses.field(default_factory=dict)
  family: int = 0


def matrix_columns(bases: Sequence[str], methods: Sequence[str]) -> list[str]:
  """Pretraining optimizers first (so the diagonal is a diagonal), LoRA last."""
  rest = sorted(set(methods) - set(bases), key=lambda m: (m == "lora", m))
  return [b for b in bases if b in methods] + rest


def consistency_matrix(records: Sequence[results.EvalRecord], *,
                       items: str | resample.ItemResamples = "auto",
                       **ci) -> list[MatrixRow]:
  """Rows = pretraining optimizers, cells = retention at the row's level.

  "Diagonal best?" from the area gaps of the diagonal to every other cell,
  Holm-corrected over all the gaps of the matrix (`MatrixRow`); the gaps'
  intervals cover the eval items too when the rows have per-item scores
  (`consistency.tested`).
  """
  fronts = consistency.seed_frontiers(records)
  reps, _ = consistency.item_frontiers(records, items)
  units = consistency.seed_units(records)
  levels = consistency.base_levels(fronts)
  gaps, p = {}, {}
  for base, method in fronts:
    if method != base and (base, base) in fronts:
      gaps[(base, method)], p[(base, method)] = consistency.tested(
          consistency.area_gap_by_seed(fronts, base, base, method),
          consistency.over(reps, lambda f, _, b=base, m=method:
                           consistency.area_gap_by_seed(f, b, b, m)),
          units, **ci)
  p_holm, family = consistency.holm_by_key(p)
  rows = []
  for base, level in levels.items():
    methods = sorted(m for b, m in fronts if b == base)
    by_method = {m: consistency.retention_by_seed(fronts, base, m, level) for m in methods}
    cells = {m: stats.mean_ci([v[s] for s in sorted(v)], **ci)
             for m, v in by_method.items()}
    common = sorted(set.intersection(*(set(v) for v in by_method.values())))
    others = [m for m in methods if m != base]
    margin, best = stats.EMPTY, "n/a"
    if base in methods and others:
      if common:
        closest = max(others, key=lambda m: np.mean(
            [by_method[m][s] for s in common]))
        margin = stats.paired_gap_ci(
            {s: by_method[base][s] for s in common}, by_method[closest], **ci)
      signs = [stats.resolved_sign(gaps[(base, m)],
                                   p_adjusted=p_holm[(base, m)])
               for m in others]
      best = ("no" if -1 in signs else
              "yes" if all(x == 1 for x in signs) else "not resolved")
    rows.append(MatrixRow(
        base=base, level=level, cells=cells, seeds=tuple(common),
        diagonal_margin=margin, diagonal_best=best,
        gaps_area={m: gaps[(base, m)] for m in others},
        p_holm={m: p_holm[(base, m)] for m in others},
        family=family))
  return rows


def matrix_markdown(rows: Sequence[MatrixRow], retention_name: str,
                    method: str = stats.DEFAULT_METHOD,
                    variance: str = "") -> str:
  """Cells with intervals, the diagonal in bold, the diagonal's margin."""
  columns = matrix_columns([r.base for r in rows],
                           [m for r in rows for m in r.cells])
  lines = [
      f"Rows: pretraining optimizer; columns: finetuning method. Cell ="
      f" retention ({retention_name}, higher is better) at the row's common"
      f" learning level L, mean over seeds [{stats.LEVEL:.0%} interval,"
      f" {method}]; the diagonal (matched) in bold. Margin ="
      " diagonal minus the best other cell of the row (the strongest on the"
      " mean over seeds) at L, paired by seed (descriptive). Diagonal best?"
      " = yes only if the diagonal's gap by area (mean retention gap over"
      " the learning range both frontiers cover, per seed) to every other"
      " cell of the row is resolved > 0, no if any is resolved < 0.", "",
      "| pretrained with | L | " + " | ".join(columns)
      + " | diagonal minus best other | diagonal best? |"
      " diagonal minus each other by area (p Holm) |",
      "|---" * (len(columns) + 5) + "|"]
  for r in rows:
    cells = []
    for m in columns:
      text = r.cells[m].format() if m in r.cells else ""
      cells.append(f"**{text}**" if m == r.base and text else text)
    each = "; ".join(f"{m}: {g.format(signed=True)} ({markdown.format_p(r.p_holm[m])})"
                     for m, g in r.gaps_area.items())
    lines.append(f"| {r.base} | {r.level:.3f} | " + " | ".join(cells)
                 + f" | {r.diagonal_margin.format(signed=True)}"
                 f" | {r.diagonal_best} | {each} |")
  lines += ["", markdown.holm_note(max((r.family for r in rows), default=0))]
  if variance:
    lines.append(variance)
  return "\n".join(lines) + "\n"


def matrix_json(rows: Sequence[MatrixRow]) -> list[dict]:
  return [markdown.strict_json(dataclasses.asdict(r)) for r in rows]
