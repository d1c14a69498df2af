"""The mechanism section of the report: its tables, JSON and figures.

What the numbers are (each probe at equal learning, matched minus
switched, the probe's consistency interaction beside retention's, the
partial correlation with retention): report/probe_estimands.py. `write`
appends the tables to summary.md, writes mechanism.json and
mechanism_interactions.json and draws one figure per probe.
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
from optconsist_jax.report import probe_estimands as pe
from optconsist_jax.report import resample
from optconsist_jax.report import statistics as stats


def _p(p: float) -> str:
  return "n/a" if not math.isfinite(p) else f"{p:.2g}"


def _fmt(x: stats.Interval, signed: bool = False) -> str:
  scale = max(abs(v) for v in (x.mean, x.lo, x.hi) if math.isfinite(v)) if (
      x.n and math.isfinite(x.mean)) else 1.0
  digits = 3 if scale >= 0.01 else 5
  return x.format(digits, signed)


def mechanism_markdown(rows: Sequence[pe.ProbeRow], retention_name: str,
                       interval: str = stats.DEFAULT_METHOD,
                       interactions: Sequence[pe.ProbeInteraction] = (),
                       retention_interactions: Sequence[
                           consistency.Interaction] = (),
                       variance: str = "") -> str:
  """The mechanism section of summary.md.

  The gap table, then (given `interactions`) each probe's interaction
  beside retention's (`retention_interactions`); `variance`
  (`resample.covers_note`) under each table.
  """
  lines = [
      "## Mechanism: the update probes at equal learning",
      "",
      ("Each probe (evaluate/probes.py) read at the base's common learning"
       " level L along each (method, seed) frontier; matched minus the other"
       " method paired by seed; partial r = correlation of the probe with"
       f" retention ({retention_name}) given learning over all the base's"
       " finetuned checkpoints, per seed (interval by Fisher's z). Intervals"
       f" are {stats.LEVEL:.0%} ({interval}); verdicts from"
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
  if variance:
    lines += ["", variance + " Partial r: the seeds only."]
  if interactions or retention_interactions:
    lines += ["", interaction_markdown(interactions, retention_interactions,
                                       retention_name, interval).rstrip("\n")]
    if variance:
      lines += ["", variance]
  return "\n".join(lines) + "\n"


def interaction_markdown(rows: Sequence[pe.ProbeInteraction],
                         retention_rows: Sequence[consistency.Interaction],
                         retention_name: str,
                         interval: str = stats.DEFAULT_METHOD) -> str:
  """Each probe's I_ij at L under retention's own I_ij (module doc, 3)."""
  lines = [
      "### Which probe shows an interaction like retention's?", "",
      ("I_ij(X) = [X(i-base, i-ft) - X(i-base, j-ft)] + [X(j-base, j-ft) -"
       " X(j-base, i-ft)], X read at each base's common learning level L,"
       " per seed with all four runs: first X = retention"
       f" ({retention_name}; the Interaction table's I, by area and at L),"
       " then each probe (> 0: higher for matched finetuning beyond any"
       f" method effect). Mean [{stats.LEVEL:.0%} interval, {interval}];"
       " probe verdicts from Holm-adjusted p over every (probe, pair)."),
      "",
      "| X | i, j | seeds | I at L | I by area | p | p (Holm) | verdict |",
      "|---|---|---|---|---|---|---|---|"]
  for r in retention_rows:
    lines.append(
        f"| retention ({retention_name}) | {r.i}, {r.j} | {len(r.seeds)}"
        f" | {r.at_level.format(signed=True)}"
        f" | {r.by_area.format(signed=True)} | {_p(r.p_value)}"
        f" | {_p(r.p_holm)} | {r.verdict} (by area) |")
  for r in rows:
    lines.append(
        f"| {r.words} (`{r.probe}`) | {r.i}, {r.j} | {len(r.seeds)}"
        f" | {_fmt(r.at_level, True)} | | {_p(r.p_value)} | {_p(r.p_holm)}"
        f" | {r.verdict} |")
  return "\n".join(lines) + "\n"


def _interval_json(x: stats.Interval) -> dict[str, float]:
  return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
          for k, v in x.to_dict().items()}


def mechanism_json(rows: Sequence[pe.ProbeRow | pe.ProbeInteraction]
                   ) -> list[dict]:
  """One dict per row (either table); NaN and unbounded ends as null."""
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


def probe_plot(records: Sequence[results.EvalRecord],
               rows: Sequence[pe.ProbeRow],
               probe: str, words: str, path: str) -> str:
  """Per base: each method's probe at L (seed dots, mean and interval)."""
  # deferred: matplotlib takes ~1 s to import; only drawing needs it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # deferred: after use("Agg"); pylint: disable=g-import-not-at-top
  from optconsist_jax.report import plots  # deferred: imports matplotlib; pylint: disable=g-import-not-at-top
  mine = [r for r in rows if r.probe == probe]
  bases = sorted({r.base for r in mine})
  runs = pe.runs_of(records)
  fig, axes = plt.subplots(1, max(len(bases), 1),
                           figsize=(3.8 * max(len(bases), 1) + 0.5, 3.6),
                           squeeze=False)
  for ax, base in zip(axes[0], bases):
    level = mine[[r.base for r in mine].index(base)].level
    methods = sorted({m for (b, m, _) in runs if b == base},
                     key=lambda m: (m != base, m))
    colour = plots.colours(methods)
    for i, m in enumerate(methods):
      vals = [pe.probe_at_level(recs, probe, level)
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
    ax.set_xticklabels([f"{m}\n({consistency.role_of(m, base)})"
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

  mechanism.json holds the gap table's rows, mechanism_interactions.json
  the probes' interactions. The eval items are resampled as the
  consistency tables do (with the t interval; the same draws, so the
  retention interaction is the Interaction table's). Returns {} when no
  record carries a probe (probes off).
  """
  probes = pe.probe_names(records) if probes is None else list(probes)
  if not probes:
    return {}
  resampled = (resample.item_resamples(records) if interval == "t"
               else None)
  items = resampled if resampled is not None else "off"
  rows = pe.mechanism_table(records, probes, items=items, method=interval)
  if not rows:
    return {}
  inter = pe.probe_interactions(records, probes, items=items,
                                method=interval)
  retention_inter = consistency.interactions(records, items=items,
                                             method=interval)
  retention_name = ", ".join(sorted({r.retention_metric for r in records}))
  paths = {"mechanism_json": os.path.join(out_dir, "mechanism.json"),
           "mechanism_interactions_json": os.path.join(
               out_dir, "mechanism_interactions.json")}
  if summary_path is not None:
    with open(summary_path, "a") as f:
      f.write("\n" + mechanism_markdown(
          rows, retention_name, interval, inter, retention_inter,
          resample.covers_note(records, resampled, interval)))
  with open(paths["mechanism_json"], "w") as f:
    json.dump(mechanism_json(rows), f, indent=2, allow_nan=False)
  with open(paths["mechanism_interactions_json"], "w") as f:
    json.dump(mechanism_json(inter), f, indent=2, allow_nan=False)
  for probe, words in probes:
    name = re.sub(r"[^A-Za-z0-9]+", "_", probe.removeprefix("probe/"))
    paths[f"mechanism_{name}"] = probe_plot(
        records, rows, probe, words,
        os.path.join(out_dir, "mechanism", f"{name}.png"))
  return paths
