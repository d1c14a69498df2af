"""The report's intervals cover the truth of simulated studies (a small run).

bench/coverage.py simulates whole studies (bases x methods x seeds, curved
frontiers, pretraining-seed, finetuning-seed and eval-item noise) and runs
the report's own functions on them; `--studies 200` is the benchmark
(docs/benchmarks.md). Here 40 studies per design, with bounds several Monte
Carlo SEs wide: the report's interval as it is called (the default, a t
interval over 3 seeds) covers ~95% and Holm holds the null family to ~5%,
while the percentile bootstrap over the same 3 seeds covers ~68% and
excludes a null ~33% of the time, so these tests fail if the report's
default became the percentile bootstrap.
"""

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

from optconsist_jax.report import consistency

PATH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "coverage.py"
STUDIES = 40


@pytest.fixture(scope="module")
def cov():
  # bench/ is not a package; "coverage" is also pytest-cov's package name.
  spec = importlib.util.spec_from_file_location("bench_coverage", PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules["bench_coverage"] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules["bench_coverage"]


def rates(cov, design, methods=("default",), studies=STUDIES):
  tables = cov.run_scenario(design, methods, studies, rng_seed=0)
  return {m: {k: v["rate"] for k, v in t.items()} for m, t in tables.items()}


def test_truths_are_the_planted_effects(cov):
  # Identical frontiers plus a matched bonus delta: every per-base gap is
  # delta and every interaction 2 delta, by area and at L.
  t = cov.truth_of(cov.Design(column=False, delta=0.03))
  for v in [*t.gap_area.values(), *t.gap_level.values()]:
    assert v == pytest.approx(0.03, abs=1e-12)
  assert len(t.interaction) == 3
  for v in [*t.interaction.values(), *t.interaction_level.values()]:
    assert v == pytest.approx(0.06, abs=1e-12)
  # Column effects without delta: gaps differ from 0, interactions do not.
  t = cov.truth_of(cov.Design())
  assert min(abs(v) for v in t.gap_area.values()) > 1e-4
  assert max(abs(v) for v in t.interaction.values()) < 1e-12


def test_item_scores_average_to_the_mean(cov):
  # Over item samples the fraction right is the checkpoint's mean (the
  # population truth); on one item set its average over the checkpoint
  # noise is `expected_on` (the conditional truth).
  design = cov.Design(item_cell=0.15, item_check=0.05)
  rng = np.random.default_rng(0)
  mean_C = np.array([0.3, 0.5, 0.7])
  draws = [cov.scores(design, mean_C, cov.item_set(design, rng, 500),
                       ("adamw", "muon"), rng) for _ in range(400)]
  se = np.std(draws, axis=0, ddof=1) / math.sqrt(len(draws))
  assert np.all(np.abs(np.mean(draws, axis=0) - mean_C) < 4 * se)
  items = cov.item_set(design, rng, 200)
  draws = [cov.scores(design, mean_C, items, ("adamw", "muon"), rng)
           for _ in range(2000)]
  want = cov.expected_on(design, mean_C, items, ("adamw", "muon"))
  se = np.std(draws, axis=0, ddof=1) / math.sqrt(len(draws))
  assert np.all(np.abs(np.mean(draws, axis=0) - want) < 4 * se + 1e-12)
  # A threshold outside [0, 1] would bias the truth: refused.
  with pytest.raises(ValueError, match="out of"):
    cov.scores(design, np.array([0.95]), items, ("adamw", "muon"), rng)


def test_simulated_records_go_through_the_report(cov):
  design = cov.Design(seeds=3)
  records, truth, cond = cov.simulate(design, np.random.default_rng(1))
  # 3 bases x 4 methods x 3 seeds x 12 checkpoints, one base row per
  # pretraining seed and base.
  assert len([r for r in records if not r.is_base]) == 3 * 4 * 3 * 12
  assert len([r for r in records if r.is_base]) == 3 * 3
  summary = consistency.consistency_summary(records)
  assert {(s.base, s.method) for s in summary if s.role != "matched"} == set(
      truth.gap_area)
  assert all(s.family == 9 for s in summary if s.role != "matched")
  # Per-seed pretraining and items: nothing is shared, so the conditional
  # truth is the population truth.
  assert cond == truth


def test_t_intervals_cover_and_holm_holds_the_null(cov):
  # Every method the same: each per-base gap and interaction is 0.
  r = rates(cov, cov.Design(column=False))["default"]
  assert r["gap_area_covered"] >= 0.85
  assert r["interaction_area_covered"] >= 0.85
  assert r["gap_null_resolved_holm_any"] <= 0.15
  assert r["interaction_null_resolved_holm_any"] <= 0.15
  assert r["matrix_diagonal_best_wrong_any"] <= 0.15


def test_percentile_bootstrap_at_3_seeds_over_resolves(cov):
  # A method better on every base (per-base gaps != 0), no interaction: t
  # covers; the percentile interval over the same studies is too narrow.
  r = rates(cov, cov.Design(), methods=("default", "percentile"))
  t, pct = r["default"], r["percentile"]
  assert t["gap_area_covered"] >= 0.85
  assert t["interaction_area_covered"] >= 0.85
  assert t["interaction_null_resolved_holm_any"] <= 0.15
  assert t["interaction_null_interval_excludes_0"] <= 0.15
  assert pct["gap_area_covered"] < 0.85
  assert pct["interaction_area_covered"] < 0.85
  assert pct["interaction_null_interval_excludes_0"] >= 0.2
  # The report's verdicts are the t test's with Holm, whatever interval
  # is shown.
  assert (pct["interaction_null_resolved_holm_any"]
          == t["interaction_null_resolved_holm_any"])


def test_planted_interaction_is_resolved_most_of_the_time(cov):
  r = rates(cov, cov.Design(delta=0.05))["default"]
  assert r["interaction_area_covered"] >= 0.85
  assert r["interaction_nonzero_resolved_right_sign"] >= 0.6
  assert r["interaction_nonzero_resolved_wrong_sign"] == 0


def test_item_resampling_covers_what_one_shared_item_set_adds(cov):
  # One eval set for every seed with a strong item x cell affinity: the
  # records keep per-item scores, so the report resamples the items
  # (default) -- against the same report on the seeds alone.
  # Two bases and LoRA (4 gaps, 1 interaction per study) keep it short.
  design = cov.Design(bases=("adamw", "muon"), items="shared",
                      item_cell=0.15, item_check=0.05, resample_items=True)
  r = rates(cov, design, methods=("default", "seeds_only"), studies=30)
  items, seeds = r["default"], r["seeds_only"]
  assert items["gap_area_covered"] >= 0.87
  assert items["gap_area_covered"] > seeds["gap_area_covered"]
