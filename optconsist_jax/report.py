r"""Learning/forgetting Pareto plot and table across runs.

  python -m optconsist_jax.report W1 W2 ... --out DIR [--x METRIC] [--y METRIC]

Reads `W/eval/results.jsonl` of every workdir (the eval job's output, one
`EvalRecord` per line, schema below), draws one point per evaluated
checkpoint at x = retention, y = learning (marker size by epoch, colour by
finetuning method, marker shape by the base model's pretraining optimizer, the
base models as stars), the non-dominated frontier over all points, and writes
DIR/pareto.png, DIR/pareto.svg and DIR/pareto.md (a markdown table).
Layout follows Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"),
Fig. 1: one dot per (run, epoch), bigger dots for more epochs.

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
import sys
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

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


_FIELD_TYPES = {
    "step": (int,), "epoch": (int, float), "method": (str,), "base": (str,),
    "lr": (int, float), "learning": (int, float), "retention": (int, float),
    "learning_metric": (str,), "retention_metric": (str,), "metrics": (dict,),
    "run": (str,), "checkpoint": (str,), "is_base": (bool,),
    "settings": (dict,),
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


_METHOD_COLOURS = {"adamw": "tab:blue", "muon": "tab:red",
                   "lora": "tab:green", "base": "black"}
# Marker shape = peak learning rate (in increasing order of LR).
_LR_MARKERS = ["o", "^", "s", "D", "v", "P", "X", "<", ">"]
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


def _colours(methods: Sequence[str]) -> dict[str, str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  cycle = matplotlib.colormaps["tab10"].colors
  out, spare = {}, [c for c in cycle]
  for m in methods:
    out[m] = _METHOD_COLOURS.get(m.lower()) or spare[len(out) % len(spare)]
  return out


def _marker_size(epoch: float, max_epoch: float) -> float:
  return 30 + 170 * epoch / max_epoch


def make_report(records: Sequence[EvalRecord], out_dir: str, *,
                x_metric: str | None = None, y_metric: str | None = None,
                title: str = "") -> dict[str, str]:
  """Writes the plot (PNG, SVG) and the table; returns their paths.

  One panel per base model (its own Pareto frontier), sharing both axes.
  Colour = finetuning method, marker shape = peak LR, marker size = epochs,
  black outline = on that base's frontier, star = the base model itself.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  if not records:
    raise ValueError("report: no evaluated checkpoints to plot")
  xs = [_value(r, x_metric, "retention") for r in records]
  ys = [_value(r, y_metric, "learning") for r in records]
  x_name = x_metric or _common(r.retention_metric for r in records)
  y_name = y_metric or _common(r.learning_metric for r in records)
  maximize = (not (x_metric and lower_is_better(x_metric)),
              not (y_metric and lower_is_better(y_metric)))
  bases = sorted({r.base for r in records})
  # The frontier is per base: runs from different bases are not comparable
  # points of one trade-off.
  fronts = {}
  for b in bases:
    idx = [i for i, r in enumerate(records) if r.base == b]
    fronts[b] = [idx[k] for k in pareto_frontier(
        [(xs[i], ys[i]) for i in idx], maximize)]
  on_front = {i for f in fronts.values() for i in f}

  methods = sorted({r.method for r in records if not r.is_base})
  colours = _colours(methods)
  lrs = sorted({r.lr for r in records if not r.is_base})
  lr_marker = {lr: _LR_MARKERS[i % len(_LR_MARKERS)]
               for i, lr in enumerate(lrs)}
  max_epoch = max([r.epoch for r in records] + [1e-9])

  fig, axes = plt.subplots(1, len(bases), figsize=(4.6 * len(bases) + 2.6, 5),
                           sharex=True, sharey=True, squeeze=False)
  for ax, b in zip(axes[0], bases):
    runs: dict[str, list[int]] = {}
    for i, r in enumerate(records):
      if r.base == b and not r.is_base:
        runs.setdefault(r.run, []).append(i)
    for idx in runs.values():
      idx = sorted(idx, key=lambda i: records[i].step)
      ax.plot([xs[i] for i in idx], [ys[i] for i in idx], "-", lw=0.8,
              alpha=0.35, color=colours[records[idx[0]].method], zorder=1)
    for i, r in enumerate(records):
      if r.base != b:
        continue
      if r.is_base:
        ax.scatter(xs[i], ys[i], marker="*", s=260, color="black", zorder=4,
                   edgecolors="white", linewidths=0.5)
        ax.annotate("base model", (xs[i], ys[i]), textcoords="offset points",
                    xytext=(8, -4), fontsize=8)
      else:
        ax.scatter(xs[i], ys[i], marker=lr_marker[r.lr],
                   s=_marker_size(r.epoch, max_epoch), color=colours[r.method],
                   alpha=0.85,
                   edgecolors="black" if i in on_front else "none",
                   linewidths=1.2, zorder=3)
    front = fronts[b]
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--",
            color="gray", lw=1.2, zorder=2)
    ax.set_title(f"base pretrained with {b}" if len(bases) > 1
                 else (title or f"base pretrained with {b}"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.1)
    ax.set_xlabel(axis_title("Retention", x_name, maximize[0]), fontsize=8)
  axes[0][0].set_ylabel(axis_title("Learning", y_name, maximize[1]),
                        fontsize=8)
  if not maximize[0]:
    axes[0][0].invert_xaxis()
  if not maximize[1]:
    axes[0][0].invert_yaxis()

  # Legends, right of the panels: colour, shape, size, outline/line/star.
  def dot(**kw):
    kw.setdefault("marker", "o")
    kw.setdefault("color", "gray")
    return Line2D([], [], linestyle="none", **kw)
  groups = [
      ("finetuning method", [dot(color=colours[m], markersize=8)
                             for m in methods], methods),
      ("peak learning rate", [dot(marker=lr_marker[lr], markersize=8)
                              for lr in lrs], [f"{lr:g}" for lr in lrs]),
  ]
  epochs = sorted({r.epoch for r in records if not r.is_base})
  if epochs:
    shown = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
    groups.append(("epochs (marker size)",
                   [dot(markersize=_marker_size(e, max_epoch) ** 0.5)
                    for e in shown], [f"{e:g}" for e in shown]))
  key = [dot(markeredgecolor="black", markeredgewidth=1.2, markersize=8),
         Line2D([], [], color="gray", linestyle="--")]
  key_labels = ["outlined: on the frontier", "Pareto frontier" + (
      " (per base)" if len(bases) > 1 else "")]
  if any(r.is_base for r in records):
    key.append(dot(marker="*", color="black", markersize=13))
    key_labels.append("base model (before finetuning)")
  groups.append(("key", key, key_labels))
  y = 1.0
  for group_title, handles, labels in groups:
    leg = fig.legend(handles, labels, title=group_title, fontsize=8,
                     title_fontsize=8, loc="upper left",
                     bbox_to_anchor=(1.0 - 2.4 / fig.get_figwidth(), y),
                     frameon=False, alignment="left")
    y -= (len(labels) + 1.6) * 0.045
    del leg
  if len(bases) > 1:
    fig.suptitle(title or "Learning vs. retention per base model",
                 fontsize=11)
  fig.tight_layout(rect=(0, 0, 1.0 - 2.5 / fig.get_figwidth(), 1))
  os.makedirs(out_dir, exist_ok=True)
  paths = {"png": os.path.join(out_dir, "pareto.png"),
           "svg": os.path.join(out_dir, "pareto.svg"),
           "md": os.path.join(out_dir, "pareto.md")}
  fig.savefig(paths["png"], dpi=150)
  fig.savefig(paths["svg"])
  plt.close(fig)
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
  lines = [f"| run | method | base | lr | step | epoch | {x_name} (retention)"
           f" | {y_name} (learning) | frontier |",
           "|---|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(records):
    lines.append(
        f"| {r.run}{' (base)' if r.is_base else ''} | {r.method} | {r.base}"
        f" | {r.lr:g} | {r.step} | {r.epoch:g} | {xs[i]:.4f} | {ys[i]:.4f}"
        f" | {'yes' if i in on_front else ''} |")
  return "\n".join(lines) + "\n"


def best_retention_at(records: Sequence[EvalRecord], level: float) -> float:
  """Best retention among points that learned at least `level` (-inf if none)."""
  vals = [r.retention for r in records if r.learning >= level]
  return max(vals) if vals else -math.inf


@dataclasses.dataclass(frozen=True)
class MethodSummary:
  """One finetuning method on one base (a row of the consistency table).

  Attributes:
    base: the base model's pretraining optimizer.
    method: finetuning method.
    role: "matched" (same optimizer as pretraining), "mismatched" or "lora".
    points: evaluated checkpoints.
    best_learning: highest learning score over LRs and epochs.
    retention_at_best: retention of that checkpoint.
    gap_vs_matched: mean over this method's points of (best retention the
      matched method reaches at that point's learning level or above) minus
      (this point's retention); > 0 means matched forgot less at equal
      learning; NaN where matched never learned that much, and for matched
      itself.
    compared: how many of this method's points entered the mean.
  """

  base: str
  method: str
  role: str
  points: int
  best_learning: float
  retention_at_best: float
  gap_vs_matched: float
  compared: int


def role_of(method: str, base: str) -> str:
  if method.lower() == "lora":
    return "lora"
  return "matched" if method == base else "mismatched"


def consistency_summary(records: Sequence[EvalRecord]) -> list[MethodSummary]:
  """Matched vs mismatched vs LoRA at equal learning, per base model.

  The paper's claim is that full finetuning with the pretraining optimizer
  (matched) sits on the upper right of the learning/forgetting plane. For each
  point of another method we ask how much retention the matched method keeps
  among its checkpoints that learned at least as much, and average the
  difference (headline learning and retention, both higher-is-better).
  """
  out = []
  for base in sorted({r.base for r in records}):
    finetuned = [r for r in records if r.base == base and not r.is_base]
    matched = [r for r in finetuned if r.method == base]
    for method in sorted({r.method for r in finetuned}):
      pts = [r for r in finetuned if r.method == method]
      best = max(pts, key=lambda r: (r.learning, r.retention))
      gaps = []
      if method != base and matched:
        for r in pts:
          ref = best_retention_at(matched, r.learning)
          if ref > -math.inf:
            gaps.append(ref - r.retention)
      out.append(MethodSummary(
          base=base, method=method, role=role_of(method, base),
          points=len(pts), best_learning=best.learning,
          retention_at_best=best.retention,
          gap_vs_matched=(sum(gaps) / len(gaps)) if gaps else math.nan,
          compared=len(gaps)))
  return out


def consistency_markdown(summary: Sequence[MethodSummary],
                         learning_name: str, retention_name: str) -> str:
  """The summary as a markdown table plus one verdict line per base."""
  lines = [f"Learning = {learning_name}; retention = {retention_name} (both"
           " higher is better). Gap = matched's best retention at equal or"
           " higher learning minus this method's, averaged over this"
           " method's checkpoints (> 0: matched forgot less).", "",
           "| base | method | role | points | best learning | retention at"
           " best | gap vs matched (points compared) |",
           "|---|---|---|---|---|---|---|"]
  for s in summary:
    gap = ("" if math.isnan(s.gap_vs_matched)
           else f"{s.gap_vs_matched:+.4f} ({s.compared})")
    lines.append(f"| {s.base} | {s.method} | {s.role} | {s.points} |"
                 f" {s.best_learning:.4f} | {s.retention_at_best:.4f} |"
                 f" {gap} |")
  lines.append("")
  for base in sorted({s.base for s in summary}):
    others = [s for s in summary if s.base == base and s.role != "matched"
              and not math.isnan(s.gap_vs_matched)]
    if not any(s.base == base and s.role == "matched" for s in summary):
      lines.append(f"- {base} base: no matched run to compare.")
      continue
    if not others:
      lines.append(f"- {base} base: no other method reached a learning level"
                   " the matched run also reached; no comparison at equal"
                   " learning.")
      continue
    verdicts = ", ".join(
        f"{'less' if s.gap_vs_matched > 0 else 'more' if s.gap_vs_matched < 0 else 'as much'}"
        f" than {s.method} ({s.gap_vs_matched:+.4f})" for s in others)
    lines.append(f"- {base} base: matched finetuning ({base}) forgot"
                 f" {verdicts} at equal learning.")
  return "\n".join(lines) + "\n"


def consistency_report(workdirs: Sequence[str], out_dir: str
                       ) -> dict[str, str]:
  """Per-base Pareto plots, an all-runs plot, and the consistency table."""
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
  summary = consistency_summary(records)
  text = consistency_markdown(
      summary, _common(r.learning_metric for r in records),
      _common(r.retention_metric for r in records))
  paths["summary"] = os.path.join(out_dir, "summary.md")
  with open(paths["summary"], "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump([dataclasses.asdict(s) for s in summary], f, indent=2)
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m optconsist_jax.report",
      description="Pareto plot (learning vs. retention) and table across"
      " runs, from each W/eval/results.jsonl.")
  p.add_argument("workdirs", nargs="+", help="run directories W")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--x", default=None, help="retention metric (a key of each"
                 " record's `metrics`; default: the headline `retention`)")
  p.add_argument("--y", default=None, help="learning metric (default: the"
                 " headline `learning`)")
  p.add_argument("--title", default="")
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
    except EvalFileError as e:
      raise errors.UserError(str(e)) from e
  print(f"{len(records)} points from {len(args.workdirs)} workdirs ->"
        f" {', '.join(paths.values())}")
  return 0


if __name__ == "__main__":
  from optconsist_jax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main, absl=False)
