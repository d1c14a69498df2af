"""Retention at a common learning level, gaps vs matched, the matrix."""

import math

import numpy as np
import pytest


from optconsist_jax.evaluate import results
from optconsist_jax.report import brackets
from optconsist_jax.report import consistency
from optconsist_jax.report import consistency_markdown
from optconsist_jax.report import matrix as matrix_lib
from optconsist_jax.report import statistics as stats


def test_retention_at_on_a_hand_made_frontier():
  pts = [(0.1, -1.0), (0.3, -1.5), (0.5, -2.5), (0.2, -1.8)]  # last dominated
  front = np.array([pts[i] for i in results.pareto_frontier(pts)])
  assert front.tolist() == [[0.1, -1.0], [0.3, -1.5], [0.5, -2.5]]
  assert consistency.retention_at(front, 0.4) == pytest.approx(-2.0)
  assert consistency.retention_at(front, 0.2) == pytest.approx(-1.25)
  assert consistency.retention_at(front, 0.5) == pytest.approx(-2.5)
  # Below the least-learning point: that point (it learned at least 0.05).
  assert consistency.retention_at(front, 0.05) == -1.0
  assert math.isnan(consistency.retention_at(front, 0.6))
  other = np.array([[0.2, -1.1], [0.35, -1.4]])
  assert consistency.common_level([front, other]) == pytest.approx(0.35)


def rows(base, method, seed, offset, rng, noise, lrs=(1, 2, 3), epochs=3):
  """Checkpoints on the line retention = -1 - 2 learning + offset (+noise).

  Learning grows with LR and epoch; every point of one seed is on that
  seed's frontier (retention falls as learning rises).
  """
  out = []
  for i, lr in enumerate(lrs):
    for e in range(1, epochs + 1):
      learning = 0.1 * lr * e + 0.01 * i
      out.append(results.EvalRecord(
          step=e * 10, epoch=float(e), method=method, base=base,
          lr=1e-4 * lr, learning=learning,
          retention=-1.0 - 2.0 * learning + offset + rng.normal(0, noise),
          run=f"{base}_{method}_{lr}_s{seed}", seed=seed))
  return out


def _code(name):
  return sum(map(ord, name))


def planted(offsets, seeds=range(4), noise=0.003, data_seed=0):
  """Records with retention offsets[(base, method)] above the common line."""
  rng = np.random.default_rng(data_seed)
  out = []
  for (base, method), off in offsets.items():
    for s in seeds:
      # A per-seed shift shared by all methods of the seed (paired design).
      shift = 0.05 * ((s * 7919 + _code(base)) % 5) / 5
      out += rows(base, method, s, off + shift, rng, noise)
  for base in {b for b, _ in offsets}:
    out.append(results.EvalRecord(step=0, epoch=0.0, method="base", base=base,
                                 lr=0.0, learning=0.0, retention=-0.9,
                                 is_base=True, run="base"))
  return out


def test_planted_effect_gives_the_right_verdicts():
  records = planted({("adamw", "adamw"): 0.10, ("adamw", "muon"): 0.0,
                     ("adamw", "lora"): 0.10,
                     ("muon", "muon"): 0.0, ("muon", "adamw"): 0.08})
  summary = {(s.base, s.method): s
             for s in consistency.consistency_summary(records)}
  s = summary[("adamw", "muon")]
  assert s.role == "mismatched" and s.seeds == (0, 1, 2, 3)
  assert s.points == 4 * 9
  assert s.gap_vs_matched.mean == pytest.approx(0.10, abs=0.01)
  assert 0.08 < s.gap_vs_matched.lo < s.gap_vs_matched.hi < 0.12
  assert s.verdict == stats.MATCHED_LESS
  assert summary[("adamw", "lora")].verdict == stats.UNRESOLVED
  assert summary[("muon", "adamw")].verdict == stats.MATCHED_MORE
  assert summary[("muon", "adamw")].gap_vs_matched.mean == pytest.approx(
      -0.08, abs=0.01)
  assert summary[("adamw", "adamw")].verdict == ""
  assert summary[("adamw", "adamw")].gap_vs_matched.n == 0
  # Parallel frontiers: the gap by area is the planted offset too, and the
  # verdicts are Holm-corrected over the table's 3 gaps.
  assert s.gap_area.mean == pytest.approx(0.10, abs=0.01)
  assert summary[("muon", "adamw")].gap_area.mean == pytest.approx(
      -0.08, abs=0.01)
  assert {x.family for x in summary.values() if x.role != "matched"} == {3}
  assert s.p_value <= s.p_holm <= 3 * s.p_value
  # The common level: every run's largest learning is 0.1 * 3 * 3 + 0.02.
  assert s.level == pytest.approx(0.92)
  # Retention at L is on the planted line (offset + the mean seed shift).
  shifts = [0.05 * ((k * 7919 + _code("adamw")) % 5) / 5 for k in range(4)]
  want = -1.0 - 2.0 * 0.92 + np.mean(shifts)
  assert s.retention_at_level.mean == pytest.approx(want, abs=0.005)
  # The percentile bootstrap over the same 4 seeds: inside the t interval.
  pct = {(s.base, s.method): s for s in consistency.consistency_summary(
      records, method="percentile")}[("adamw", "muon")].gap_vs_matched
  assert pct.mean == s.gap_vs_matched.mean
  assert s.gap_vs_matched.lo < pct.lo < pct.hi < s.gap_vs_matched.hi
  text = consistency_markdown.consistency_markdown(list(summary.values()), "l", "r")
  assert "vs muon: matched forgets less" in text
  assert "vs adamw: matched forgets more" in text


def test_null_effect_is_not_resolved():
  # Muon's runs are matched's runs with the seeds relabelled: the same
  # distribution (the same numbers), so the mean gap is 0.
  import dataclasses  # pylint: disable=g-import-not-at-top
  matched = [r for r in planted({("adamw", "adamw"): 0.0}, noise=0.05,
                                data_seed=1) if not r.is_base]
  muon = [dataclasses.replace(r, method="muon", seed=(r.seed + 1) % 4,
                              run=r.run + "_muon") for r in matched]
  (s,) = [s for s in consistency.consistency_summary(matched + muon)
          if s.method == "muon"]
  assert s.gap_vs_matched.n == 4
  assert s.gap_vs_matched.mean == pytest.approx(0.0, abs=1e-12)
  assert s.gap_vs_matched.lo < 0 < s.gap_vs_matched.hi
  assert s.verdict == stats.UNRESOLVED


def test_matrix_marks_the_best_diagonal():
  offsets = {}
  for b in ("adamw", "muon", "lion"):
    for m in ("adamw", "muon", "lion", "lora"):
      offsets[(b, m)] = 0.1 if m == b else 0.0
  offsets[("lion", "adamw")] = 0.2  # row lion: adamw beats the diagonal
  offsets[("muon", "adamw")] = 0.1  # row muon: a tie with the diagonal
  rows_ = {r.base: r for r in matrix_lib.consistency_matrix(planted(offsets))}
  assert rows_["adamw"].diagonal_best == "yes"
  assert rows_["adamw"].diagonal_margin.mean == pytest.approx(0.1, abs=0.01)
  assert rows_["lion"].diagonal_best == "no"
  assert rows_["muon"].diagonal_best == "not resolved"
  assert set(rows_["adamw"].cells) == {"adamw", "muon", "lion", "lora"}
  assert matrix_lib.matrix_columns(["adamw", "muon", "lion"],
                                    ["lora", "lion", "muon", "adamw",
                                     "adagrad"]) == [
                                         "adamw", "muon", "lion", "adagrad",
                                         "lora"]
  text = matrix_lib.matrix_markdown(list(rows_.values()), "r")
  assert text.count("| yes |") == 1 and text.count("| no |") == 1


def _records(points_by_run):
  """EvalRecords from {(base, method, seed): [(learning, retention), ...]}."""
  return [results.EvalRecord(
      step=10 * (k + 1), epoch=float(k + 1), method=m, base=b, lr=1e-4,
      learning=float(l), retention=float(r), run=f"{b}_{m}_s{s}", seed=s)
          for (b, m, s), pts in points_by_run.items()
          for k, (l, r) in enumerate(pts)]


# Hand-made frontiers (every point non-dominated). adamw base: L = 0.7
# (muon seed 0 ends there); muon base: L = 0.3, below muon's frontiers.
BRACKETED = {
    ("adamw", "adamw", 0): [(0.1, 1.0), (0.4, 0.8), (0.9, 0.3)],
    ("adamw", "adamw", 1): [(0.2, 0.9), (0.6, 0.7), (1.0, 0.2)],
    ("adamw", "muon", 0): [(0.2, 0.9), (0.7, 0.5)],
    ("adamw", "muon", 1): [(0.3, 0.8), (0.75, 0.45)],
    ("adamw", "lora", 0): [(0.65, 0.2), (0.8, 0.1)],
    ("adamw", "lora", 1): [(0.7, 0.15), (0.9, 0.05)],
    ("muon", "muon", 0): [(0.5, 2.0), (0.6, 1.9)],
    ("muon", "muon", 1): [(0.5, 2.1), (0.65, 1.95)],
    ("muon", "adamw", 0): [(0.1, 1.5), (0.3, 1.2)],
    ("muon", "adamw", 1): [(0.1, 1.5), (0.35, 1.1)],
}


def test_brackets_at_the_common_level_by_hand(tmp_path):
  records = _records(BRACKETED)
  summary = {(s.base, s.method): s
             for s in consistency.consistency_summary(records)}
  assert summary[("adamw", "adamw")].level == pytest.approx(0.7)
  assert summary[("muon", "muon")].level == pytest.approx(0.3)
  # Per seed (lower, upper) retention of the checkpoints around L = 0.7 and
  # their learning distance, read off BRACKETED by hand.
  want = {("adamw", "adamw"): [(0.3, 0.8, 0.5), (0.2, 0.7, 0.4)],
          ("adamw", "muon"): [(0.5, 0.5, 0.0), (0.45, 0.8, 0.45)],
          ("adamw", "lora"): [(0.1, 0.2, 0.15), (0.15, 0.15, 0.0)],
          ("muon", "adamw"): [(1.2, 1.2, 0.0), (1.1, 1.5, 0.25)]}
  for key, per_seed in want.items():
    b = summary[key].retention_bracket
    lo, hi, width = np.array(per_seed).T
    assert (b.lo, b.hi, b.width) == pytest.approx(
        (lo.mean(), hi.mean(), width.max())), key
    assert b.widths == pytest.approx(tuple(width))
    assert b.dense == (width.max() <= 0.3) and b.outside == ()
    # The linear reading lies inside its bracket.
    assert b.lo <= summary[key].retention_at_level.mean <= b.hi
  assert summary[("muon", "adamw")].retention_bracket.dense
  assert not summary[("adamw", "muon")].retention_bracket.dense
  # Gaps: matched's (lo, hi) minus the other's (hi, lo), per seed.
  g = summary[("adamw", "muon")].gap_bracket
  assert (g.lo, g.hi) == pytest.approx((np.mean([0.3 - 0.5, 0.2 - 0.8]),
                                        np.mean([0.8 - 0.5, 0.7 - 0.45])))
  assert g.straddles_zero and g.width == pytest.approx(0.5)
  g = summary[("adamw", "lora")].gap_bracket
  assert (g.lo, g.hi) == pytest.approx((np.mean([0.3 - 0.2, 0.2 - 0.15]),
                                        np.mean([0.8 - 0.1, 0.7 - 0.15])))
  assert g.straddles_zero is False
  # L = 0.3 is below both muon frontiers on the muon base: no bound.
  for key in (("muon", "muon"), ("muon", "adamw")):
    b = (summary[key].retention_bracket if key[1] == "muon"
         else summary[key].gap_bracket)
    assert b.outside == (0, 1) and math.isnan(b.lo)
    assert b.straddles_zero is None and not b.dense
  (inter,) = consistency.interactions(records)
  assert inter.at_level_bracket.outside == (0, 1)
  text = consistency_markdown.consistency_markdown(
      list(summary.values()), "l", "r", interaction_rows=[inter])
  (row,) = [x for x in text.splitlines() if x.startswith("| adamw | muon |")]
  assert "| [-0.400, +0.275] | straddles 0 |" in row
  assert "| 0.450 (<= 0.3: no) |" in row
  (row,) = [x for x in text.splitlines() if x.startswith("| muon | adamw |")]
  assert "0.250 (<= 0.3: yes)" in row
  assert "L outside the frontier of seeds 0, 1" in row
  (row,) = [x for x in text.splitlines() if x.startswith("| adamw, muon |")]
  assert "L outside the frontier of seeds 0, 1" in row
  (j,) = [d for d in consistency_markdown.summary_json(list(summary.values()))
          if (d["base"], d["method"]) == ("adamw", "lora")]
  assert j["gap_bracket"]["lo"] == pytest.approx(0.075)
  assert j["retention_bracket"]["dense"] is True


def test_bracket_matches_brute_force_on_random_frontiers():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 7))
    learning = np.sort(rng.choice(np.linspace(0, 1, 21), n, replace=False))
    front = np.stack([learning, -np.cumsum(rng.uniform(0, 1, n))], 1)
    level = float(rng.choice([rng.uniform(-0.1, 1.1),
                              rng.choice(learning)]))
    lo, hi, width = brackets.bound_at(front, level)
    below, above = learning[learning <= level], learning[learning >= level]
    if not len(below) or not len(above):
      assert math.isnan(lo) and math.isnan(width)
      continue
    r_below = front[learning == below.max(), 1][0]
    r_above = front[learning == above.min(), 1][0]
    assert (lo, hi, width) == pytest.approx(
        (r_above, r_below, above.min() - below.max()))
    assert lo <= consistency.retention_at(front, level) <= hi
