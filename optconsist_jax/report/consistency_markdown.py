"""The consistency tables as markdown and JSON.

report/consistency.py computes them; report/tables.py writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

from optconsist_jax.report import brackets
from optconsist_jax.report import consistency
from optconsist_jax.report import statistics as stats


def holm_note(family: int, level: float = stats.LEVEL) -> str:
  """The line under a table that says how its verdicts were corrected."""
  return (f"Multiplicity: Holm's step-down correction (Holm 1979) over the"
          f" {family} comparison{'s' if family != 1 else ''} of this table;"
          " p = two-sided t test of the per-seed differences (with the eval"
          " items' variance added where the intervals cover items:"
          " Welch-Satterthwaite df), verdicts from the Holm-adjusted p (< "
          f"{1 - level:.2g}); intervals are the unadjusted {level:.0%} ones.")


def format_p(p: float) -> str:
  return f"{p:.3g}" if math.isfinite(p) else "n/a"


def bracket_note(learning_name: str) -> str:
  """What the bracket columns of the tables mean (report/brackets.py)."""
  return (
      "Brackets (frontier hygiene): a value at L is read linearly between"
      " the two frontier checkpoints that bracket L (the nearest with"
      " learning <= L and >= L); with a frontier that is not linear between"
      " them it could be anywhere in the bracket range (retention: between"
      " the two checkpoints' retentions; a gap or I: its formula's min and"
      " max over its terms' ranges; means over seeds). Width = the largest"
      " learning distance between two bracketing checkpoints over the seeds"
      f" ({learning_name}; nats when it is a loss), checked against"
      f" <= {brackets.MAX_WIDTH:g}. A range that straddles 0 leaves the"
      " sign at L to the grid's linearity; \"L outside\" = L is not within"
      " a seed's frontier (no bound, nothing extrapolated).")


def interaction_markdown(rows: Sequence[consistency.Interaction],
                         retention_name: str,
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
      f" [{stats.LEVEL:.0%} interval, {method}]. I at L's bracket range and"
      " width: as in the table above.", "",
      "| i, j | seeds | I by area | I at L | I at L: bracket range |"
      " range vs 0 | bracket width | L (i, j) | p | p (Holm) | verdict |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    b = r.at_level_bracket
    lines.append(
        f"| {r.i}, {r.j} | {len(r.seeds)} | {r.by_area.format(signed=True)}"
        f" | {r.at_level.format(signed=True)}"
        f" | {brackets.range_text(b, signed=True)} | {brackets.sign_text(b)}"
        f" | {brackets.width_text(b)} | {r.levels[0]:.3f},"
        f" {r.levels[1]:.3f} | {format_p(r.p_value)} | {format_p(r.p_holm)} |"
        f" {r.verdict} |")
  if not rows:
    lines.append("| (no two optimizers with both bases) | | | | | | | | | |"
                 " |")
  lines += ["", holm_note(max((r.family for r in rows), default=0))]
  return "\n".join(lines) + "\n"


def consistency_markdown(summary: Sequence[consistency.MethodSummary],
                         learning_name: str, retention_name: str,
                         method: str = stats.DEFAULT_METHOD,
                         interaction_rows: Sequence[
                             consistency.Interaction] | None = None,
                         variance: str = "", grid_note: str = "") -> str:
  """The summary as a markdown table plus one verdict line per base.

  Then, given `interaction_rows`, the Interaction table; `variance`
  (`resample.covers_note`) goes under each table; `grid_note` (how the
  learning-rate grid was refined) after the opening paragraph.
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
      f" {1 - level:.2g}. " + bracket_note(learning_name), "",
      *((grid_note, "") if grid_note else ()),
      "| base | method | role | seeds | points | best learning | retention"
      " there | L | retention at L | retention at L: bracket range |"
      " bracket width | gap vs matched at L | gap at L: bracket range |"
      " range vs 0 | verdict | gap vs matched by area | p | p (Holm) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
      "---|"]
  for s in summary:
    lines.append(
        f"| {s.base} | {s.method} | {s.role} | {len(s.seeds)} | {s.points} |"
        f" {s.best_learning.format()} | {s.retention_at_best.format()} |"
        f" {s.level:.3f} | {s.retention_at_level.format()} |"
        f" {brackets.range_text(s.retention_bracket)} |"
        f" {brackets.width_text(s.retention_bracket)} |"
        f" {s.gap_vs_matched.format(signed=True) if s.gap_vs_matched.n else ''}"
        f" | {brackets.range_text(s.gap_bracket, signed=True)} |"
        f" {brackets.sign_text(s.gap_bracket)}"
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
             f" {s.gap_vs_matched.n} seeds, bracket range "
             + ", ".join(filter(None, (
                 brackets.range_text(s.gap_bracket, signed=True),
                 brackets.sign_text(s.gap_bracket)))) + ")"
             for s in others]
    lines.append(f"- {base} base, matched = {base}, at learning L ="
                 f" {consistency.summary_level(summary, base):.3f}: "
                 + ("; ".join(parts) if parts else "no other method") + ".")
  if interaction_rows is not None:
    lines += ["", interaction_markdown(interaction_rows, retention_name,
                                       method).rstrip("\n")]
    if variance:
      lines.append(variance)
  return "\n".join(lines) + "\n"


def strict_json(x):
  """NaN / +-inf (no interval, an unbounded end) as null: strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: strict_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [strict_json(v) for v in x]
  return x


def summary_json(summary: Sequence[consistency.MethodSummary],
                 interaction_rows: Sequence[consistency.Interaction] = ()
                 ) -> list[dict]:
  """One dict per row; a matched row also carries `interactions`, the
  Interaction rows its optimizer is in (empty on the other rows)."""
  out = []
  for s in summary:
    d = dataclasses.asdict(s)
    d["interactions"] = [dataclasses.asdict(r) for r in interaction_rows
                         if s.role == "matched" and s.base in (r.i, r.j)]
    out.append(strict_json(d))
  return out
