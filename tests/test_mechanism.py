"""The mechanism report on synthetic results: a planted relation and a null.

Records of one base (AdamW) finetuned matched (AdamW) and switched (Muon)
over seeds, learning rates and epochs. A planted probe is lower for the
matched method and retention falls with it at equal learning; a null probe
is noise. The report must resolve the planted probe (matched lower, partial
r < 0) and not the null, over several synthetic studies.
"""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from optconsist_jax.evaluate import results
from optconsist_jax.report import mechanism
from optconsist_jax.report import probe_estimands
from optconsist_jax.report import statistics as stats

PLANTED, NULL = "probe/curvature_ratio", "probe/stable_rank/all"


def study(rng_seed, seeds=6):
  rng = np.random.default_rng(rng_seed)
  out = []
  for seed in range(seeds):
    for method, offset in (("adamw", 0.2), ("muon", 0.6)):
      for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        for epoch in (1, 2):
          learning = 0.1 * math.log10(lr * 1e5) * epoch + rng.normal(0, 0.01)
          planted = offset + 0.3 * learning + rng.normal(0, 0.02)
          retention = -learning - planted + rng.normal(0, 0.01)
          out.append(results.EvalRecord(
              step=epoch * 10, epoch=float(epoch), method=method,
              base="adamw", lr=lr, learning=learning, retention=retention,
              learning_metric="-math/response_loss",
              retention_metric="-lm_loss/loss",
              metrics={PLANTED: planted, NULL: float(rng.normal(1.0, 0.3))},
              run=f"{method}_lr{lr}_s{seed}", seed=seed))
  return out


def _row(rows, probe):
  (row,) = [r for r in rows if r.probe == probe]
  return row


def test_planted_resolved_null_not_over_studies():
  probes = [(PLANTED, "planted"), (NULL, "null")]
  null_resolved = 0
  for k in range(8):
    rows = probe_estimands.mechanism_table(study(k), probes)
    planted, null = _row(rows, PLANTED), _row(rows, NULL)
    assert planted.other == "muon" and planted.gap.n == 6
    assert planted.gap_verdict == probe_estimands.LOWER
    assert planted.gap.mean == pytest.approx(-0.4, abs=0.05)
    assert planted.r_verdict == probe_estimands.TRACKS_DOWN
    assert planted.partial_r.hi < 0
    null_resolved += (null.gap_verdict != stats.UNRESOLVED
                      or null.r_verdict != stats.UNRESOLVED)
  # Two tests at 5% each: about 0.8 of 8 studies by chance.
  assert null_resolved <= 2


def test_probe_at_level_interpolates_the_frontier():
  recs = [results.EvalRecord(step=s, epoch=1.0, method="adamw", base="adamw",
                             lr=1e-3, learning=l, retention=r,
                             metrics={"probe/x": p})
          for s, (l, r, p) in enumerate([(0.1, 1.0, 5.0), (0.3, 0.8, 7.0),
                                         (0.2, 0.5, 100.0)])]
  # (0.2, 0.5) is dominated by (0.3, 0.8): off the frontier.
  assert probe_estimands.probe_at_level(recs, "probe/x", 0.2) == (
      pytest.approx(6.0))
  assert probe_estimands.probe_at_level(recs, "probe/x", 0.05) == 5.0
  assert math.isnan(probe_estimands.probe_at_level(recs, "probe/x", 0.31))


def test_partial_correlation_matches_numpy_residuals():
  rng = np.random.default_rng(0)
  learning = rng.normal(size=40)
  probe = 2 * learning + rng.normal(size=40)
  retention = -learning + 0.5 * probe + rng.normal(size=40)
  ra = probe - np.polyval(np.polyfit(learning, probe, 1), learning)
  rb = retention - np.polyval(np.polyfit(learning, retention, 1), learning)
  want = np.corrcoef(ra, rb)[0, 1]
  assert probe_estimands.partial_correlation(probe, retention, learning) == (
      pytest.approx(want, rel=1e-9))


def test_write_appends_to_summary_and_draws_a_figure_per_probe(tmp_path):
  recs = study(0)
  summary = tmp_path / "summary.md"
  summary.write_text("# existing\n")
  paths = mechanism.write(recs, str(tmp_path), summary_path=str(summary))
  text = summary.read_text()
  assert text.startswith("# existing\n") and "## Mechanism" in text
  assert "matched lower" in text
  figs = [p for k, p in paths.items() if k.startswith("mechanism_")
          and p.endswith(".png")]
  # The PROBES these records carry: curvature ratio and stable rank.
  assert len(figs) == 2 and all(os.path.getsize(p) > 0 for p in figs)
  assert os.path.exists(paths["mechanism_json"])
  # No probes in the records: nothing written.
  plain = [r.__class__(**{**r.__dict__, "metrics": {}}) for r in recs]
  assert mechanism.write(plain, str(tmp_path / "none")) == {}


INTER, COLUMN = "probe/spectral_norm/all", "probe/stable_rank/all"


def two_bases(rng_seed, seeds=5):
  """Both bases finetuned both ways; every point on its run's frontier.

  Learning is fixed per (lr, epoch), muon's reaching further, so each
  base's L is adamw's largest learning and muon's probe is interpolated.
  INTER is 0.5 higher for matched finetuning (I = 1.0); COLUMN is 0.4
  higher for muon finetuning on both bases (I = 0).
  """
  rng = np.random.default_rng(rng_seed)
  out = []
  for base in ("adamw", "muon"):
    for method in ("adamw", "muon"):
      for seed in range(seeds):
        for k, learning in enumerate(np.linspace(0.1, 0.8, 6)
                                     * (1.1 if method == "muon" else 1.0)):
          out.append(results.EvalRecord(
              step=10 * (k + 1), epoch=float(k + 1), method=method,
              base=base, lr=1e-4, learning=float(learning),
              retention=float(-learning + rng.normal(0, 0.001) - k * 0.01),
              metrics={INTER: 0.5 * (method == base) + 0.3 * learning
                       + rng.normal(0, 0.05),
                       COLUMN: 0.4 * (method == "muon") + 0.3 * learning
                       + rng.normal(0, 0.05)},
              run=f"{base}_{method}_s{seed}", seed=seed))
  return out


def _by_numpy(records, probe):
  """I per seed: each run's probe at L by np.interp over its points."""
  at = {}
  for r in records:
    at.setdefault((r.base, r.method, r.seed), []).append(
        (r.learning, r.metrics[probe]))
  level = 0.8  # adamw's largest learning on every seed and base
  p = {k: np.interp(level, *np.array(sorted(v)).T) for k, v in at.items()}
  seeds = sorted({s for _, _, s in at})
  return np.array([p[("adamw", "adamw", s)] - p[("adamw", "muon", s)]
                   + p[("muon", "muon", s)] - p[("muon", "adamw", s)]
                   for s in seeds])


def test_probe_interaction_planted_and_column_effect():
  probes = [(INTER, "interaction"), (COLUMN, "column")]
  column_resolved = 0
  for k in range(8):
    records = two_bases(k)
    rows = {r.probe: r for r in probe_estimands.probe_interactions(
        records, probes)}
    want = _by_numpy(records, INTER)
    r = rows[INTER]
    assert (r.i, r.j, r.seeds) == ("adamw", "muon", (0, 1, 2, 3, 4))
    half = scipy_stats.t.ppf(0.975, 4) * want.std(ddof=1) / math.sqrt(5)
    assert (r.at_level.mean, r.at_level.lo, r.at_level.hi) == pytest.approx(
        (want.mean(), want.mean() - half, want.mean() + half))
    assert r.at_level.mean == pytest.approx(1.0, abs=0.15)
    assert r.verdict == probe_estimands.HIGHER and r.family == 2
    assert rows[COLUMN].at_level.mean == pytest.approx(
        _by_numpy(records, COLUMN).mean())
    column_resolved += rows[COLUMN].verdict != stats.UNRESOLVED
  # A column effect is no interaction: resolved by chance only (5% each).
  assert column_resolved <= 2


def test_write_puts_probe_interactions_beside_retention(tmp_path):
  records = two_bases(0)
  summary = tmp_path / "summary.md"
  summary.write_text("")
  paths = mechanism.write(records, str(tmp_path), summary_path=str(summary))
  text = summary.read_text()
  section = text[text.index("### Which probe"):]
  lines = [x for x in section.splitlines() if x.startswith("| ")]
  assert lines[1].startswith("| retention (")
  assert "| adamw, muon | 5 |" in lines[1]
  assert any(x.startswith("| spectral norm") and probe_estimands.HIGHER in x
             for x in lines)
  # What the intervals cover, under both mechanism tables.
  assert text.count("Intervals cover: finetuning seeds (n = 5)") == 2
  rows = json.loads(open(paths["mechanism_interactions_json"]).read())
  assert {r["probe"] for r in rows} == {INTER, COLUMN}
