"""Which probe of the update accounts for retention at equal learning?

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
3. Does the probe account for retention at equal learning? Per base and
   seed, over every finetuned checkpoint of that base (all methods,
   learning rates and epochs), the partial correlation of the probe with
   retention given learning (both regressed on [1, learning] by least
   squares, then the Pearson r of the residuals). Its interval over seeds
   is the t interval of Fisher's z = artanh r mapped back by tanh (Fisher
   1921); its test the t test of z, Holm over (probe, base) in one family.

A probe that carries the mechanism separates matched from switched (2) and
tracks retention at equal learning (3); one that does neither is a null.
`write` appends the table to summary.md and draws one figure per probe.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import math
import os
import re

import numpy as np

from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
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
  pts = [(r.learning, r.retention) for r in records]
  front = [records[i] for i in results.pareto_frontier(pts)]
  front = [r for r in front if probe in r.metrics]
  if not front or level > front[-1].learning:
    return math.nan
  return float(np.interp(level, [r.learning for r in front],
                         [r.metrics[probe] for r in front]))


def partial_correlation(probe_N: np.ndarray, retention_N: np.ndarray,
                        learning_N: np.ndarray) -> float:
  """Pearson r of probe and retention after regressing both on learning."""
  x = np.stack([np.ones_like(learning_N), learning_N], 1)

  def resid(y):
    return y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
  a, b = resid(probe_N), resid(retention_N)
  denom = math.sqrt(float(a @ a) * float(b @ b))
  return float(a @ b / denom) if denom > 0 else math.nan


def _runs(records: Sequence[results.EvalRecord]
          ) -> dict[tuple[str, str, int], list[results.EvalRecord]]:
  out: dict[tuple[str, str, int], list[results.EvalRecord]] = {}
  for r in records:
    if not r.is_base:
      out.setdefault((r.base, r.method, r.seed), []).append(r)
  return out


def _tested(values: Sequence[float], **ci) -> tuple[stats.Interval, float]:
  """(interval over seeds, two-sided t-test p); (EMPTY, NaN) for none."""
  if not values:
    return stats.EMPTY, math.nan
  return stats.mean_ci(values, **ci), stats.t_test_p(values)


def _p(p: float) -> str:
  return "n/a" if not math.isfinite(p) else f"{p:.2g}"


def _fisher(rs: Sequence[float], **ci) -> tuple[stats.Interval, float]:
  """Interval of r over seeds through z = artanh r, and the t test's p."""
  z = np.arctanh(np.clip(np.asarray(rs, np.float64), -0.999999, 0.999999))
  if len(z) == 0:
    return stats.EMPTY, math.nan
  iz = stats.mean_ci(z, **ci)
  return (stats.Interval(float(np.mean(rs)), math.tanh(iz.lo),
                         math.tanh(iz.hi), iz.n, iz.level),
          stats.t_test_p(z))


def mechanism_table(records: Sequence[results.EvalRecord],
                    probes: Sequence[tuple[str, str]] | None = None,
                    **ci) -> list[ProbeRow]:
  """Every (probe, base, other method) row (module doc), Holm-corrected.

  Keyword args go to `statistics.mean_ci` (the interval method, level).
  """
  probes = probe_names(records) if probes is None else list(probes)
  runs = _runs(records)
  levels = consistency.base_levels(consistency.seed_frontiers(records))
  pending = []
  for probe, words in probes:
    for base, level in levels.items():
      at: dict[str, dict[int, float]] = {}
      for (b, m, s), recs in runs.items():
        if b == base:
          v = probe_at_level(recs, probe, level)
          if math.isfinite(v):
            at.setdefault(m, {})[s] = v
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
      matched = at.get(base, {})
      for other in sorted(set(at) - {base}):
        diffs = {s: matched[s] - at[other][s]
                 for s in sorted(set(matched) & set(at[other]))}
        gap, p_gap = _tested(list(diffs.values()), **ci)
        pending.append(dict(
            probe=probe, words=words, base=base, other=other, level=level,
            matched=(stats.mean_ci(list(matched.values()), **ci)
                     if matched else stats.EMPTY),
            other_value=stats.mean_ci(list(at[other].values()), **ci),
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


def _fmt(x: stats.Interval, signed: bool = False) -> str:
  scale = max(abs(v) for v in (x.mean, x.lo, x.hi) if math.isfinite(v)) if (
      x.n and math.isfinite(x.mean)) else 1.0
  digits = 3 if scale >= 0.01 else 5
  return x.format(digits, signed)


def mechanism_markdown(rows: Sequence[ProbeRow], retention_name: str,
                       interval: str = stats.DEFAULT_METHOD) -> str:
  """The mechanism section of summary.md."""
  lines = [
      "## Mechanism: the update probes at equal learning",
      "",
      ("Each probe (evaluate/probes.py) read at the base's common learning"
       " level L along each (method, seed) frontier; matched minus the other"
       " method paired by seed; partial r = correlation of the probe with"
       f" retention ({retention_name}) given learning over all the base's"
       " finetuned checkpoints, per seed (interval by Fisher's z). Intervals"
       f" are {stats.LEVEL:.0%} over seeds ({interval}); verdicts from"
       " Holm-adjusted p (gaps: one family over all rows; partial r: one"
       " per probe and base)."),
      "",
      ("| probe | base | vs | L | matched | other | matched - other"
       " | p (Holm) | verdict | partial r | p (Holm) | verdict |"),
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r.words} (`{r.probe}`) | {r.base} | {r.other} | {r.level:.3f}"
        f" | {_fmt(r.matched)} | {_fmt(r.other_value)}"
        f" | {_fmt(r.gap, True)} | {_p(r.p_gap_holm)}"
        f" | {r.gap_verdict} | {r.partial_r.format(2, True)}"
        f" | {_p(r.p_r_holm)} | {r.r_verdict} |")
  return "\n".join(lines) + "\n"


def _interval_json(x: stats.Interval) -> dict[str, float]:
  return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
          for k, v in x.to_dict().items()}


def mechanism_json(rows: Sequence[ProbeRow]) -> list[dict]:
  out = []
  for r in rows:
    d = {}
    for f in dataclasses.fields(r):
      v = getattr(r, f.name)
      d[f.name] = (_interval_json(v) if isinstance(v, stats.Interval)
                   else None if isinstance(v, float) and not math.isfinite(v)
                   else v)
    out.append(d)
  return out


def probe_plot(records: Sequence[results.EvalRecord], rows: Sequence[ProbeRow],
               probe: str, words: str, path: str) -> str:
  """Per base: each method's probe at L (seed dots, mean and interval)."""
  # deferred: matplotlib takes ~1 s to import; only drawing needs it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # deferred: after use("Agg"); pylint: disable=g-import-not-at-top
  from optconsist_jax.report import plots  # deferred: imports matplotlib; pylint: disable=g-import-not-at-top
  mine = [r for r in rows if r.probe == probe]
  bases = sorted({r.base for r in mine})
  runs = _runs(records)
  fig, axes = plt.subplots(1, max(len(bases), 1),
                           figsize=(3.8 * max(len(bases), 1) + 0.5, 3.6),
                           squeeze=False)
  for ax, base in zip(axes[0], bases):
    level = mine[[r.base for r in mine].index(base)].level
    methods = sorted({m for (b, m, _) in runs if b == base},
                     key=lambda m: (m != base, m))
    colour = plots.colours(methods)
    for i, m in enumerate(methods):
      vals = [probe_at_level(recs, probe, level)
              for (b, mm, _), recs in runs.items() if b == base and mm == m]
      vals = [v for v in vals if math.isfinite(v)]
      if not vals:
        continue
      ax.scatter([i] * len(vals), vals, s=14, alpha=0.5, color=colour[m])
      ci = stats.mean_ci(vals)
      err = ([[ci.mean - ci.lo], [ci.hi - ci.mean]]
             if np.isfinite([ci.lo, ci.hi]).all() else None)
      ax.errorbar([i + 0.15], [ci.mean], yerr=err, fmt="o", capsize=4,
                  color=colour[m])
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([f"{m}\n({'matched' if m == base else 'switched'})"
                        if m.lower() != "lora" else m for m in methods],
                       fontsize=8)
    notes = [f"vs {r.other}: {r.gap_verdict}" for r in mine
             if r.base == base]
    r0 = next(r for r in mine if r.base == base)
    notes.append(f"partial r {r0.partial_r.format(2, True)}: {r0.r_verdict}")
    ax.set_title(f"{base} base, at learning L = {level:.3f}", fontsize=9)
    ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes,
            fontsize=6.5, va="bottom")
    ax.grid(alpha=0.3, axis="y")
  axes[0][0].set_ylabel(f"{words}\n({probe})", fontsize=8)
  fig.suptitle(f"{words} at equal learning (dots: seeds; bar: mean, 95%"
               " interval over seeds)", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)
  return path


def write(records: Sequence[results.EvalRecord], out_dir: str, *,
          summary_path: str | None = None,
          interval: str = stats.DEFAULT_METHOD,
          probes: Sequence[tuple[str, str]] | None = None) -> dict[str, str]:
  """The mechanism table (appended to summary.md), its JSON and figures.

  Returns {} when no record carries a probe (probes off).
  """
  probes = probe_names(records) if probes is None else list(probes)
  if not probes:
    return {}
  rows = mechanism_table(records, probes, method=interval)
  if not rows:
    return {}
  retention_name = ", ".join(sorted({r.retention_metric for r in records}))
  paths = {"mechanism_json": os.path.join(out_dir, "mechanism.json")}
  if summary_path is not None:
    with open(summary_path, "a") as f:
      f.write("\n" + mechanism_markdown(rows, retention_name, interval))
  with open(paths["mechanism_json"], "w") as f:
    json.dump(mechanism_json(rows), f, indent=2, allow_nan=False)
  for probe, words in probes:
    name = re.sub(r"[^A-Za-z0-9]+", "_", probe.removeprefix("probe/"))
    paths[f"mechanism_{name}"] = probe_plot(
        records, rows, probe, words,
        os.path.join(out_dir, "mechanism", f"{name}.png"))
  return paths
