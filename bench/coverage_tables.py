"""Tallies and the markdown table of bench/coverage.py (split out by size)."""

from __future__ import annotations

import collections
import math

import numpy as np

from optconsist_jax.report import statistics as stats

# The interval labels of bench/coverage.py: the report as it is called, and
# the same with its item resampling off.
DEFAULT = "default"
SEEDS_ONLY = "seeds_only"


class Tally:
  """Per metric, per study (hits, count): rates with cluster SEs."""

  def __init__(self):
    self.rows = collections.defaultdict(list)

  def add(self, metric: str, hits: float, count: int) -> None:
    if count:
      self.rows[metric].append((float(hits), count))

  def rate(self, metric: str) -> dict:
    """Pooled rate; SE over studies (the binomial SE with one per study)."""
    hc = np.array(self.rows[metric], np.float64).reshape(-1, 2)
    n = len(hc)
    if not n:
      return {"rate": None, "se": None, "studies": 0, "comparisons": 0}
    r = hc[:, 0].sum() / hc[:, 1].sum()
    se = math.sqrt(np.sum((hc[:, 0] - r * hc[:, 1]) ** 2)) / hc[:, 1].sum()
    return {"rate": float(r), "se": float(se), "studies": n,
            "comparisons": int(hc[:, 1].sum())}

  def table(self) -> dict[str, dict]:
    return {m: self.rate(m) for m in sorted(self.rows)}


def fmt(r: dict) -> str:
  if r["rate"] is None:
    return ""
  return f"{r['rate']:.3f} ± {r['se']:.3f}"


def markdown(out: dict) -> str:
  cols = [("gap_area_covered", "gap by area covered"),
          ("gap_area_covered_conditional", "gap covered (conditional)"),
          ("interaction_area_covered", "I by area covered"),
          ("interaction_area_covered_conditional", "I covered (conditional)"),
          ("interaction_level_covered", "I at L covered"),
          ("gap_null_resolved_holm_any", "null gaps: any resolved (Holm)"),
          ("interaction_null_resolved_holm_any",
           "null I: any resolved (Holm)"),
          ("interaction_null_interval_excludes_0",
           "null I: interval excludes 0"),
          ("interaction_nonzero_resolved_right_sign", "planted I resolved"),
          ("matrix_diagonal_best_wrong_any", "matrix: a wrong verdict")]
  lines = [f"Coverage of the report's nominal 95% intervals on"
           f" {out['studies']} simulated studies per scenario (rate ± Monte"
           " Carlo SE over studies). Command: `" + out["command"] + "`.", "",
           "| scenario | seeds | interval | " + " | ".join(c[1] for c in cols)
           + " |", "|---" * (len(cols) + 3) + "|"]
  for name, sc in out["scenarios"].items():
    for method, table in sc["metrics"].items():
      cells = [fmt(table.get(k, {"rate": None})) for k, _ in cols]
      label = (f"report ({stats.DEFAULT_METHOD})" if method == DEFAULT
               else "report, seeds only" if method == SEEDS_ONLY
               else method)
      lines.append(f"| {name} | {sc['design']['seeds']} | {label} | "
                   + " | ".join(cells) + " |")
  lines += [""] + [f"- {n}: {sc['about']}" for n, sc in
                   out["scenarios"].items()]
  return "\n".join(lines) + "\n"
