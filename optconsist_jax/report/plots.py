"""The report's figures: Pareto points, seed frontiers, gaps, the matrix.

Each function draws one figure from numbers computed elsewhere (tables.py,
consistency.py) and writes it; matplotlib is imported here only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os

import numpy as np


from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import matrix as matrix_lib
from optconsist_jax.report import statistics as stats

_METHOD_COLOURS = {"adamw": "tab:blue", "muon": "tab:red",
                   "lora": "tab:green", "base": "black"}
# Marker shape = peak learning rate (in increasing order of LR).
_LR_MARKERS = ["o", "^", "s", "D", "v", "P", "X", "<", ">"]
_VERDICT_COLOURS = {stats.MATCHED_LESS: "tab:green",
                    stats.MATCHED_MORE: "tab:red"}


def _pyplot():
  # deferred: matplotlib takes ~1 s to import; only drawing needs it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # deferred: after use("Agg"); pylint: disable=g-import-not-at-top
  return plt


def colours(methods: Sequence[str]) -> dict[str, str]:
  import matplotlib  # deferred: as in _pyplot; pylint: disable=g-import-not-at-top
  cycle = matplotlib.colormaps["tab10"].colors
  # tab10 without the blue, green and red that name the methods above.
  spare = [cycle[i] for i in (1, 4, 5, 6, 7, 8, 9)]
  out: dict[str, str] = {}
  for m in methods:
    fixed = _METHOD_COLOURS.get(m.lower())
    out[m] = fixed or spare[sum(x not in _METHOD_COLOURS for x in out)
                            % len(spare)]
  return out


def _marker_size(epoch: float, max_epoch: float) -> float:
  return 30 + 170 * epoch / max_epoch


def _save(fig, paths: Sequence[str]) -> None:
  plt = _pyplot()
  for p in paths:
    os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    fig.savefig(p, dpi=150)
  plt.close(fig)


def pareto_plot(records: Sequence[results.EvalRecord], xs: Sequence[float],
                ys: Sequence[float], fronts: Mapping[str, list[int]],
                maximize: tuple[bool, bool], x_name: str, y_name: str,
                title: str, paths: Sequence[str]) -> None:
  """One dot per checkpoint, one panel per base (`report.make_report`).

  Colour = finetuning method, marker shape = peak LR, marker size = epochs,
  black outline = on that base's frontier, star = the base model itself.
  """
  plt = _pyplot()
  from matplotlib.lines import Line2D  # deferred: as in _pyplot; pylint: disable=g-import-not-at-top
  bases = sorted(fronts)
  on_front = {i for f in fronts.values() for i in f}
  methods = sorted({r.method for r in records if not r.is_base})
  colour = colours(methods)
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
              alpha=0.35, color=colour[records[idx[0]].method], zorder=1)
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
                   s=_marker_size(r.epoch, max_epoch), color=colour[r.method],
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
    ax.set_xlabel(results.axis_title("Retention", x_name, maximize[0]),
                  fontsize=8)
  axes[0][0].set_ylabel(results.axis_title("Learning", y_name, maximize[1]),
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
      ("finetuning method", [dot(color=colour[m], markersize=8)
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
    fig.legend(handles, labels, title=group_title, fontsize=8,
               title_fontsize=8, loc="upper left",
               bbox_to_anchor=(1.0 - 2.4 / fig.get_figwidth(), y),
               frameon=False, alignment="left")
    y -= (len(labels) + 1.6) * 0.045
  if len(bases) > 1:
    fig.suptitle(title or "Learning vs. retention per base model",
                 fontsize=11)
  fig.tight_layout(rect=(0, 0, 1.0 - 2.5 / fig.get_figwidth(), 1))
  _save(fig, paths)


def frontier_plot(records: Sequence[results.EvalRecord],
                  summary: Sequence[consistency.MethodSummary],
                  x_name: str, y_name: str, path: str,
                  grid_points: int = 40) -> str:
  """Per base: every seed's checkpoints (light) and the mean frontier.

  x = retention, y = learning as in the Pareto plot (both higher is better).
  The line is the mean over seeds of the retention each seed's frontier has
  at a learning level, the band its percentile bootstrap interval (a
  description of the seeds' spread, not a test), drawn up to the
  highest level every seed of the method reaches; the dotted line is the
  base's common learning level L, where the summary compares.
  """
  plt = _pyplot()
  fronts = consistency.seed_frontiers(records)
  bases = sorted({b for b, _ in fronts})
  methods = sorted({m for _, m in fronts})
  colour = colours(methods)
  fig, axes = plt.subplots(1, len(bases), figsize=(4.8 * len(bases) + 1, 4.8),
                           squeeze=False)
  for ax, b in zip(axes[0], bases):
    for r in records:
      if r.base == b and r.is_base:
        ax.scatter(r.retention, r.learning, marker="*", s=220, color="black",
                   zorder=4, label="base model")
    for m in methods:
      by_seed = fronts.get((b, m))
      if not by_seed:
        continue
      pts = [r for r in records if r.base == b and r.method == m
             and not r.is_base]
      ax.scatter([r.retention for r in pts], [r.learning for r in pts], s=12,
                 color=colour[m], alpha=0.3, zorder=2)
      lo_l = min(f[0, 0] for f in by_seed.values())
      hi_l = consistency.common_level(list(by_seed.values()))
      levels_L = np.linspace(lo_l, hi_l, grid_points)
      mean, lo, hi = consistency.mean_frontier(
          by_seed, levels_L, method="percentile", n_boot=1000)
      ax.plot(mean, levels_L, "-", color=colour[m], lw=1.8, zorder=3,
              label=f"{m} ({len(by_seed)} seeds)")
      ax.fill_betweenx(levels_L, lo, hi, color=colour[m], alpha=0.2, lw=0,
                       zorder=1)
    level = consistency.summary_level(summary, b)
    ax.axhline(level, color="gray", ls=":", lw=1.2,
               label=f"common learning level L = {level:.3f}")
    ax.set_title(f"base pretrained with {b}", fontsize=10)
    ax.set_xlabel(results.axis_title("Retention", x_name, True), fontsize=8)
    ax.set_ylabel(results.axis_title("Learning", y_name, True), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Mean frontier over seeds (band: 95% percentile bootstrap"
               " interval of the mean; dots: every seed's checkpoints)",
               fontsize=10)
  fig.tight_layout()
  _save(fig, [path])
  return path


def gap_plot(summary: Sequence[consistency.MethodSummary], y_name: str,
             x_name: str, path: str,
             method: str = stats.DEFAULT_METHOD) -> str:
  """Does matched forget less at equal learning? One bar per (base, method):
  the gap by area (the primary comparison) and its Holm-adjusted verdict."""
  plt = _pyplot()
  rows = [s for s in summary if s.gap_area.n]
  fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(rows), 1) + 1.8))
  for i, s in enumerate(rows):
    g = s.gap_area
    bounded = np.isfinite([g.lo, g.hi]).all()
    err = ([[max(g.mean - g.lo, 0.0)], [max(g.hi - g.mean, 0.0)]] if bounded
           else None)
    ax.errorbar([g.mean], [i], xerr=err, fmt="o", capsize=4,
                color=_VERDICT_COLOURS.get(s.verdict, "gray"))
    ax.annotate(s.verdict + ("" if bounded else " (interval unbounded)"),
                (g.hi if bounded else g.mean, i), textcoords="offset points",
                xytext=(6, -3), fontsize=7)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([f"{s.base} base: {s.base} vs {s.method}\n"
                      f"({s.gap_area.n} seeds)" for s in rows], fontsize=8)
  ax.axvline(0, color="black", lw=0.8)
  ax.invert_yaxis()
  ax.set_xlabel(f"matched minus other retention at equal learning, mean"
                f" over the common learning range\n({x_name}; > 0: matched"
                f" forgets less; 95% interval over seeds, {method};"
                " verdicts Holm-adjusted)", fontsize=8)
  ax.set_title(f"Does matched finetuning forget less at equal learning"
               f" ({y_name})?", fontsize=10)
  ax.grid(alpha=0.3, axis="x")
  ax.margins(x=0.3)
  fig.tight_layout()
  _save(fig, [path])
  return path


def matrix_plot(rows: Sequence[matrix_lib.MatrixRow], retention_name: str,
                paths: Sequence[str]) -> None:
  """Heatmap: rows = pretraining optimizer, columns = finetuning method.

  Colour = a cell's mean retention minus its row's diagonal (0 = as good as
  matched; rows sit at different learning levels, so only differences
  within a row are comparable); text = mean and interval; the diagonal
  boxed; the row label says whether the diagonal is best.
  """
  plt = _pyplot()
  from matplotlib.patches import Rectangle  # deferred: as in _pyplot; pylint: disable=g-import-not-at-top
  columns = matrix_lib.matrix_columns([r.base for r in rows],
                                       [m for r in rows for m in r.cells])
  diff_RC = np.full((len(rows), len(columns)), np.nan)
  for i, r in enumerate(rows):
    ref = (r.cells[r.base].mean if r.base in r.cells
           else max(c.mean for c in r.cells.values()))
    for j, m in enumerate(columns):
      if m in r.cells:
        diff_RC[i, j] = r.cells[m].mean - ref
  span = np.nanmax(np.abs(diff_RC)) if np.isfinite(diff_RC).any() else 1.0
  span = span if span > 0 else 1.0
  fig, ax = plt.subplots(figsize=(1.9 * len(columns) + 3, 0.9 * len(rows) + 2))
  im = ax.imshow(np.ma.masked_invalid(diff_RC), cmap="RdYlGn", vmin=-span,
                 vmax=span, aspect="auto")
  for i, r in enumerate(rows):
    for j, m in enumerate(columns):
      if m in r.cells:
        c = r.cells[m]
        ax.text(j, i, f"{c.mean:.3f}\n[{c.lo:.3f}, {c.hi:.3f}]",
                ha="center", va="center", fontsize=7)
      if m == r.base:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                               lw=2.5, ec="black"))
  ax.set_xticks(range(len(columns)))
  ax.set_xticklabels(columns)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([f"{r.base} (L = {r.level:.2f})\ndiagonal best:"
                      f" {r.diagonal_best}" for r in rows], fontsize=8)
  ax.set_xlabel("finetuning method")
  ax.set_ylabel("pretraining optimizer")
  bar = fig.colorbar(im, ax=ax)
  bar.set_label("retention minus the row's diagonal", fontsize=8)
  ax.set_title(f"Retention ({retention_name}) at each row's common learning"
               " level L\n(mean [95% interval] over seeds; box = matched)",
               fontsize=9)
  fig.tight_layout()
  _save(fig, paths)
