"""Learning/forgetting Pareto plot, tables and the consistency summary across runs.

One point per evaluated checkpoint at x = retention, y = learning (marker
size by epoch, colour by finetuning method, marker shape by the base model's
pretraining optimizer, the base models as stars), the non-dominated frontier
over all points: DIR/pareto.png, DIR/pareto.svg and DIR/pareto.md (a markdown
table). Layout follows Biderman et al. 2024 ("LoRA Learns Less and Forgets
Less"), Fig. 1: one dot per (run, epoch), bigger dots for more epochs. Then
`write_consistency`: matched vs the other methods at equal learning, mean
with a 95% interval over seeds and a verdict per base (DIR/summary.md,
frontiers.png, gaps.png; report/consistency.py), and with >= 3 pretraining
optimizers the consistency matrix (DIR/matrix.*). Figures are drawn by
report/plots.py; the schema of the eval records is
optconsist_jax.evaluate.results.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os

from optconsist_jax import storage
from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import consistency_markdown as markdown
from optconsist_jax.report import matrix as matrix_lib
from optconsist_jax.report import mechanism
from optconsist_jax.report import plots as report_plots
from optconsist_jax.report import resample
from optconsist_jax.report import statistics

def _value(r: results.EvalRecord, metric: str | None, headline: str) -> float:
  if metric is None:
    return getattr(r, headline)
  if metric not in r.metrics:
    raise results.EvalFileError(f"run {r.run} step {r.step}: no metric {metric!r};"
                        f" has {sorted(r.metrics)}")
  return float(r.metrics[metric])


# Metric name -> (words, unit) for axis titles; see evaluate.py for the names.
def make_report(records: Sequence[results.EvalRecord], out_dir: str, *,
                x_metric: str | None = None, y_metric: str | None = None,
                title: str = "") -> dict[str, str]:
  """Writes the Pareto plot (PNG, SVG) and the table; returns their paths.

  One panel per base model (its own Pareto frontier), sharing both axes
  (`report_plots.pareto_plot` says what the marks mean).
  """
  if not records:
    raise ValueError("report: no evaluated checkpoints to plot")
  xs = [_value(r, x_metric, "retention") for r in records]
  ys = [_value(r, y_metric, "learning") for r in records]
  x_name = x_metric or _common(r.retention_metric for r in records)
  y_name = y_metric or _common(r.learning_metric for r in records)
  maximize = (not (x_metric and results.lower_is_better(x_metric)),
              not (y_metric and results.lower_is_better(y_metric)))
  # The frontier is per base: runs from different bases are not comparable
  # points of one trade-off.
  fronts = {}
  for b in sorted({r.base for r in records}):
    idx = [i for i, r in enumerate(records) if r.base == b]
    fronts[b] = [idx[k] for k in results.pareto_frontier(
        [(xs[i], ys[i]) for i in idx], maximize)]
  on_front = {i for f in fronts.values() for i in f}
  paths = {"png": os.path.join(out_dir, "pareto.png"),
           "svg": os.path.join(out_dir, "pareto.svg"),
           "md": os.path.join(out_dir, "pareto.md")}
  report_plots.pareto_plot(records, xs, ys, fronts, maximize, x_name, y_name,
                           title, [paths["png"], paths["svg"]])
  with open(paths["md"], "w") as f:
    f.write(markdown_table(records, xs, ys, on_front, x_name, y_name))
  return paths


def _common(names) -> str:
  names = sorted(set(names))
  return names[0] if len(names) == 1 else " / ".join(names)


def markdown_table(records: Sequence[results.EvalRecord], xs: Sequence[float],
                   ys: Sequence[float], on_front: set[int], x_name: str,
                   y_name: str) -> str:
  """One row per evaluated checkpoint; frontier points marked."""
  lines = [f"| run | method | base | lr | seed | step | epoch | {x_name}"
           f" (retention) | {y_name} (learning) | frontier |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(records):
    lines.append(
        f"| {r.run}{' (base)' if r.is_base else ''} | {r.method} | {r.base}"
        f" | {r.lr:g} | {r.seed} | {r.step} | {r.epoch:g} | {xs[i]:.4f}"
        f" | {ys[i]:.4f}"
        f" | {'yes' if i in on_front else ''} |")
  return "\n".join(lines) + "\n"


def headline_records(records: Sequence[results.EvalRecord],
                     x_metric: str | None = None,
                     y_metric: str | None = None) -> list[results.EvalRecord]:
  """Records whose learning/retention are the chosen metrics, higher-better.

  A loss-like metric (`results.lower_is_better`) enters negated, named "-metric",
  so the consistency statistics see the same axes the plot shows.
  """
  out = []
  for r in records:
    kw = {}
    for field, metric in (("retention", x_metric), ("learning", y_metric)):
      if metric is not None:
        sign = -1.0 if results.lower_is_better(metric) else 1.0
        kw[field] = sign * _value(r, metric, field)
        kw[f"{field}_metric"] = ("-" if sign < 0 else "") + metric
    out.append(dataclasses.replace(r, **kw) if kw else r)
  return out


MATRIX_MODES = ("auto", "always", "never")
# "auto" draws the matrix from this many pretraining optimizers on.
MATRIX_MIN_BASES = 3


def write_consistency(records: Sequence[results.EvalRecord], out_dir: str, *,
                      matrix: str = "auto",
                      interval: str | None = None,
                      grid_note: str = "") -> dict[str, str]:
  """Matched vs the rest at equal learning, with intervals over seeds.

  Writes out_dir/summary.md (+ .json: the per-base gaps, by area and at
  L, and the consistency interactions; `report.consistency`), frontiers.png (mean frontier per base with its band and every seed's points), gaps.png (the gap vs matched
  per base and method, with its verdict) and, with >= MATRIX_MIN_BASES
  pretraining optimizers (`matrix="auto"`) or `matrix="always"`,
  matrix.md (+ .json, .png, .svg). `interval`: a method of
  `report.statistics.METHODS` (None: its DEFAULT_METHOD). `grid_note`:
  a sentence for summary.md on how the learning-rate grid was made (the
  reproduction's refinement; experiments/refine.py). Returns the paths.
  """
  interval = interval or statistics.DEFAULT_METHOD
  if interval not in statistics.METHODS:
    raise ValueError(f"report: interval={interval!r}; expected one of"
                     f" {statistics.METHODS}")
  if matrix not in MATRIX_MODES:
    raise ValueError(f"report: matrix={matrix!r}; expected one of"
                     f" {MATRIX_MODES}")
  if not any(not r.is_base for r in records):
    raise ValueError("report: no finetuned checkpoints to compare")
  os.makedirs(out_dir, exist_ok=True)
  learning_name = _common(r.learning_metric for r in records)
  retention_name = _common(r.retention_metric for r in records)
  # One set of eval-item resamples for every table (hierarchical intervals
  # with the t method; report/resample.py).
  resampled = (resample.item_resamples(records) if interval == "t"
               else None)
  items = resampled if resampled is not None else "off"
  summary = consistency.consistency_summary(records, items=items,
                                            method=interval)
  interaction_rows = consistency.interactions(records, items=items,
                                              method=interval)
  variance = resample.covers_note(records, resampled, interval)
  paths = {"summary": os.path.join(out_dir, "summary.md"),
           "summary_json": os.path.join(out_dir, "summary.json")}
  with open(paths["summary"], "w") as f:
    f.write(markdown.consistency_markdown(
        summary, learning_name, retention_name, interval,
        interaction_rows=interaction_rows, variance=variance,
        grid_note=grid_note))
  with open(paths["summary_json"], "w") as f:
    json.dump(markdown.summary_json(summary, interaction_rows), f,
              indent=2, allow_nan=False)
  paths["frontiers"] = report_plots.frontier_plot(
      records, summary, retention_name, learning_name,
      os.path.join(out_dir, "frontiers.png"))
  paths["gaps"] = report_plots.gap_plot(
      summary, learning_name, retention_name,
      os.path.join(out_dir, "gaps.png"), interval)
  # The update probes at equal learning, when the records carry them.
  paths.update(mechanism.write(records, out_dir,
                               summary_path=paths["summary"],
                               interval=interval))
  bases = {r.base for r in records if not r.is_base}
  if matrix == "always" or (matrix == "auto"
                            and len(bases) >= MATRIX_MIN_BASES):
    rows = matrix_lib.consistency_matrix(records, items=items,
                                         method=interval)
    for kind in ("md", "json", "png", "svg"):
      paths[f"matrix_{kind}"] = os.path.join(out_dir, f"matrix.{kind}")
    with open(paths["matrix_md"], "w") as f:
      f.write(matrix_lib.matrix_markdown(rows, retention_name, interval,
                                          variance))
    with open(paths["matrix_json"], "w") as f:
      json.dump(matrix_lib.matrix_json(rows), f, indent=2, allow_nan=False)
    report_plots.matrix_plot(rows, retention_name,
                             [paths["matrix_png"], paths["matrix_svg"]])
  return paths


def consistency_report(workdirs: Sequence[str], out_dir: str, *,
                       matrix: str = "auto",
                       interval: str | None = None,
                       grid_note: str = "") -> dict[str, str]:
  """Per-base Pareto plots, an all-runs plot and `write_consistency`."""
  records = []
  for w in workdirs:
    records.extend(results.read_workdir(w))
  with storage.output_dir(out_dir) as out:
    paths = _consistency_report(records, out, matrix=matrix,
                                interval=interval, grid_note=grid_note)
    # Where they end up (out is a local stand-in for a bucket out_dir).
    return {k: storage.join(out_dir, *os.path.relpath(p, out).split(os.sep))
            for k, p in paths.items()}


def _consistency_report(records: list[results.EvalRecord], out_dir: str, *,
                        matrix: str, interval: str | None,
                        grid_note: str = "") -> dict[str, str]:
  paths = {}
  for base in sorted({r.base for r in records}):
    sub = [r for r in records if r.base == base]
    for kind, path in make_report(
        sub, os.path.join(out_dir, f"{base}_base"),
        title=f"Base pretrained with {base}: learning vs. retention").items():
      paths[f"{base}_base_{kind}"] = path
  for kind, path in make_report(records, os.path.join(out_dir, "all")).items():
    paths[f"all_{kind}"] = path
  paths.update(write_consistency(records, out_dir, matrix=matrix,
                                 interval=interval, grid_note=grid_note))
  return paths
