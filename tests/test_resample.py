"""Eval items resampled: per-item scores, the hierarchical interval, the notes."""

import dataclasses
import math

import numpy as np
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import resample
from optconsist_jax.report import statistics as stats


def crossed_study(rng, seeds, items, sd_seed, sd_item, sd_noise, reps=200):
  """Per-seed means of y_sk = a_s + b_k + e_sk (truth 0) on one item set,
  and the mean over seeds on `reps` resamples of the items."""
  y_SK = (rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_item, items)
          + rng.normal(0, sd_noise, (seeds, items)))
  draws_BK = rng.multinomial(items, np.full(items, 1 / items), size=reps)
  reps_B = (draws_BK @ y_SK.T).mean(axis=1) / items
  return y_SK.mean(axis=1), reps_B


@pytest.mark.parametrize("sd_seed,sd_item,want_seed_only", [
    (0.02, 0.5, "undercovers"),   # items dominate (sd of their mean 0.05)
    (0.05, 0.0, "covers"),        # no item effect: the seed-only t interval
])
def test_hierarchical_interval_covers_where_seeds_alone_do_not(
    sd_seed, sd_item, want_seed_only):
  rng = np.random.default_rng(0)
  trials, hits, hits_seed, widths = 400, 0, 0, []
  for _ in range(trials):
    per_seed, reps = crossed_study(rng, 3, 100, sd_seed, sd_item, 0.1)
    iv, p = stats.hierarchical_ci(per_seed, reps)
    only = stats.t_ci(per_seed)
    hits += iv.lo <= 0 <= iv.hi
    hits_seed += only.lo <= 0 <= only.hi
    widths.append((iv.hi - iv.lo, only.hi - only.lo))
    # The p and the interval agree on the 5% boundary.
    assert (p < 0.05) == (not iv.lo <= 0 <= iv.hi)
  se = math.sqrt(0.95 * 0.05 / trials)
  assert abs(hits / trials - 0.95) < 3.5 * se
  w = np.array(widths)
  if want_seed_only == "undercovers":
    assert hits_seed / trials < 0.8
    assert np.mean(w[:, 0] > w[:, 1]) > 0.9
  else:
    assert abs(hits_seed / trials - 0.95) < 3.5 * se
    # Items add almost nothing: about the seed-only width.
    assert np.median(w[:, 0] / w[:, 1]) == pytest.approx(1.0, abs=0.2)


def test_hierarchical_interval_reduces_to_t_without_item_spread():
  x = [0.1, 0.3, 0.2]
  iv, p = stats.hierarchical_ci(x, [0.2, 0.2, 0.2])
  t = stats.t_ci(x)
  assert (iv.lo, iv.hi) == pytest.approx((t.lo, t.hi))
  assert p == pytest.approx(stats.t_test_p(x))
  with pytest.raises(ValueError, match="replicates"):
    stats.hierarchical_ci(x, [0.2])


def test_item_scores_from_predictions_and_records_round_trip(tmp_path):
  predictions = [
      {"eval": "math/metamath", "index": 1, "correct": False},
      {"eval": "math/metamath", "index": 0, "correct": True},
      {"eval": "math/response_loss", "index": 0, "nll": 3.25, "tokens": 5},
      {"eval": "math/response_loss", "index": 1, "nll": 1.0, "tokens": 2},
      {"eval": "lm_loss", "index": 0, "nll": 10.0, "tokens": 4},
      {"eval": "mc/arc_challenge", "id": "a", "label": 1, "pred": 1,
       "pred_norm": 0},
  ]
  items = results.item_scores(predictions)
  assert items == {
      "math/metamath/acc": {"sum": [1.0, 0.0]},
      "math/response_loss": {"sum": [3.25, 1.0], "count": [5, 2]},
      "lm_loss/loss": {"sum": [10.0], "count": [4]},
      "mc/arc_challenge/acc": {"sum": [1.0]},
      "mc/arc_challenge/acc_norm": {"sum": [0.0]}}
  r = results.EvalRecord(step=5, epoch=1.0, method="adamw", base="adamw",
                         lr=1e-4, learning=0.5, retention=-2.5, items=items,
                         base_id={"checkpoint": "b", "seed": 1})
  results.write_record(tmp_path, r)
  assert results.read_workdir(str(tmp_path))[0].items == items
  # Records written before items were kept still parse (empty).
  d = dict(r.__dict__)
  del d["items"], d["base_id"]
  assert results.parse_record(d, "old").items == {}
  d["items"] = {"lm_loss/loss": {"sum": [1.0, 2.0], "count": [3]}}
  with pytest.raises(results.EvalFileError, match=r"items\['lm_loss/loss'\]"):
    results.parse_record(d, "f.json")


def test_base_identity_reads_the_pretraining_run(tmp_path):
  (tmp_path / "config.json").write_text(
      '{"train": {"seed": 2}, "optim": {"groups": {"muon": {"schedule":'
      ' {"peak": 0.003}}, "adamw": {"schedule": {"peak": 0.001}}}}}')
  assert results.base_identity(str(tmp_path)) == {
      "checkpoint": str(tmp_path), "seed": 2,
      "lrs": {"muon": 0.003, "adamw": 0.001}}
  assert results.base_identity(str(tmp_path / "hf")) == {
      "checkpoint": str(tmp_path / "hf")}


def record(base, method, seed, step, learn_items, keep_items, base_ckpt):
  """A row whose learning is an accuracy and retention minus an LM loss."""
  nll, tokens = keep_items
  return results.EvalRecord(
      step=step, epoch=float(step), method=method, base=base, lr=1e-4,
      learning=float(np.mean(learn_items)),
      retention=-float(np.sum(nll) / np.sum(tokens)),
      learning_metric="math/metamath/acc", retention_metric="-lm_loss/loss",
      run=f"{base}_{method}_s{seed}", seed=seed,
      items={"math/metamath/acc": {"sum": [float(x) for x in learn_items]},
             "lm_loss/loss": {"sum": [float(x) for x in nll],
                              "count": [int(t) for t in tokens]}},
      base_id={"checkpoint": base_ckpt})


def test_resampled_rows_match_the_ratio_estimator_variance():
  rng = np.random.default_rng(1)
  k = 60
  learn = rng.integers(0, 2, k)
  tokens = rng.integers(5, 50, k)
  nll = tokens * rng.uniform(2, 4, k)
  rows = [record("adamw", "adamw", 0, 1, learn, (nll, tokens), "b0")]
  out = resample.item_resamples(rows, n_replicates=4000)
  assert out.items == {"learning": ("math/metamath/acc", k),
                       "retention": ("lm_loss/loss", k)}
  learn_B, keep_B = out.points_BN2[:, 0, 0], out.points_BN2[:, 0, 1]
  # The bootstrap variance of a mean: the plug-in variance over k; of the
  # token-weighted loss (a ratio): its delta-method variance.
  assert np.var(learn_B) == pytest.approx(np.var(learn) / k, rel=0.1)
  ratio = nll.sum() / tokens.sum()
  delta = np.sum((nll - ratio * tokens) ** 2) / tokens.sum() ** 2
  assert np.var(keep_B) == pytest.approx(delta, rel=0.1)
  assert np.mean(keep_B) == pytest.approx(rows[0].retention, abs=0.01)
  # A row without per-item scores: nothing resampled, and the note says why.
  old = results.EvalRecord(step=1, epoch=1.0, method="muon", base="adamw",
                           lr=1e-4, learning=0.1, retention=-3.0,
                           learning_metric="math/metamath/acc",
                           retention_metric="-lm_loss/loss", run="old")
  out = resample.item_resamples(rows + [old], n_replicates=10)
  assert out.items == {} and "no per-item" in out.missing["retention"]
  assert np.all(out.points_BN2[:, 1] == [0.1, -3.0])


def item_study(rng, seeds=3, k=200, sd_cell_item=0.4):
  """2 bases x 2 methods, identical truth (every gap 0), scored on one set
  of k documents whose per-document affinity to each (base, method) cell
  (sd `sd_cell_item` nats) is shared by every seed; the seeds differ by a
  small retention shift."""
  tokens = rng.integers(20, 60, k)
  affinity = {(b, m): rng.normal(0, sd_cell_item, k)
              for b in ("adamw", "muon") for m in ("adamw", "muon")}
  problems = 100
  rows = []
  for (b, m), g in affinity.items():
    for s in range(seeds):
      shift = rng.normal(0, 0.005)
      for step, learn_p in enumerate((0.2, 0.4, 0.6), 1):
        per_token = 3.0 + learn_p ** 2 + shift + g + rng.normal(
            0, 0.05, k)
        # Problem k is solved from learning level k / problems on (the
        # same problems by every run): the learning axis is not noisy.
        learn = np.arange(problems) < learn_p * problems
        rows.append(record(b, m, s, step, learn, (per_token * tokens, tokens),
                           f"bases/{b}_s{s}"))
  return rows


def test_report_intervals_cover_items_when_rows_keep_them():
  rows = item_study(np.random.default_rng(2))
  with_items = {(s.base, s.method): s
                for s in consistency.consistency_summary(rows)}
  seeds_only = {(s.base, s.method): s
                for s in consistency.consistency_summary(rows, items="off")}
  for key in (("adamw", "muon"), ("muon", "adamw")):
    a, b = with_items[key].gap_area, seeds_only[key].gap_area
    assert a.mean == pytest.approx(b.mean)
    # The shared document affinities dominate: wider with items.
    assert a.hi - a.lo > 2 * (b.hi - b.lo)
  (i_items,) = consistency.interactions(rows)
  (i_seeds,) = consistency.interactions(rows, items="off")
  assert i_items.by_area.hi - i_items.by_area.lo > 2 * (
      i_seeds.by_area.hi - i_seeds.by_area.lo)
  note = resample.covers_note(rows, resample.item_resamples(rows), "t")
  assert note.startswith("Intervals cover: pretraining + finetuning seeds"
                         " (n = 3;")
  assert "retention items (200 of lm_loss/loss, resampled)" in note
  assert "learning items (100 of math/metamath/acc, resampled)" in note
  note = resample.covers_note(rows, None, "percentile")
  assert "not the retention items' sampling error" in note


def test_report_item_intervals_cover_a_null_gap():
  # 40 studies of the null: the area gap (truth 0) is covered ~95% of the
  # time with items, far less by the seeds alone (the affinity is shared).
  hits = np.zeros(2)
  studies = 40
  for i in range(studies):
    rows = item_study(np.random.default_rng([3, i]), k=100)
    res = resample.item_resamples(rows, n_replicates=100)
    for col, items in enumerate((res, "off")):
      s = {(r.base, r.method): r for r in consistency.consistency_summary(
          rows, items=items)}
      gap = s[("adamw", "muon")].gap_area
      hits[col] += gap.lo <= 0 <= gap.hi
  assert hits[0] / studies >= 0.85
  assert hits[1] / studies <= 0.6


def test_finetuning_seeds_of_one_pretraining_checkpoint_are_one_unit():
  rng = np.random.default_rng(4)
  rows = []
  for b in ("adamw", "muon"):
    for m in ("adamw", "muon"):
      for s in range(4):
        for step, lp in enumerate((0.2, 0.4, 0.6), 1):
          keep = (np.full(10, 3.0 + lp + 0.1 * (m != b) + rng.normal(0, .01)),
                  np.ones(10))
          rows.append(record(b, m, s, step, rng.uniform(size=20) < lp, keep,
                             f"bases/{b}_p{s // 2}"))
  units = consistency.seed_units(rows)
  assert units[0] == units[1] != units[2] == units[3]
  summary = {(s.base, s.method): s for s in consistency.consistency_summary(
      rows, items="off")}
  gap = summary[("adamw", "muon")].gap_area
  assert gap.n == 2  # two pretraining checkpoints, not four seeds
  note = resample.covers_note(rows, None, "t")
  assert "pretraining seeds (n = 2 units: the 4 finetuning seeds" in note
  # One checkpoint per base: every finetuning seed is its own unit.
  one = [dataclasses.replace(r, base_id={"checkpoint": f"bases/{r.base}"})
         for r in rows]
  assert len(set(consistency.seed_units(one).values())) == 4
  assert "not the pretraining seed (base checkpoints per pretraining" in (
      resample.covers_note(one, None, "t"))


def mc_rows(correct, frac, methods=("adamw", "muon"), seeds=3):
  """Rows scored on the first `frac` of each benchmark's questions.

  `correct[b]` says which questions of benchmark b every row gets right
  (the seeds agree, so an interval is the items' alone). Retention is
  mc/mean (items from suite.mc_mean_items, as the eval job writes them),
  learning ARC's acc_norm; the headlines are computed here with numpy.
  """
  from optconsist_jax.evaluate import suite  # pylint: disable=g-import-not-at-top
  preds = []
  for b, right in correct.items():
    for i in range(int(len(right) * frac)):
      pick = 0 if right[i] else 1
      preds.append({"eval": f"mc/{b}", "benchmark": b, "id": f"{b}{i}",
                    "label": 0, "pred": pick, "pred_norm": pick})
  preds = [dict(p, items={"mc/mean": i})
           for p, i in zip(preds, suite.mc_mean_items(preds))]
  items = results.item_scores(preds)
  n = {b: int(len(right) * frac) for b, right in correct.items()}
  retention = float(np.mean([np.mean(correct[b][:n[b]]) for b in correct]))
  learning = float(np.mean(correct["arc_challenge"][:n["arc_challenge"]]))
  return [results.EvalRecord(
      step=1, epoch=1.0, method=m, base="adamw", lr=1e-4, learning=learning,
      retention=retention, learning_metric="mc/arc_challenge/acc_norm",
      retention_metric="mc/mean", run=f"adamw_{m}_s{s}", seed=s,
      items=items, base_id={"checkpoint": f"bases/adamw_s{s}"})
          for m in methods for s in range(seeds)]


def test_multiple_choice_items_resampled():
  rng = np.random.default_rng(5)
  p = {"hellaswag": 0.3, "arc_challenge": 0.6, "winogrande": 0.5}
  sizes = {"hellaswag": 400, "arc_challenge": 160, "winogrande": 240}
  correct = {b: rng.uniform(size=sizes[b]) < p[b] for b in p}
  widths = []
  for frac in (1.0, 0.5, 0.25):
    rows = mc_rows(correct, frac)
    # All weights 1: the recorded scores (ARC's acc_norm bit for bit).
    for role in ("learning", "retention"):
      sums_KN, counts_KN, sign, _, k = resample.role_items(rows, role)
      got_N = sign * resample.rescore(np.ones((1, k)), sums_KN, counts_KN)[0]
      want_N = [getattr(r, role) for r in rows]
      if role == "learning":
        assert got_N.tolist() == want_N
      np.testing.assert_allclose(got_N, want_N, rtol=1e-14)
    out = resample.item_resamples(rows, n_replicates=4000)
    n = {b: int(sizes[b] * frac) for b in p}
    assert out.items == {"retention": ("mc/mean", sum(n.values())),
                         "learning": ("mc/arc_challenge/acc_norm",
                                      n["arc_challenge"])}
    # The bootstrap variance of a mean of benchmark means, the questions
    # drawn from all benchmarks together: sum_b [v_b + (p_b - R)^2] /
    # (B^2 n_b) (report/resample.py's docstring); of one accuracy
    # p (1 - p) / n.
    hat = {b: np.mean(correct[b][:n[b]]) for b in p}
    r = rows[0].retention
    want = sum((hat[b] * (1 - hat[b]) + (hat[b] - r) ** 2) / (9 * n[b])
               for b in p)
    assert np.var(out.points_BN2[:, 0, 1]) == pytest.approx(want, rel=0.15)
    a = hat["arc_challenge"]
    assert np.var(out.points_BN2[:, 0, 0]) == pytest.approx(
        a * (1 - a) / n["arc_challenge"], rel=0.15)
    # The report's interval of a row's retention over seeds: wider with
    # fewer questions.
    iv, _ = stats.hierarchical_ci([r.retention for r in rows[:3]],
                                  out.points_BN2[:, :3, 1].mean(axis=1))
    widths.append(iv.hi - iv.lo)
    note = resample.covers_note(rows, out, "t")
    assert (f"retention items ({sum(n.values())} of mc/mean, resampled)"
            in note)
    assert (f"learning items ({n['arc_challenge']} of"
            " mc/arc_challenge/acc_norm, resampled)" in note)
  assert widths[0] < widths[1] < widths[2]
  assert widths[2] / widths[0] == pytest.approx(2.0, rel=0.15)
