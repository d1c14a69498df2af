"""Which probe of the update accounts for retention at equal learning?

The estimands of the mechanism report (report/mechanism.py writes them).

The paper (arXiv 2605.06654) explains why matched finetuning forgets less:
the pretraining optimizer leaves a fingerprint on the base, and an update
by the same optimizer moves along it. The eval job's probes
(evaluate/probes.py: update geometry against the base, second-order
forgetting, activation drift) measure each checkpoint's update; this module
relates them to retention, per base, at equal learning, with intervals over
seeds (`report.statistics`, Student's t by default):

1. Probe at equal learning. Per (base, method, seed), the checkpoints on
   that run set's learning/retention Pareto frontier, sorted by learning;
   the probe at the base's common learning level L (report/consistency.py
   `base_levels`) is read off piecewise linearly in learning between them,
   exactly as retention is (`consistency.retention_at`; the least-learning
   point's value below it, undefined above the frontier). So a method's
   probe is compared at the learning every method reached.
2. Matched vs switched. Per base, the probe of matched finetuning minus
   that of each other method at L, paired by seed: mean, interval, the
   two-sided t test, and Holm's correction over every (probe, base, method)
   comparison of the table (a family).
3. Does the probe show the consistency interaction? Per pair of
   optimizers i, j with both bases, the probe's interaction contrast at
   each base's L, in the form of the study's retention interaction
   (report/consistency.py `interactions`):

     I_ij(P) = [P(i-base, i-ft) - P(i-base, j-ft)]
               + [P(j-base, j-ft) - P(j-base, i-ft)],

   per seed with all four runs, Holm over (probe, pair) in one family, and
   written beside retention's own I_ij: a probe whose I resolves with the
   sign of a mechanism and retention's does too is a candidate; one whose
   I is null cannot carry the interaction.
4. Does the probe account for retention at equal learning? Per base and
   seed, over every finetuned checkpoint of that base (all methods,
   learning rates and epochs), the partial correlation of the probe with
   retention given learning (both regressed on [1, learning] by least
   squares, then the Pearson r of the residuals). Its interval over seeds
   is the t interval of Fisher's z = artanh r mapped back by tanh (Fisher
   1921); its test the t test of z, Holm over (probe, base) in one family.

A probe that carries the mechanism separates matched from switched (2),
shows the interaction (3) and tracks retention at equal learning (4); one
that does none of these is a null.

The intervals of (2) and (3) use the retention table's machinery
(`consistency.tested`): with per-item eval scores in the rows, the
frontiers and L are recomputed on each resample of the eval items
(report/resample.py), so the probe read at L moves with them, and the
interval is the hierarchical one (`statistics.hierarchical_ci`); finetuning
seeds that share a pretraining checkpoint are one unit
(`consistency.seed_units`). The partial correlations (4) and the per-method
values cover the seeds only; the "Intervals cover" line under the table
(`resample.covers_note`) says so. report/mechanism.py `write` appends
the tables to summary.md and draws one figure per probe.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import itertools
import math
import re

import numpy as np

from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import resample
from optconsist_jax.report import statistics as stats


# The headline probes: (metric, words). "{f}" is the middle subspace
# fraction the records carry (e.g. top5pct).
PROBES: tuple[tuple[str, str], ...] = (
    ("probe/share_{f}/all",
     "update energy in the base's top-k singular subspaces"),
    ("probe/pretrain_overlap_{f}_left/all",
     "overlap with the pretraining displacement (mean cos^2)"),
    ("probe/stable_rank/all", "stable rank of the update"),
    ("probe/spectral_norm/all", "spectral norm of the update"),
    ("probe/curvature_ratio",
     "curvature along the update, dW'H dW / |dW|^2"),
    ("probe/loss_change_pred2",
     "second-order predicted held-out loss change"),
    ("probe/act_rms_absdrift/mean", "residual-stream RMS drift |d|"),
    ("probe/act_kurtosis_absdrift/mean", "residual-stream kurtosis drift |d|"),
)
HIGHER = "matched higher"
LOWER = "matched lower"
TRACKS_UP = "rises with retention"
TRACKS_DOWN = "falls with retention"


@dataclasses.dataclass(frozen=True)
class ProbeRow:
  """One (probe, base, other method) row of the mechanism table.

  Attributes:
    probe: the metric; words: what it is.
    base: the base's pretraining optimizer; other: the compared method.
    level: the base's common learning level L.
    matched, other_value: the probe at L over seeds.
    gap: matched minus other at L, paired by seed.
    p_gap, p_gap_holm: its t test and Holm-adjusted p.
    gap_verdict: HIGHER / LOWER / statistics.UNRESOLVED (or why none).
    partial_r: partial correlation with retention given learning over the
      base's checkpoints, per seed (mean of r; ends by Fisher z).
    p_r, p_r_holm: its t test (of z) and Holm-adjusted p.
    r_verdict: TRACKS_UP / TRACKS_DOWN / statistics.UNRESOLVED.
  """

  probe: str
  words: str
  base: str
  other: str
  level: float
  matched: stats.Interval
  other_value: stats.Interval
  gap: stats.Interval
  p_gap: float
  p_gap_holm: float
  gap_verdict: str
  partial_r: stats.Interval
  p_r: float
  p_r_holm: float
  r_verdict: str


@dataclasses.dataclass(frozen=True)
class ProbeInteraction:
  """One (probe, optimizer pair) row: the probe's interaction at L.

  Attributes:
    probe: the metric; words: what it is.
    i, j: the two optimizers (i < j), each with a base and both methods.
    levels: (L of the i base, L of the j base).
    seeds: the seeds with all four runs.
    at_level: I_ij of the probe at L (module doc, 3) over those seeds.
    p_value, p_holm: its t test and Holm-adjusted p.
    family: how many (probe, pair) tests that Holm family has.
    verdict: HIGHER (> 0: the probe is higher for matched finetuning
      beyond any method effect) / LOWER / statistics.UNRESOLVED, or why
      none.
  """

  probe: str
  words: str
  i: str
  j: str
  levels: tuple[float, float]
  seeds: tuple[int, ...]
  at_level: stats.Interval
  p_value: float
  p_holm: float
  family: int
  verdict: str


def probe_names(records: Sequence[results.EvalRecord],
                extra: Sequence[str] = ()) -> list[tuple[str, str]]:
  """The PROBES the records carry ({f} resolved) and `extra` metrics."""
  have = {k for r in records if not r.is_base for k in r.metrics}
  fracs = sorted({m.group(1) for k in have
                  if (m := re.fullmatch(r"probe/share_(top[\d.]+pct)/all", k))},
                 key=lambda s: float(s[3:-3]))
  f = fracs[len(fracs) // 2] if fracs else "top5pct"
  out = [(name.format(f=f), words.replace("top-k", f"top-k ({f})"))
         for name, words in PROBES if name.format(f=f) in have]
  return out + [(k, k) for k in extra if k in have]


def probe_at_level(records: Sequence[results.EvalRecord], probe: str,
                   level: float) -> float:
  """The probe at learning `level` on the frontier of one run set (doc, 1)."""
  return _read(np.array([(r.learning, r.retention) for r in records],
                        np.float64).reshape(-1, 2),
               _values(records, probe), level)


def _values(records: Sequence[results.EvalRecord], probe: str) -> np.ndarray:
  """The probe per record, NaN where a record does not carry it."""
  return np.array([r.metrics.get(probe, math.nan) for r in records],
                  np.float64)


def _read(points_P2: np.ndarray, values_P: np.ndarray, level: float) -> float:
  """`values_P` at `level` along the frontier of `points_P2` (doc, 1)."""
  front = [i for i in results.pareto_frontier(points_P2)
           if math.isfinite(values_P[i])]
  if not front or level > points_P2[front[-1], 0]:
    return math.nan
  return float(np.interp(level, points_P2[front, 0], values_P[front]))


def _reads_at_level(runs_idx: dict[tuple[str, str, int], np.ndarray],
                    points_N2: np.ndarray, levels: dict[str, float],
                    values_N: np.ndarray) -> dict[str, dict[str, dict]]:
  """base -> method -> seed -> the probe at the base's L (finite only)."""
  out: dict[str, dict[str, dict[int, float]]] = {}
  for (b, m, s), idx in runs_idx.items():
    if b in levels:
      v = _read(points_N2[idx], values_N[idx], levels[b])
      if math.isfinite(v):
        out.setdefault(b, {}).setdefault(m, {})[s] = v
  return out


def _gap(at: dict, base: str, a: str, b: str) -> dict[int, float]:
  """Per seed both have, a's probe minus b's on `base`."""
  pa, pb = at.get(base, {}).get(a, {}), at.get(base, {}).get(b, {})
  return {s: pa[s] - pb[s] for s in sorted(set(pa) & set(pb))}


def interaction_by_seed(at: dict, i: str, j: str) -> dict[int, float]:
  """I_ij of a probe per seed with all four runs (module doc, 3)."""
  gi, gj = _gap(at, i, i, j), _gap(at, j, j, i)
  return {s: gi[s] + gj[s] for s in sorted(set(gi) & set(gj))}


def partial_correlation(probe_N: np.ndarray, retention_N: np.ndarray,
                        learning_N: np.ndarray) -> float:
  """Pearson r of probe and retention after regressing both on learning."""
  x = np.stack([np.ones_like(learning_N), learning_N], 1)

  def resid(y):
    return y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
  a, b = resid(probe_N), resid(retention_N)
  denom = math.sqrt(float(a @ a) * float(b @ b))
  return float(a @ b / denom) if denom > 0 else math.nan


def runs_of(records: Sequence[results.EvalRecord]
          ) -> dict[tuple[str, str, int], list[results.EvalRecord]]:
  out: dict[tuple[str, str, int], list[results.EvalRecord]] = {}
  for r in records:
    if not r.is_base:
      out.setdefault((r.base, r.method, r.seed), []).append(r)
  return out


def _fisher(rs: Sequence[float], **ci) -> tuple[stats.Interval, float]:
  """Interval of r over seeds through z = artanh r, and the t test's p."""
  z = np.arctanh(np.clip(np.asarray(rs, np.float64), -0.999999, 0.999999))
  if len(z) == 0:
    return stats.EMPTY, math.nan
  iz = stats.mean_ci(z, **ci)
  return (stats.Interval(float(np.mean(rs)), math.tanh(iz.lo),
                         math.tanh(iz.hi), iz.n, iz.level),
          stats.t_test_p(z))


@dataclasses.dataclass(frozen=True)
class _Reader:
  """Where each run set's rows are, and the points and L on the full eval
  sets and on each item resample (`replicates`: None without them)."""

  runs_idx: dict[tuple[str, str, int], np.ndarray]
  points_N2: np.ndarray
  levels: dict[str, float]
  replicates: list[tuple[np.ndarray, dict[str, float]]] | None
  units: dict[int, tuple]

  def reads(self, values_N: np.ndarray) -> tuple[dict, list[dict] | None]:
    """The probe at L (`_reads_at_level`) on the full sets and per resample."""
    return (_reads_at_level(self.runs_idx, self.points_N2, self.levels,
                            values_N),
            None if self.replicates is None else
            [_reads_at_level(self.runs_idx, p_N2, lv, values_N)
             for p_N2, lv in self.replicates])


def _reader(records: Sequence[results.EvalRecord],
            items: str | resample.ItemResamples) -> _Reader:
  idx: dict[tuple[str, str, int], list[int]] = {}
  for n, r in enumerate(records):
    if not r.is_base:
      idx.setdefault((r.base, r.method, r.seed), []).append(n)
  reps, resampled = consistency.item_frontiers(records, items)
  replicates = None
  if reps is not None:
    if "base_levels" not in resampled.cache:
      resampled.cache["base_levels"] = [consistency.base_levels(f)
                                        for f in reps]
    replicates = list(zip(resampled.points_BN2,
                          resampled.cache["base_levels"]))
  return _Reader(
      {k: np.asarray(v, np.int64) for k, v in sorted(idx.items())},
      np.array([(r.learning, r.retention) for r in records],
               np.float64).reshape(-1, 2),
      consistency.base_levels(consistency.seed_frontiers(records)),
      replicates, consistency.seed_units(records))


def mechanism_table(records: Sequence[results.EvalRecord],
                    probes: Sequence[tuple[str, str]] | None = None, *,
                    items: str | resample.ItemResamples = "auto",
                    **ci) -> list[ProbeRow]:
  """Every (probe, base, other method) row (module doc), Holm-corrected.

  `items`: as `consistency.item_frontiers`'s (the gaps' intervals cover the
  eval items when the rows keep per-item scores). Keyword args go to
  `statistics.mean_ci` (the interval method, level).
  """
  probes = probe_names(records) if probes is None else list(probes)
  reader = _reader(records, items)
  runs = runs_of(records)
  pending = []
  for probe, words in probes:
    at, at_reps = reader.reads(_values(records, probe))
    for base, level in reader.levels.items():
      rs = []
      for s in sorted({s for (b, _, s) in runs if b == base}):
        pts = [r for (b, _, ss), recs in runs.items() if b == base and ss == s
               for r in recs if probe in r.metrics]
        if len(pts) >= 4:
          r = partial_correlation(
              np.array([p.metrics[probe] for p in pts], np.float64),
              np.array([p.retention for p in pts], np.float64),
              np.array([p.learning for p in pts], np.float64))
          if math.isfinite(r):
            rs.append(r)
      r_ci, p_r = _fisher(rs, **ci)
      mine = at.get(base, {})
      matched = mine.get(base, {})
      for other in sorted(set(mine) - {base}):
        gap, p_gap = consistency.tested(
            _gap(at, base, base, other),
            at_reps and [_gap(a, base, base, other) for a in at_reps],
            reader.units, **ci)
        pending.append(dict(
            probe=probe, words=words, base=base, other=other, level=level,
            matched=(stats.mean_ci(list(matched.values()), **ci)
                     if matched else stats.EMPTY),
            other_value=stats.mean_ci(list(mine[other].values()), **ci),
            gap=gap, p_gap=p_gap, partial_r=r_ci, p_r=p_r))
  p_gap_holm = stats.holm([d["p_gap"] for d in pending])
  # One partial-correlation test per (probe, base), not per row.
  r_keys = list(dict.fromkeys((d["probe"], d["base"]) for d in pending))
  p_r = {(d["probe"], d["base"]): d["p_r"] for d in pending}
  r_holm = dict(zip(r_keys, stats.holm([p_r[k] for k in r_keys])))
  out = []
  for d, ph in zip(pending, p_gap_holm):
    prh = r_holm[(d["probe"], d["base"])]
    out.append(ProbeRow(
        **d, p_gap_holm=ph,
        gap_verdict=(stats.describe(d["gap"], HIGHER, LOWER, p_adjusted=ph)
                     if d["gap"].n else "no seed in common with matched"),
        p_r_holm=prh,
        r_verdict=stats.describe(d["partial_r"], TRACKS_UP, TRACKS_DOWN,
                                 p_adjusted=prh)))
  return out


def probe_interactions(records: Sequence[results.EvalRecord],
                       probes: Sequence[tuple[str, str]] | None = None, *,
                       items: str | resample.ItemResamples = "auto",
                       **ci) -> list[ProbeInteraction]:
  """Each probe's I_ij at L for every pair with both bases (module doc, 3).

  Intervals as the retention interaction's (`consistency.tested`: seeds,
  and eval items when resampled); Holm over every (probe, pair). `items`
  and keyword args as `mechanism_table`'s.
  """
  probes = probe_names(records) if probes is None else list(probes)
  reader = _reader(records, items)
  methods = {(b, m) for (b, m, _) in reader.runs_idx}
  pending = []
  for probe, words in probes:
    at, at_reps = reader.reads(_values(records, probe))
    for i, j in itertools.combinations(sorted(reader.levels), 2):
      missing = [f"{m} on the {b} base" for b, m in ((i, i), (i, j), (j, j),
                                                     (j, i))
                 if (b, m) not in methods]
      by_seed = {} if missing else interaction_by_seed(at, i, j)
      iv, p = consistency.tested(
          by_seed, at_reps and [interaction_by_seed(a, i, j)
                                for a in at_reps], reader.units, **ci)
      why = ("no run of " + ", ".join(missing) if missing else
             "" if by_seed else "no seed with the probe on all four runs")
      pending.append(dict(probe=probe, words=words, i=i, j=j,
                          levels=(reader.levels[i], reader.levels[j]),
                          seeds=tuple(sorted(by_seed)), at_level=iv,
                          p_value=p, why=why))
  p_holm = stats.holm([d["p_value"] for d in pending])
  family = stats.family_size([d["p_value"] for d in pending])
  return [ProbeInteraction(
      **{k: v for k, v in d.items() if k != "why"}, p_holm=ph,
      family=family if math.isfinite(d["p_value"]) else 0,
      verdict=d["why"] or stats.describe(d["at_level"], HIGHER, LOWER,
                                         p_adjusted=ph))
          for d, ph in zip(pending, p_holm)]
