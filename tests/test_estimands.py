"""The report's estimands: areas between frontiers, interactions, Holm."""

import json
import math

import numpy as np
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import matrix as matrix_lib
from optconsist_jax.report import statistics as stats
from optconsist_jax.report import tables

# Student's t 97.5% quantiles (printed tables): df = 2, 4.
T975 = {2: 4.302653, 4: 2.776445}


def records_of(points_by_run):
  """EvalRecords from {(base, method, seed): [(learning, retention), ...]}."""
  out = []
  for (base, method, seed), pts in points_by_run.items():
    for k, (learning, retention) in enumerate(pts):
      out.append(results.EvalRecord(
          step=10 * (k + 1), epoch=float(k + 1), method=method, base=base,
          lr=1e-4, learning=float(learning), retention=float(retention),
          run=f"{base}_{method}_s{seed}", seed=seed))
  for base in sorted({b for b, _, _ in points_by_run}):
    out.append(results.EvalRecord(
        step=0, epoch=0.0, method="base", base=base, lr=0.0, learning=0.0,
        retention=-0.9, is_base=True, run=f"{base}_base",
        checkpoint=f"bases/{base}"))
  return out


def curved(offsets, seeds=range(5), cell_noise=0.01, point_noise=0.002,
           data_seed=0):
  """Curved frontiers R = -1 - 1.5 l^2 + offset + seed shift + noise.

  Each (base, method) covers its own learning range (muon a bit further),
  each seed shifts all methods of a base alike (a paired design) and each
  (base, method, seed) gets its own offset noise.
  """
  rng = np.random.default_rng(data_seed)
  ranges = {"adamw": (0.10, 0.80), "muon": (0.15, 0.90)}
  runs = {}
  for (base, method), off in offsets.items():
    for s in seeds:
      shift = 0.05 * ((3 * s + len(base)) % 5)
      cell = off + shift + rng.normal(0, cell_noise)
      learning = np.linspace(*ranges[method], 8)
      runs[(base, method, s)] = [
          (l, -1 - 1.5 * l * l + cell + rng.normal(0, point_noise))
          for l in learning]
  return records_of(runs)


def by_key(summary):
  return {(s.base, s.method): s for s in summary}


def test_area_between_linear_frontiers_is_analytic():
  # R_a = 1.0 - 2 (l - 0.1) on [0.1, 0.5]; R_b = 0.9 - (l - 0.2) on
  # [0.2, 0.8]. Common range [0.2, 0.5]; R_a - R_b = 0.1 - l, whose mean
  # over it is 0.1 - 0.35.
  a = np.array([[0.1, 1.0], [0.5, 0.2]])
  b = np.array([[0.2, 0.9], [0.8, 0.3]])
  assert consistency.area_between(a, b) == pytest.approx(-0.25)
  assert consistency.area_between(b, a) == pytest.approx(0.25)
  # No extrapolation: what b does beyond 0.5 (a's end) or what a does
  # below 0.2 (b's start) does not enter.
  b_bent = np.array([[0.2, 0.9], [0.5, 0.6], [0.8, -5.0]])
  a_bent = np.array([[0.0, 9.0], [0.2, 0.8], [0.5, 0.2]])
  assert consistency.area_between(a, b_bent) == pytest.approx(-0.25)
  assert consistency.area_between(a_bent, b) == pytest.approx(-0.25)
  # A kink inside the range: R_c = 1 on [0, 0.5], then 1 - 2 (l - 0.5) to
  # l = 1; against R = 0 the integral is 0.5 + (1 + 0) / 2 * 0.5 = 0.75.
  c = np.array([[0.0, 1.0], [0.5, 1.0], [1.0, 0.0]])
  zero = np.array([[0.0, 0.0], [1.0, 0.0]])
  assert consistency.area_between(c, zero) == pytest.approx(0.75)
  # Ranges that do not overlap (or touch in one point): no area.
  assert math.isnan(consistency.area_between(
      a, np.array([[0.6, 0.0], [0.9, -1.0]])))
  assert math.isnan(consistency.area_between(
      a, np.array([[0.5, 0.0], [0.9, -1.0]])))


def test_holm_adjusted_p_values_by_hand():
  # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06,
  # 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx(
      [0.03, 0.06, 0.06, 0.02])
  # NaN (no test) is not in the family: m = 2.
  adj = stats.holm([0.01, math.nan, 0.04])
  assert adj[0] == pytest.approx(0.02) and adj[2] == pytest.approx(0.04)
  assert math.isnan(adj[1])
  assert stats.family_size([0.01, math.nan, 0.04]) == 2
  assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
  # Resolved at 0.03 unadjusted, not after Holm (0.06).
  gap = stats.Interval(0.1, 0.02, 0.18, 5)
  assert stats.resolved_sign(gap) == 1
  assert stats.resolved_sign(gap, p_adjusted=0.06) == 0
  assert stats.resolved_sign(gap, p_adjusted=0.03) == 1
  assert stats.resolved_sign(stats.Interval(0.1, 0.02, 0.18, 2),
                             p_adjusted=0.001) == 0


def test_t_test_p_is_the_t_interval_s_distribution():
  # [1, 2, 3]: t = 2 / (1 / sqrt 3); with 2 df the CDF is
  # 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2).
  t = 2 * math.sqrt(3)
  assert stats.t_test_p([1.0, 2.0, 3.0]) == pytest.approx(
      1 - t / math.sqrt(2 + t * t), rel=1e-9)
  assert math.isnan(stats.t_test_p([1.0]))
  assert stats.t_test_p([0.2, 0.2, 0.2]) == 0.0
  assert stats.t_test_p([0.0, 0.0]) == 1.0
  # p < 0.05 exactly when the 95% t interval excludes 0.
  rng = np.random.default_rng(0)
  for _ in range(50):
    x = rng.normal(0.5, 1.0, size=4)
    iv = stats.t_ci(x)
    assert (stats.t_test_p(x) < 0.05) == (iv.lo > 0 or iv.hi < 0)


def test_interaction_by_hand():
  # Linear two-point frontiers on [0.1, 0.5]: R = c - k (l - 0.1), c per
  # (base, method, seed), slope k per (base, method).
  c = {("adamw", "adamw"): [1.00, 1.02, 0.98],
       ("adamw", "muon"): [0.90, 0.95, 0.91],
       ("muon", "muon"): [0.80, 0.83, 0.79],
       ("muon", "adamw"): [0.78, 0.80, 0.80],
       ("lion", "lion"): [0.5, 0.5, 0.5]}
  k = {("adamw", "adamw"): 1.0, ("adamw", "muon"): 2.0,
       ("muon", "muon"): 1.0, ("muon", "adamw"): 1.5, ("lion", "lion"): 1.0}
  runs = {(b, m, s): [(0.1, c[(b, m)][s]),
                      (0.5, c[(b, m)][s] - 0.4 * k[(b, m)])]
          for (b, m) in c for s in range(3)}
  rows = consistency.interactions(records_of(runs))
  assert [(r.i, r.j) for r in rows] == [("adamw", "lion"), ("adamw", "muon"),
                                        ("lion", "muon")]
  assert rows[0].verdict.startswith("no run of") and rows[0].by_area.n == 0
  r = rows[1]
  # A gap of two lines: its mean over [0.1, 0.5] is its value at 0.3; at
  # the common level L = 0.5 its value there.
  def gap(base, other, at):
    return [c[(base, base)][s] - k[(base, base)] * (at - 0.1)
            - c[(base, other)][s] + k[(base, other)] * (at - 0.1)
            for s in range(3)]
  want_area = np.add(gap("adamw", "muon", 0.3), gap("muon", "adamw", 0.3))
  want_l = np.add(gap("adamw", "muon", 0.5), gap("muon", "adamw", 0.5))
  assert want_area == pytest.approx([0.42, 0.40, 0.36])
  assert want_l == pytest.approx([0.72, 0.70, 0.66])
  assert r.levels == pytest.approx((0.5, 0.5))
  assert r.seeds == (0, 1, 2)
  half = T975[2] * np.std(want_area, ddof=1) / math.sqrt(3)
  assert (r.by_area.mean, r.by_area.lo, r.by_area.hi) == pytest.approx(
      (want_area.mean(), want_area.mean() - half, want_area.mean() + half))
  assert r.at_level.mean == pytest.approx(want_l.mean())
  # One family member with a p (the pair with lion has none).
  assert r.family == 1 and r.p_holm == pytest.approx(r.p_value)
  assert r.p_value == pytest.approx(stats.t_test_p(want_area))
  assert r.verdict == stats.MATCHED_LESS


def test_planted_interaction_is_resolved(tmp_path):
  records = curved({("adamw", "adamw"): 0.10, ("adamw", "muon"): 0.0,
                    ("muon", "muon"): 0.10, ("muon", "adamw"): 0.0})
  (r,) = consistency.interactions(records)
  assert r.seeds == (0, 1, 2, 3, 4)
  assert r.by_area.mean == pytest.approx(0.2, abs=0.03)
  assert r.by_area.lo > 0 and r.verdict == stats.MATCHED_LESS
  assert r.at_level.mean == pytest.approx(0.2, abs=0.03)
  # Both per-base gaps agree here, by area and at L.
  summary = by_key(consistency.consistency_summary(records))
  for key in (("adamw", "muon"), ("muon", "adamw")):
    assert summary[key].gap_area.mean == pytest.approx(0.1, abs=0.03)
    assert summary[key].verdict == stats.MATCHED_LESS
    assert summary[key].family == 2
  # The written report: the Interaction table, the Holm and variance
  # lines, the same numbers in summary.json (strict JSON).
  tables.write_consistency(records, str(tmp_path))
  md = (tmp_path / "summary.md").read_text()
  assert "## Interaction" in md
  (line,) = [l for l in md.splitlines() if l.startswith("| adamw, muon |")]
  assert r.by_area.format(signed=True) in line and stats.MATCHED_LESS in line
  assert "Holm's step-down correction (Holm 1979) over the 2 comparisons" in md
  assert "over the 1 comparison of" in md
  # What the intervals cover, under both tables: these rows keep no
  # per-item scores and do not say which base they started from.
  assert md.count("Intervals cover: finetuning seeds (n = 5)") == 2
  assert "not the retention items' sampling error (no per-item" in md
  assert "gap vs matched by area" in md
  rows = json.loads((tmp_path / "summary.json").read_text())
  (matched,) = [s for s in rows if (s["base"], s["method"]) == ("adamw",
                                                                 "adamw")]
  (j,) = matched["interactions"]
  assert j["by_area"]["mean"] == pytest.approx(r.by_area.mean)
  assert j["verdict"] == stats.MATCHED_LESS
  (other,) = [s for s in rows if (s["base"], s["method"]) == ("adamw",
                                                               "muon")]
  assert other["gap_area"]["mean"] == pytest.approx(
      summary[("adamw", "muon")].gap_area.mean)
  assert other["interactions"] == [] and other["p_holm"] <= 1


def test_column_effect_is_not_an_interaction():
  # Finetuning with adamw keeps 0.1 more on every base: no consistency.
  records = curved({("adamw", "adamw"): 0.10, ("adamw", "muon"): 0.0,
                    ("muon", "muon"): 0.0, ("muon", "adamw"): 0.10},
                   data_seed=1)
  summary = by_key(consistency.consistency_summary(records))
  # Read per base, the adamw base says "matched forgets less" (misleading
  # on its own) and the muon base the opposite; both resolved.
  assert summary[("adamw", "muon")].verdict == stats.MATCHED_LESS
  assert summary[("muon", "adamw")].verdict == stats.MATCHED_MORE
  (r,) = consistency.interactions(records)
  assert abs(r.by_area.mean) < 0.03
  assert r.by_area.lo < 0 < r.by_area.hi
  assert r.verdict == stats.UNRESOLVED


def test_diagonal_loses_to_a_cell_that_is_not_the_best_on_the_mean():
  # One row (adamw base): the diagonal keeps 0.10; lion is best on the
  # mean (0.20) but all over the place; muon keeps 0.13 on every seed;
  # lora 0.0. Parallel frontiers, so every gap by area is the offset gap.
  offsets = {"adamw": [0.10] * 5,
             "lion": [0.70, -0.30, 0.60, -0.20, 0.20],
             "muon": [0.131, 0.129, 0.1305, 0.1295, 0.13],
             "lora": [0.0, 0.001, -0.001, 0.0005, -0.0005]}
  runs = {("adamw", m, s): [(l, -1 - l + off[s]) for l in (0.1, 0.3, 0.5)]
          for m, off in offsets.items() for s in range(5)}
  (row,) = matrix_lib.consistency_matrix(records_of(runs))
  # The old rule: the diagonal against lion only (best on the mean), not
  # resolved.
  assert row.diagonal_margin.mean == pytest.approx(-0.1)
  assert row.diagonal_margin.lo < 0 < row.diagonal_margin.hi
  # The new rule: against every cell, Holm over the 3 gaps.
  assert row.family == 3
  assert row.gaps_area["muon"].mean == pytest.approx(-0.03)
  assert row.gaps_area["lora"].mean == pytest.approx(0.1)
  p = {m: stats.t_test_p(np.subtract(offsets["adamw"], offsets[m]))
       for m in ("lion", "muon", "lora")}
  want = dict(zip(p, stats.holm(list(p.values()))))
  assert row.p_holm == pytest.approx(want)
  assert row.p_holm["muon"] < 0.05 < row.p_holm["lion"]
  assert row.diagonal_best == "no"
  # Without the muon column: lion unresolved, lora resolved -> not resolved.
  del offsets["muon"]
  runs = {k: v for k, v in runs.items() if k[1] != "muon"}
  (row,) = matrix_lib.consistency_matrix(records_of(runs))
  assert row.diagonal_best == "not resolved"
  # And with lion gone too: the diagonal beats every other cell.
  runs = {k: v for k, v in runs.items() if k[1] != "lion"}
  (row,) = matrix_lib.consistency_matrix(records_of(runs))
  assert row.diagonal_best == "yes"
  text = matrix_lib.matrix_markdown([row], "r")
  assert "over the 1 comparison of this table" in text
