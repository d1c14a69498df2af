r"""Learning/forgetting Pareto plot, tables and intervals across runs.

  python -m optconsist_jax.report W1 W2 ... --out DIR [--x METRIC] [--y METRIC]
      [--matrix auto|always|never] [--interval t|percentile|studentized]

Reads `W/eval/results.jsonl` of every workdir (the eval job's output, one
`EvalRecord` per line, schema below), draws one point per evaluated
checkpoint at x = retention, y = learning (marker size by epoch, colour by
finetuning method, marker shape by the base model's pretraining optimizer, the
base models as stars), the non-dominated frontier over all points, and writes
DIR/pareto.png, DIR/pareto.svg and DIR/pareto.md (a markdown table).
Layout follows Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"),
Fig. 1: one dot per (run, epoch), bigger dots for more epochs. Then
`write_consistency`: matched vs the other methods at equal learning, mean
with a 95% interval over seeds (`--interval`) and a verdict per base
(DIR/summary.md, frontiers.png, gaps.png; experiments/consistency.py), and
with >= 3 pretraining optimizers the consistency matrix (DIR/matrix.*).
Figures are drawn by report_plots.py.

This module owns the schema of W/eval/results.jsonl; optconsist_jax.evaluate
writes it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import json
import math
import os
from typing import Any

from optconsist_jax import paths as paths_lib

RESULTS_FILE = os.path.join("eval", "results.jsonl")


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """One evaluated checkpoint: a line of W/eval/results.jsonl.

  Attributes:
    step: training step of the checkpoint (0 for a base model).
    epoch: epochs completed at that step (fractional between epoch ends).
    method: finetuning method: "adamw", "muon", "lora", ... ("base" for an
      untouched base model).
    base: the base model's pretraining optimizer ("adamw", "muon", ...).
    lr: peak learning rate of the run (0 for a base model).
    learning: headline learning score, higher is better (e.g. GSM8K acc).
    retention: headline retention score, higher is better (e.g. the mean
      multiple-choice accuracy, or minus the held-out LM loss).
    learning_metric: the name of the headline learning metric.
    retention_metric: the name of the headline retention metric.
    metrics: every metric of this evaluation, name -> value.
    run: run name (default: the workdir's name).
    checkpoint: the checkpoint (or Hugging Face folder) evaluated.
    is_base: this is the starting point of the runs, not a finetuned model.
    settings: how the scores were made (e.g. whether contexts started with
      BOS, the lm-evaluation-harness version and tasks).
    seed: the run's seed (`train.seed`); runs that differ only in seed are
      the replicates the report's intervals are over.
  """

  step: int
  epoch: float
  method: str
  base: str
  lr: float
  learning: float
  retention: float
  learning_metric: str = "learning"
  retention_metric: str = "retention"
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  run: str = ""
  checkpoint: str = ""
  is_base: bool = False
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


_FIELD_TYPES = {
    "step": (int,), "epoch": (int, float), "method": (str,), "base": (str,),
    "lr": (int, float), "learning": (int, float), "retention": (int, float),
    "learning_metric": (str,), "retention_metric": (str,), "metrics": (dict,),
    "run": (str,), "checkpoint": (str,), "is_base": (bool,),
    "settings": (dict,), "seed": (int,),
}
REQUIRED_FIELDS = tuple(
    f.name for f in dataclasses.fields(EvalRecord)
    if f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING)


class EvalFileError(ValueError):
  """A results file (or one of its lines) does not follow the schema."""


def parse_record(d: Any, where: str) -> EvalRecord:
  """Validates one decoded JSON line; `where` is "file:line" for errors."""
  if not isinstance(d, dict):
    raise EvalFileError(f"{where}: expected a JSON object, got"
                        f" {type(d).__name__}")
  missing = [k for k in REQUIRED_FIELDS if k not in d]
  if missing:
    raise EvalFileError(f"{where}: missing fields {missing} (required:"
                        f" {list(REQUIRED_FIELDS)})")
  unknown = sorted(set(d) - set(_FIELD_TYPES))
  if unknown:
    raise EvalFileError(f"{where}: unknown fields {unknown}; known:"
                        f" {sorted(_FIELD_TYPES)}")
  for key, value in d.items():
    types = _FIELD_TYPES[key]
    # bool is an int in Python; only is_base may be one.
    if not isinstance(value, types) or (isinstance(value, bool)
                                        and bool not in types):
      raise EvalFileError(
          f"{where}: field {key!r} must be"
          f" {' or '.join(t.__name__ for t in types)}, got {value!r}")
  bad = sorted(k for k, v in d.get("metrics", {}).items()
               if v is not None and (isinstance(v, bool)
                                     or not isinstance(v, (int, float))))
  if bad:
    raise EvalFileError(f"{where}: metrics {bad} are not numbers")
  for key in ("learning", "retention", "epoch", "lr"):
    if not math.isfinite(d[key]):
      raise EvalFileError(f"{where}: field {key!r} is {d[key]!r}")
  return EvalRecord(**d)


def read_results(path: str) -> list[EvalRecord]:
  """Every record of one results.jsonl (blank lines skipped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no eval results (run"
                            " `python -m optconsist_jax.evaluate` first)")
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalFileError(f"{path}:{n}: not JSON: {e}") from None
      out.append(parse_record(d, f"{path}:{n}"))
  return out


def read_workdir(workdir: str) -> list[EvalRecord]:
  """Records of W/eval/results.jsonl, run name filled, last one per step."""
  records = read_results(os.path.join(workdir, RESULTS_FILE))
  name = os.path.basename(os.path.normpath(workdir))
  latest: dict[tuple[str, int, bool, str], EvalRecord] = {}
  for r in records:
    if not r.run:
      r = dataclasses.replace(r, run=name)
    # A checkpoint evaluated twice (a rerun after a crash): keep the latest.
    latest[(r.run, r.step, r.is_base, r.checkpoint)] = r
  return sorted(latest.values(), key=lambda r: (r.run, not r.is_base, r.step))


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
  """a is at least as good as b in both coordinates and better in one."""
  return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_frontier(points: Sequence[tuple[float, float]],
                    maximize: tuple[bool, bool] = (True, True)) -> list[int]:
  """Indices of the non-dominated points, sorted by x.

  Args:
    points: (x, y) pairs.
    maximize: per coordinate, whether larger is better.

  Returns:
    The indices of points no other point dominates (equal points are all
    kept), ordered by increasing x (then y).
  """
  sign = tuple(1.0 if m else -1.0 for m in maximize)
  pts = [(sign[0] * x, sign[1] * y) for x, y in points]
  keep = [i for i, p in enumerate(pts)
          if not any(dominates(q, p) for j, q in enumerate(pts) if j != i)]
  return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


def lower_is_better(metric: str) -> bool:
  """Loss-like metrics (loss, perplexity, nll) are better when smaller."""
  name = metric.lower()
  return any(k in name for k in ("loss", "perplexity", "ppl", "nll"))


def _value(r: EvalRecord, metric: str | None, headline: str) -> float:
  if metric is None:
    return getattr(r, headline)
  if metric not in r.metrics:
    raise EvalFileError(f"run {r.run} step {r.step}: no metric {metric!r};"
                        f" has {sorted(r.metrics)}")
  return float(r.metrics[metric])


# Metric name -> (words, unit) for axis titles; see evaluate.py for the names.
_METRIC_WORDS = {
    "lm_loss/loss": ("held-out LM loss", "nats/token"),
    "lm_loss/perplexity": ("held-out LM perplexity", ""),
    "math/response_loss": ("held-out finetuning loss", "nats/token"),
    "mc/mean": ("mean multiple-choice accuracy", "fraction correct"),
}


def metric_words(metric: str) -> tuple[str, str]:
  """(words, unit) of a metric name such as "-lm_loss/loss" ("" = no unit)."""
  neg = metric.startswith("-")
  name = metric[1:] if neg else metric
  parts = name.split("/")
  if name in _METRIC_WORDS:
    words, unit = _METRIC_WORDS[name]
  elif len(parts) == 3 and parts[0] == "math" and parts[2] == "acc":
    words, unit = f"math exact-match accuracy ({parts[1]})", "fraction correct"
  elif len(parts) == 3 and parts[0] == "mc" and parts[2] in ("acc",
                                                              "acc_norm"):
    words = f"{parts[1]} accuracy" + (
        " (length-normalized)" if parts[2] == "acc_norm" else "")
    unit = "fraction correct"
  else:
    words, unit = name, ""
  return ("minus " if neg else "") + words, unit


def axis_title(role: str, metric: str, higher_is_better: bool) -> str:
  """E.g. "Retention: minus held-out LM loss (nats/token; higher is better)"."""
  words, unit = metric_words(metric)
  direction = ("higher is better" if higher_is_better
               else "lower is better; axis reversed")
  return f"{role}: {words} ({unit + '; ' if unit else ''}{direction})"


def make_report(records: Sequence[EvalRecord], out_dir: str, *,
                x_metric: str | None = None, y_metric: str | None = None,
                title: str = "") -> dict[str, str]:
  """Writes the Pareto plot (PNG, SVG) and the table; returns their paths.

  One panel per base model (its own Pareto frontier), sharing both axes
  (`report_plots.pareto_plot` says what the marks mean).
  """
  from optconsist_jax import report_plots  # pylint: disable=g-import-not-at-top
  if not records:
    raise ValueError("report: no evaluated checkpoints to plot")
  xs = [_value(r, x_metric, "retention") for r in records]
  ys = [_value(r, y_metric, "learning") for r in records]
  x_name = x_metric or _common(r.retention_metric for r in records)
  y_name = y_metric or _common(r.learning_metric for r in records)
  maximize = (not (x_metric and lower_is_better(x_metric)),
              not (y_metric and lower_is_better(y_metric)))
  # The frontier is per base: runs from different bases are not comparable
  # points of one trade-off.
  fronts = {}
  for b in sorted({r.base for r in records}):
    idx = [i for i, r in enumerate(records) if r.base == b]
    fronts[b] = [idx[k] for k in pareto_frontier(
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


def markdown_table(records: Sequence[EvalRecord], xs: Sequence[float],
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


def headline_records(records: Sequence[EvalRecord],
                     x_metric: str | None = None,
                     y_metric: str | None = None) -> list[EvalRecord]:
  """Records whose learning/retention are the chosen metrics, higher-better.

  A loss-like metric (`lower_is_better`) enters negated, named "-metric",
  so the consistency statistics see the same axes the plot shows.
  """
  out = []
  for r in records:
    kw = {}
    for field, metric in (("retention", x_metric), ("learning", y_metric)):
      if metric is not None:
        sign = -1.0 if lower_is_better(metric) else 1.0
        kw[field] = sign * _value(r, metric, field)
        kw[f"{field}_metric"] = ("-" if sign < 0 else "") + metric
    out.append(dataclasses.replace(r, **kw) if kw else r)
  return out


MATRIX_MODES = ("auto", "always", "never")
# "auto" draws the matrix from this many pretraining optimizers on.
MATRIX_MIN_BASES = 3


def write_consistency(records: Sequence[EvalRecord], out_dir: str, *,
                      matrix: str = "auto",
                      interval: str | None = None) -> dict[str, str]:
  """Matched vs the rest at equal learning, with intervals over seeds.

  Writes out_dir/summary.md (+ .json), frontiers.png (mean frontier per
  base with its band and every seed's points), gaps.png (the gap vs matched
  per base and method, with its verdict) and, with >= MATRIX_MIN_BASES
  pretraining optimizers (`matrix="auto"`) or `matrix="always"`,
  matrix.md (+ .json, .png, .svg). `interval`: a method of
  `experiments.statistics.METHODS` (None: its DEFAULT_METHOD). Returns the
  paths.
  """
  from optconsist_jax import report_plots  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import consistency  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import statistics  # pylint: disable=g-import-not-at-top
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
  summary = consistency.consistency_summary(records, method=interval)
  paths = {"summary": os.path.join(out_dir, "summary.md"),
           "summary_json": os.path.join(out_dir, "summary.json")}
  with open(paths["summary"], "w") as f:
    f.write(consistency.consistency_markdown(summary, learning_name,
                                             retention_name, interval))
  with open(paths["summary_json"], "w") as f:
    json.dump(consistency.summary_json(summary), f, indent=2,
              allow_nan=False)
  paths["frontiers"] = report_plots.frontier_plot(
      records, summary, retention_name, learning_name,
      os.path.join(out_dir, "frontiers.png"))
  paths["gaps"] = report_plots.gap_plot(
      summary, learning_name, retention_name,
      os.path.join(out_dir, "gaps.png"), interval)
  bases = {r.base for r in records if not r.is_base}
  if matrix == "always" or (matrix == "auto"
                            and len(bases) >= MATRIX_MIN_BASES):
    rows = consistency.consistency_matrix(records, method=interval)
    for kind in ("md", "json", "png", "svg"):
      paths[f"matrix_{kind}"] = os.path.join(out_dir, f"matrix.{kind}")
    with open(paths["matrix_md"], "w") as f:
      f.write(consistency.matrix_markdown(rows, retention_name, interval))
    with open(paths["matrix_json"], "w") as f:
      json.dump(consistency.matrix_json(rows), f, indent=2, allow_nan=False)
    report_plots.matrix_plot(rows, retention_name,
                             [paths["matrix_png"], paths["matrix_svg"]])
  return paths


def consistency_report(workdirs: Sequence[str], out_dir: str, *,
                       matrix: str = "auto",
                       interval: str | None = None) -> dict[str, str]:
  """Per-base Pareto plots, an all-runs plot and `write_consistency`."""
  records = []
  for w in workdirs:
    records.extend(read_workdir(w))
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
                                 interval=interval))
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m optconsist_jax.report",
      description="Pareto plot (learning vs. retention) and table across"
      " runs, from each W/eval/results.jsonl, and the matched-vs-others"
      " summary with intervals over seeds.")
  p.add_argument("workdirs", nargs="+", help="run directories W")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--x", default=None, help="retention metric (a key of each"
                 " record's `metrics`; default: the headline `retention`)")
  p.add_argument("--y", default=None, help="learning metric (default: the"
                 " headline `learning`)")
  p.add_argument("--title", default="")
  p.add_argument("--matrix", choices=MATRIX_MODES, default="auto",
                 help="the pretraining x finetuning optimizer matrix (auto:"
                 f" with >= {MATRIX_MIN_BASES} pretraining optimizers)")
  p.add_argument("--interval", choices=("t", "percentile", "studentized"),
                 default=None, help="interval over seeds (default t;"
                 " optconsist_jax/experiments/statistics.py says why)")
  args = p.parse_args(argv)
  from optconsist_jax import errors  # pylint: disable=g-import-not-at-top
  args.workdirs = [paths_lib.resolve(w) for w in args.workdirs]
  args.out = paths_lib.resolve(args.out)
  records = []
  with errors.user_input():
    try:
      for w in args.workdirs:
        records.extend(read_workdir(w))
      paths = make_report(records, args.out, x_metric=args.x,
                          y_metric=args.y, title=args.title)
      if any(not r.is_base for r in records):
        paths.update(write_consistency(
            headline_records(records, args.x, args.y), args.out,
            matrix=args.matrix, interval=args.interval))
    except EvalFileError as e:
      raise errors.UserError(str(e)) from e
  names = ", ".join(os.path.relpath(p, args.out) for p in paths.values())
  print(f"{len(records)} points from {len(args.workdirs)} workdirs; outputs"
        f" in {args.out}: {names}")
  return 0


if __name__ == "__main__":
  from optconsist_jax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main, absl=False)
