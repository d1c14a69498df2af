"""The memorization experiment's summary and curves, over seeds.

`summarize` reads the scores of `experiments.memorization` at its last epoch:
per optimizer the mean and 95% interval over seeds, and each optimizer minus
the first paired by seed with the verdict its interval supports
(`report.statistics`); `plot` draws the curves per epoch (mean over
seeds, the interval as a band).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

import numpy as np

from optconsist_jax.report import statistics

SUMMARY = "summary"  # summary.md and summary.json
BASE = "base"  # The `optimizer` of the epoch-0 line (the base model).

# (metric, what a higher value of "other - first" means, what a lower one).
SCORES = (
    ("memorization_answer_logprob", "memorizes more", "memorizes less"),
    ("memorization_logprob", "memorizes more", "memorizes less"),
    ("memorization_acc", "memorizes more", "memorizes less"),
    ("rule_logprob", "learns the rule better", "learns the rule worse"),
    ("rule_acc", "learns the rule better", "learns the rule worse"),
)


def _seed(r: dict[str, Any]) -> int:
  return int(r.get("seed", 0))


def summarize(results: Sequence[dict[str, Any]], optimizers: Sequence[str]
              ) -> list[dict[str, Any]]:
  """Each score at the last epoch: per optimizer, and vs the first optimizer.

  One row per (score, optimizer other than the first): both optimizers' mean
  and 95% interval over seeds, the gap `other - first` paired by seed, and
  the verdict the gap's interval supports (`statistics.describe`).
  """
  last = max(r["epoch"] for r in results)
  rows = [r for r in results if r["epoch"] == last and r["optimizer"] != BASE]
  first, others = optimizers[0], optimizers[1:]
  out = []
  for metric, above, below in SCORES:
    for other in others:
      a, b, gap = statistics.compare_groups(rows, "optimizer", metric, other,
                                            first)
      out.append({
          "metric": metric, "epoch": last, "first": first, "other": other,
          "first_interval": b.to_dict(),
          "other_interval": a.to_dict(),
          "gap": gap.to_dict(),
          "verdict": statistics.describe(gap, f"{other} {above}",
                                         f"{other} {below}")})
  return out


def fmt(iv: dict[str, Any]) -> str:
  return statistics.Interval(**iv).format()


def write_summary(summary: Sequence[dict[str, Any]], root: str) -> str:
  """W/memorization/summary.json and summary.md; returns the .md path."""
  with open(os.path.join(root, SUMMARY + ".json"), "w",
            encoding="utf-8") as f:
    json.dump(list(summary), f, indent=2)
  lines = []
  if summary:
    s0 = summary[0]
    n = s0["gap"]["n"]
    lines += [
        f"Memorization vs rule at epoch {s0['epoch']}: mean and 95% interval"
        f" over {n} seeds; gap = other - {s0['first']}, paired by seed.", "",
        f"| score | {s0['first']} | other | other's score | gap | verdict |",
        "|---|---|---|---|---|---|"]
    for s in summary:
      lines.append(f"| {s['metric']} | {fmt(s['first_interval'])} |"
                   f" {s['other']} | {fmt(s['other_interval'])} |"
                   f" {fmt(s['gap'])} | {s['verdict']} |")
  path = os.path.join(root, SUMMARY + ".md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def plot(results: Sequence[dict[str, Any]], out_path: str) -> str:
  """Accuracy and gold log-probability vs epoch per optimizer (mean, band)."""
  # deferred: matplotlib is slow to import; only plots need it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  # deferred: pyplot after the Agg backend is chosen.
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  base = [r for r in results if r["optimizer"] == BASE]
  names = sorted({r["optimizer"] for r in results} - {BASE})
  n_seeds = len({_seed(r) for r in results if r["optimizer"] != BASE})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

  def curve(ax, name, metric, style, color, label):
    rows = [r for r in results if r["optimizer"] == name]
    ivs = statistics.intervals_by(rows, ("epoch",), metric)
    epochs = [0] + [e for (e,) in ivs]
    base_value = [base[0][metric]] if base else []
    if not base:
      epochs = epochs[1:]
    mean = np.array(base_value + [iv.mean for iv in ivs.values()])
    lo = np.array(base_value + [iv.lo for iv in ivs.values()])
    hi = np.array(base_value + [iv.hi for iv in ivs.values()])
    if metric.endswith("_acc"):  # a fraction: the band stays in [0, 1]
      lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    ax.plot(epochs, mean, style, color=color, label=label)
    if n_seeds > 1:
      ax.fill_between(epochs, lo, hi, color=color, alpha=0.15, lw=0)

  for i, name in enumerate(names):
    color = colors[i % len(colors)]
    for ax, metric in zip(axes, ("acc", "logprob")):
      curve(ax, name, f"memorization_{metric}", "-o", color,
            f"{name}: memorization (train facts)")
      curve(ax, name, f"rule_{metric}", "--s", color,
            f"{name}: rule (held-out problems)")
    curve(axes[2], name, "memorization_answer_logprob", "-o", color,
          f"{name}: memorization")
  axes[0].set_ylabel("greedy accuracy (higher is better)")
  axes[1].set_ylabel("gold response log-prob per token (nats)")
  axes[2].set_ylabel("fact answer log-prob (nats, sum over the number)")
  for ax in axes:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("finetuning epoch (0 = base)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, title="finetuning optimizer", title_fontsize=7)
  axes[2].legend(fontsize=7, title="finetuning optimizer", title_fontsize=7)
  band = (f"; mean over {n_seeds} seeds, band = 95% interval"
          if n_seeds > 1 else "")
  fig.suptitle("Memorization (training facts) vs rule (held-out problems)"
               + band)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path
