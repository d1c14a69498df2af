"""The mechanism report on synthetic results: a planted relation and a null.

Records of one base (AdamW) finetuned matched (AdamW) and switched (Muon)
over seeds, learning rates and epochs. A planted probe is lower for the
matched method and retention falls with it at equal learning; a null probe
is noise. The report must resolve the planted probe (matched lower, partial
r < 0) and not the null, over several synthetic studies.
"""

import math
import os

import numpy as np
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.report import mechanism
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
    rows = mechanism.mechanism_table(study(k), probes)
    planted, null = _row(rows, PLANTED), _row(rows, NULL)
    assert planted.other == "muon" and planted.gap.n == 6
    assert planted.gap_verdict == mechanism.LOWER
    assert planted.gap.mean == pytest.approx(-0.4, abs=0.05)
    assert planted.r_verdict == mechanism.TRACKS_DOWN
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
  assert mechanism.probe_at_level(recs, "probe/x", 0.2) == pytest.approx(6.0)
  assert mechanism.probe_at_level(recs, "probe/x", 0.05) == 5.0
  assert math.isnan(mechanism.probe_at_level(recs, "probe/x", 0.31))


def test_partial_correlation_matches_numpy_residuals():
  rng = np.random.default_rng(0)
  learning = rng.normal(size=40)
  probe = 2 * learning + rng.normal(size=40)
  retention = -learning + 0.5 * probe + rng.normal(size=40)
  ra = probe - np.polyval(np.polyfit(learning, probe, 1), learning)
  rb = retention - np.polyval(np.polyfit(learning, retention, 1), learning)
  want = np.corrcoef(ra, rb)[0, 1]
  assert mechanism.partial_correlation(probe, retention, learning) == (
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
