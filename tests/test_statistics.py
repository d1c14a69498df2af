"""Bootstrap intervals over seeds and the verdicts they support."""

import itertools
import math

import numpy as np
import pytest

from optconsist_jax.report import statistics as stats


def test_interval_of_three_seeds_by_hand():
  # The 27 equally likely resamples of (0, 1, 2) have sums 0..6 with counts
  # 1, 3, 6, 7, 6, 3, 1. Sorted means m_0..m_26; numpy's linear quantile at
  # q sits at position 26q: 0.65 -> m_0 + 0.65 (m_1 - m_0) = 0.65 / 3, and
  # 25.35 -> m_25 + 0.35 (m_26 - m_25) = 5/3 + 0.35 / 3.
  iv = stats.bootstrap_ci([0.0, 1.0, 2.0], method="percentile", exact=True)
  assert iv.n == 3 and iv.level == 0.95
  assert iv.mean == pytest.approx(1.0)
  assert iv.lo == pytest.approx(0.65 / 3)
  assert iv.hi == pytest.approx(5 / 3 + 0.35 / 3)


def test_exact_mode_matches_an_enumeration_and_random_mode_converges():
  x = np.array([0.31, -0.12, 0.57, 0.05])
  means = [np.mean(x[list(t)]) for t in itertools.product(range(4), repeat=4)]
  lo, hi = np.quantile(means, [0.025, 0.975])
  # 4**4 = 256 resamples: exact by default.
  exact = stats.bootstrap_ci(x, method="percentile")
  assert (exact.lo, exact.hi) == pytest.approx((lo, hi), abs=1e-12)
  rand = stats.bootstrap_ci(x, method="percentile", exact=False,
                            n_boot=200_000, rng_seed=3)
  assert (rand.lo, rand.hi) == pytest.approx((lo, hi), abs=0.01)
  # Deterministic: the same seed gives the same interval, another one not.
  # (10 seeds: 10**10 resamples, random by default.)
  y = np.random.default_rng(0).normal(size=10)
  assert stats.bootstrap_ci(y, rng_seed=3) == stats.bootstrap_ci(y, rng_seed=3)
  assert stats.bootstrap_ci(y, rng_seed=4) != stats.bootstrap_ci(y, rng_seed=3)


def test_studentized_interval_by_enumeration():
  x = np.array([0.31, -0.12, 0.57, 0.05])
  m, se = x.mean(), x.std(ddof=1) / 2
  ts = []
  for t in itertools.product(range(4), repeat=4):
    r = x[list(t)]
    r_se = r.std(ddof=1) / 2
    # One seed repeated: no spread, t* is +-infinite (never at a 2.5% tail
    # here: 4 of 256 resamples).
    ts.append((r.mean() - m) / r_se if r_se > 0 else
              math.copysign(math.inf, r.mean() - m))
  q_lo, q_hi = np.quantile(np.clip(ts, -1e300, 1e300), [0.025, 0.975])
  iv = stats.bootstrap_ci(x, method="studentized")
  assert iv.mean == pytest.approx(m)
  assert (iv.lo, iv.hi) == pytest.approx((m - q_hi * se, m - q_lo * se))
  # Wider than the percentile interval at this n.
  pct = stats.bootstrap_ci(x, method="percentile")
  assert iv.lo < pct.lo and pct.hi < iv.hi
  # 3 seeds: a ninth of the resamples repeat one seed; unbounded.
  three = stats.bootstrap_ci([0.1, 0.2, 0.3], method="studentized")
  assert (three.lo, three.hi) == (-math.inf, math.inf)
  assert stats.verdict(three) == stats.UNRESOLVED
  # All seeds equal: no uncertainty left to bound.
  same = stats.bootstrap_ci([0.2] * 4, method="studentized")
  assert (same.lo, same.hi) == (0.2, 0.2)


def test_other_statistics_and_levels():
  x = [1.0, 2.0, 4.0, 8.0, 16.0]
  med = stats.bootstrap_ci(x, np.median, method="percentile")
  assert med.mean == 4.0 and med.lo <= 4.0 <= med.hi
  with pytest.raises(ValueError, match="percentile"):
    stats.bootstrap_ci(x, np.median, method="studentized")
  for method in stats.METHODS:
    narrow = stats.mean_ci(x, level=0.5, method=method)
    wide = stats.mean_ci(x, level=0.99, method=method)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi


def test_bad_samples_are_refused():
  with pytest.raises(ValueError, match="empty"):
    stats.bootstrap_ci([])
  with pytest.raises(ValueError, match="non-finite"):
    stats.bootstrap_ci([1.0, float("nan")])
  with pytest.raises(ValueError, match="level"):
    stats.bootstrap_ci([1.0, 2.0], level=1.5)


def test_paired_gap_uses_common_seeds():
  a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 7: 100.0}
  b = {0: 0.5, 1: 1.5, 2: 2.0, 3: 3.4, 9: -100.0}
  gap = stats.paired_gap_ci(a, b)
  assert gap.n == 4
  assert gap.mean == pytest.approx(np.mean([0.5, 0.5, 1.0, 0.6]))
  # Student's t, by hand: t_(0.975, 3) = 3.182446 (any t table).
  d = np.array([0.5, 0.5, 1.0, 0.6])
  half = 3.182446 * d.std(ddof=1) / 2
  assert (gap.lo, gap.hi) == pytest.approx((0.65 - half, 0.65 + half))
  # The studentized bootstrap: seeds 0 and 1 tie, so 16 of 256 resamples
  # have no spread and the upper end is unbounded; the lower one is > 0.
  boot = stats.paired_gap_ci(a, b, method="studentized")
  assert boot.lo > 0 and boot.hi == math.inf
  assert stats.verdict(boot) == stats.MATCHED_LESS
  assert stats.verdict(gap) == stats.MATCHED_LESS
  assert stats.verdict(stats.paired_gap_ci(b, a)) == stats.MATCHED_MORE
  assert stats.paired_gap_ci({0: 1.0}, {1: 1.0}) is stats.EMPTY
  assert stats.verdict(stats.EMPTY) == stats.UNRESOLVED


def test_verdict_needs_enough_seeds_and_an_interval_off_zero():
  assert stats.verdict(stats.Interval(0.2, 0.1, 0.3, 3)) == stats.MATCHED_LESS
  assert stats.verdict(stats.Interval(-.2, -.3, -.1, 3)) == stats.MATCHED_MORE
  assert stats.verdict(stats.Interval(0.2, -0.1, 0.3, 5)) == stats.UNRESOLVED
  # Two seeds: a percentile interval can exclude 0 but says little.
  two = stats.bootstrap_ci([0.1, 0.2], method="percentile")
  assert two.lo > 0 and stats.verdict(two) == stats.UNRESOLVED


def test_planted_gap_is_found_and_a_null_one_is_not():
  rng = np.random.default_rng(0)
  seeds = range(5)
  other = {s: rng.normal(-2.0, 0.3) for s in seeds}
  # Matched keeps 0.1 nats more on every seed, up to noise 0.01.
  matched = {s: other[s] + 0.1 + rng.normal(0, 0.01) for s in seeds}
  gap = stats.paired_gap_ci(matched, other)
  assert gap.lo > 0.07 and gap.hi < 0.13
  assert stats.verdict(gap) == stats.MATCHED_LESS
  # Null: both methods from the same distribution. Over 100 independent
  # experiments of 5 seeds the t interval wrongly resolves about 5%; the
  # percentile bootstrap far more (module docstring).
  resolved = {m: 0 for m in stats.METHODS}
  for trial in range(100):
    r = np.random.default_rng(100 + trial)
    a = {s: r.normal(-2.0, 0.1) for s in seeds}
    b = {s: r.normal(-2.0, 0.1) for s in seeds}
    for m in stats.METHODS:
      gap = stats.paired_gap_ci(a, b, method=m, n_boot=1000)
      resolved[m] += stats.verdict(gap) != stats.UNRESOLVED
  assert resolved["t"] <= 10, resolved
  assert resolved["percentile"] > resolved["t"], resolved
  # Same numbers on permuted seeds: mean gap 0, never resolved.
  vals = [-2.1, -1.9, -2.05, -1.95, -2.0]
  perm = dict(zip(seeds, vals[1:] + vals[:1]))
  null = stats.paired_gap_ci(dict(zip(seeds, vals)), perm)
  assert null.mean == pytest.approx(0.0, abs=1e-12)
  assert stats.verdict(null) == stats.UNRESOLVED


@pytest.mark.parametrize("df, q", [(1, 12.706205), (2, 4.302653),
                                   (3, 3.182446), (4, 2.776445),
                                   (9, 2.262157), (30, 2.042272)])
def test_t_quantile_matches_tables(df, q):
  # Two-sided 95% critical values of Student's t (any statistics table).
  assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=2e-6)
  assert stats.t_quantile(0.025, df) == pytest.approx(-q, abs=2e-6)
  assert stats.t_quantile(0.5, df) == pytest.approx(0.0, abs=1e-9)


def test_intervals_by_groups_rows_by_seed():
  rows = [{"optimizer": o, "seed": s, "acc": base + 0.01 * s}
          for o, base in (("adamw", 0.5), ("muon", 0.3)) for s in range(3)]
  out = stats.intervals_by(rows, ("optimizer",), "acc")
  assert set(out) == {("adamw",), ("muon",)}
  assert out[("adamw",)].mean == pytest.approx(0.51)
  assert out[("muon",)].n == 3
  with pytest.raises(ValueError, match="seed=0"):
    stats.intervals_by(rows + [rows[0]], ("optimizer",), "acc")


def test_compare_groups_for_memorization_rows():
  rows = [{"optimizer": "adamw", "seed": s, "logprob": -9.0 + 0.1 * s}
          for s in range(4)]
  rows += [{"optimizer": "muon", "seed": s, "logprob": -8.0 + 0.1 * s}
           for s in range(4)]
  rows.append({"optimizer": "base", "logprob": -23.0})
  muon, adamw, gap = stats.compare_groups(rows, "optimizer", "logprob",
                                          "muon", "adamw")
  assert muon.mean == pytest.approx(-7.85) and adamw.n == 4
  assert gap.mean == pytest.approx(1.0) and gap.lo == pytest.approx(1.0)
  assert gap.hi == pytest.approx(1.0)
  assert stats.describe(gap, "muon more", "muon less") == "muon more"
  with pytest.raises(ValueError, match="lion"):
    stats.compare_groups(rows, "optimizer", "logprob", "lion", "adamw")
