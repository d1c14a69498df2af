"""The memorization experiment's summary and curves, over seeds.

`summarize` reads the scores of `experiments.memorization` at its last epoch:
per optimizer the mean and 95% interval over seeds, and each optimizer minus
the first paired by seed with the verdict its interval supports
(`report.statistics`), per learning rate both ran; `at_equal_loss` compares
the optimizers at equal training loss over their learning-rate grids (one
shared learning rate and epoch count confound memorization with how far
each optimizer got); `plot` draws the curves per epoch (mean over seeds, the
interval as a band).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

import numpy as np

from optconsist_jax.report import statistics

SUMMARY = "summary"  # summary.md and summary.json
EQUAL_LOSS = "at_equal_loss.json"
BASE = "base"  # The `optimizer` of the epoch-0 line (the base model).

# (metric, what a higher value of "other - first" means, what a lower one).
SCORES = (
    ("memorization_contrastive", "memorizes more", "memorizes less"),
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
      lrs = sorted({r.get("lr") for r in rows if r["optimizer"] == first}
                   & {r.get("lr") for r in rows if r["optimizer"] == other},
                   key=lambda x: -1.0 if x is None else x)
      for lr in lrs:
        at = [r for r in rows if r.get("lr") == lr and metric in r]
        if not {first, other} <= {r["optimizer"] for r in at}:
          continue  # results written before the metric existed
        a, b, gap = statistics.compare_groups(at, "optimizer", metric, other,
                                              first)
        out.append({
            "metric": metric, "epoch": last, "first": first, "other": other,
            **({} if lr is None else {"lr": lr}),
            "first_interval": b.to_dict(),
            "other_interval": a.to_dict(),
            "gap": gap.to_dict(),
            "verdict": statistics.describe(gap, f"{other} {above}",
                                           f"{other} {below}")})
  return out


def _curve(rows: Sequence[dict[str, Any]], metric: str, loss: str
           ) -> np.ndarray:
  """(training loss, score) of every LR and epoch, by increasing loss."""
  pts = sorted((float(r[loss]), float(r[metric])) for r in rows)
  return np.array(pts, np.float64).reshape(-1, 2)


def at_equal_loss(results: Sequence[dict[str, Any]],
                  optimizers: Sequence[str],
                  metric: str = "memorization_contrastive",
                  loss: str = "train_loss") -> list[dict[str, Any]]:
  """Each optimizer minus the first at equal training loss, paired by seed.

  Per optimizer and seed, the (training loss, score) points of all its
  learning rates and epochs, read piecewise-linearly in the loss. The
  common range [lo, hi]: from the lowest loss every curve reaches to the
  highest; per seed the mean difference over it (64 evenly spaced losses)
  and the difference at lo (the most-trained common level); intervals over
  seeds (`statistics.mean_ci`) and the verdict of the mean difference.
  Rows without `loss` (older results) are left out; [] when fewer than two
  points per curve remain.
  """
  rows = [r for r in results
          if r["optimizer"] != BASE and loss in r and metric in r]
  curves: dict[str, dict[int, np.ndarray]] = {}
  for o in optimizers:
    for k in sorted({_seed(r) for r in rows if r["optimizer"] == o}):
      curves.setdefault(o, {})[k] = _curve(
          [r for r in rows if r["optimizer"] == o and _seed(r) == k],
          metric, loss)
  first = optimizers[0]
  out = []
  for other in optimizers[1:]:
    seeds = sorted(set(curves.get(first, {})) & set(curves.get(other, {})))
    pairs = [(curves[first][k], curves[other][k]) for k in seeds]
    if not pairs or any(len(c) < 2 for pair in pairs for c in pair):
      continue
    lo = max(c[0, 0] for pair in pairs for c in pair)
    hi = min(c[-1, 0] for pair in pairs for c in pair)
    if not hi > lo:
      continue
    grid = np.linspace(lo, hi, 64)
    mean_gap, low_gap = [], []
    for a, b in pairs:
      diff = np.interp(grid, b[:, 0], b[:, 1]) - np.interp(grid, a[:, 0],
                                                           a[:, 1])
      mean_gap.append(float(np.mean(diff)))
      low_gap.append(float(diff[0]))
    gap = statistics.mean_ci(mean_gap)
    out.append({
        "metric": metric, "loss": loss, "first": first, "other": other,
        "seeds": seeds, "loss_range": [float(lo), float(hi)],
        "gap_mean": gap.to_dict(),
        "gap_at_lowest_loss": statistics.mean_ci(low_gap).to_dict(),
        "p": statistics.t_test_p(mean_gap),
        "verdict": statistics.describe(gap, f"{other} memorizes more",
                                       f"{other} memorizes less")})
  return out


def fmt(iv: dict[str, Any]) -> str:
  return statistics.Interval(**iv).format()


def write_summary(summary: Sequence[dict[str, Any]], root: str,
                  equal_loss: Sequence[dict[str, Any]] = ()) -> str:
  """W/memorization/summary.json, at_equal_loss.json and summary.md.

  Returns the .md path.

  `equal_loss` (`at_equal_loss`) goes first: it is the comparison the
  experiment's answer reads; the per-LR table at the last epoch follows.
  """
  with open(os.path.join(root, SUMMARY + ".json"), "w",
            encoding="utf-8") as f:
    json.dump(list(summary), f, indent=2)
  with open(os.path.join(root, EQUAL_LOSS), "w", encoding="utf-8") as f:
    json.dump(list(equal_loss), f, indent=2)
  lines = []
  for e in equal_loss:
    lines += [
        f"At equal training loss ({e['loss']} from {e['loss_range'][0]:.3f}"
        f" to {e['loss_range'][1]:.3f} nats/token, every learning rate and"
        f" epoch of each optimizer's grid): {e['metric']} of {e['other']}"
        f" minus {e['first']}, paired by seed ({len(e['seeds'])} seeds):"
        f" mean over the range {fmt(e['gap_mean'])}, at the lowest common"
        f" loss {fmt(e['gap_at_lowest_loss'])}: {e['verdict']}.", ""]
  if summary:
    s0 = summary[0]
    n = s0["gap"]["n"]
    lines += [
        f"Memorization vs rule at epoch {s0['epoch']} (per learning rate both"
        f" ran): mean and 95% interval over {n} seeds; gap = other -"
        f" {s0['first']}, paired by seed. memorization_contrastive = log p(own"
        " number) - mean log p(other facts' numbers), chance 0.", "",
        f"| score | lr | {s0['first']} | other | other's score | gap |"
        " verdict |",
        "|---|---|---|---|---|---|---|"]
    for s in summary:
      lines.append(f"| {s['metric']} | {s.get('lr', '')} |"
                   f" {fmt(s['first_interval'])} |"
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
  lrs = sorted({r["lr"] for r in results if "lr" in r})
  if lrs:  # a grid: the curves of its middle learning rate
    results = [r for r in results
               if r["optimizer"] == BASE or r.get("lr") == lrs[len(lrs) // 2]]
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
    curve(axes[2], name, "memorization_contrastive", "-o", color,
          f"{name}: memorization")
  axes[0].set_ylabel("greedy accuracy (higher is better)")
  axes[1].set_ylabel("gold response log-prob per token (nats)")
  axes[2].set_ylabel("contrastive memorization (nats; own number minus"
                     " others', chance 0)")
  axes[2].axhline(0.0, color="gray", lw=0.8)
  for ax in axes:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("finetuning epoch (0 = base)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, title="finetuning optimizer", title_fontsize=7)
  axes[2].legend(fontsize=7, title="finetuning optimizer", title_fontsize=7)
  band = (f"; mean over {n_seeds} seeds, band = 95% interval"
          if n_seeds > 1 else "")
  fig.suptitle("Memorization (training facts) vs rule (held-out problems)"
               + band + (f"; lr {lrs[len(lrs) // 2]:g}" if lrs else ""))
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path
