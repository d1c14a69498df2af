"""Learning-rate refinement near L (experiments/refine.py), on hand-made
records, on synthetic learning(lr) curves, and in the mini study."""

import json
import math
import pathlib

import numpy as np
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.experiments import refine
from optconsist_jax.experiments import reproduce
from optconsist_jax.experiments import study
from optconsist_jax.report import brackets
from optconsist_jax.report import consistency

import study_config


def _rec(method, lr, learning, retention, seed=0, base="b", epoch=1):
  return results.EvalRecord(
      step=10 * epoch, epoch=float(epoch), method=method, base=base, lr=lr,
      learning=learning, retention=retention, seed=seed,
      run=f"{base}-base__{method}__lr{lr:g}__s{seed}")


def _geometric_mean(a, b):
  return float(np.exp((np.log(a) + np.log(b)) / 2))


# "ref" has one point at learning 1.0: it sets the base's L = 1.0 whenever
# every other frontier reaches further.
_REF = [_rec("ref", 1e-3, 1.0, -1.0)]
_GRID = (1e-4, 2e-4, 4e-4)


def _grids(**extra):
  return {("b", "m"): list(_GRID), ("b", "ref"): [1e-3], **extra}


def test_a_too_wide_bracket_between_adjacent_lrs_gets_their_midpoint():
  # m's frontier: 0.2 (1e-4), 1.5 (2e-4), 2.0 (4e-4); L = 1.0 lies between
  # 1e-4's and 2e-4's checkpoints, 1.3 apart.
  records = _REF + [_rec("m", 1e-4, 0.2, -0.1), _rec("m", 2e-4, 1.5, -0.5),
                    _rec("m", 4e-4, 2.0, -1.0)]
  p = refine.plan(records, _grids())
  assert p.levels == {"b": 1.0}
  assert p.widths[("b", "m")] == pytest.approx(1.3)
  assert p.widths[("b", "ref")] == 0.0  # L is ref's own point
  assert list(p.added) == [("b", "m")]
  (lr,) = p.added[("b", "m")]
  assert lr == pytest.approx(_geometric_mean(1e-4, 2e-4), rel=1e-12)
  assert 1e-4 < lr < 2e-4 and not p.wide
  # Two seeds wide between the same pair: still one midpoint; one seed wide
  # between another pair adds that pair's midpoint too.
  more = records + [_rec("m", 1e-4, 0.1, -0.1, seed=1),
                    _rec("m", 2e-4, 1.9, -0.4, seed=1),
                    _rec("m", 4e-4, 2.5, -1.0, seed=1),
                    _rec("m", 1e-4, 0.3, -0.1, seed=2),
                    _rec("m", 2e-4, 0.5, -0.2, seed=2),
                    _rec("m", 4e-4, 1.4, -0.9, seed=2)]
  p = refine.plan(more, _grids())
  assert p.added[("b", "m")] == pytest.approx(
      (_geometric_mean(1e-4, 2e-4), _geometric_mean(2e-4, 4e-4)), rel=1e-12)
  # The order the records come in changes nothing.
  rng = np.random.default_rng(0)
  for _ in range(5):
    shuffled = [more[i] for i in rng.permutation(len(more))]
    assert refine.plan(shuffled, _grids()) == p


def test_a_narrow_bracket_gets_nothing():
  records = _REF + [_rec("m", 1e-4, 0.9, -0.1), _rec("m", 2e-4, 1.1, -0.5),
                    _rec("m", 4e-4, 2.0, -1.0)]
  p = refine.plan(records, _grids())
  assert p.widths[("b", "m")] == pytest.approx(0.2)
  assert not p.added and not p.wide
  # At a looser or tighter bar the same bracket is or is not split.
  assert not refine.plan(records, _grids(), max_width=0.21).added
  assert refine.plan(records, _grids(), max_width=0.19).added


def test_l_outside_a_frontier_gets_nothing():
  # m's least learning (1.2) is above L = 1.0: the grid needs a lower end.
  records = _REF + [_rec("m", 1e-4, 1.2, -0.3), _rec("m", 2e-4, 1.5, -0.5)]
  p = refine.plan(records, _grids())
  assert not p.added
  assert math.isnan(p.widths[("b", "m")])
  assert [(w.method, w.why) for w in p.wide] == [
      ("m", "L outside the frontier")]


def test_brackets_it_cannot_split_are_listed_not_extrapolated():
  # Two epochs of one run bracket L: no learning rate between them.
  one_lr = _REF + [_rec("m", 2e-4, 0.2, -0.1, epoch=1),
                   _rec("m", 2e-4, 1.5, -0.5, epoch=2)]
  p = refine.plan(one_lr, _grids())
  assert not p.added
  assert [(w.why, w.lrs) for w in p.wide] == [("one learning rate",
                                              (2e-4, 2e-4))]
  # 2e-4's checkpoint is off the frontier: 1e-4 and 4e-4 bracket L, and
  # they are not adjacent on the grid.
  skip = _REF + [_rec("m", 1e-4, 0.2, -0.1), _rec("m", 2e-4, 0.3, -0.9),
                 _rec("m", 4e-4, 1.5, -0.5)]
  p = refine.plan(skip, _grids())
  assert not p.added
  assert [(w.why, w.lrs) for w in p.wide] == [("not adjacent on the grid",
                                              (1e-4, 4e-4))]


def _curve(lr, lr0, top):
  """A monotone learning(lr) (log-logistic) and the retention it costs."""
  learning = top / (1.0 + (lr0 / lr) ** 1.5)
  return learning, -learning ** 1.5


def test_b_each_midpoint_narrows_the_bracket_until_it_meets_the_bar():
  rng = np.random.default_rng(1)
  for _ in range(40):
    lr0 = float(np.exp(rng.uniform(np.log(2e-4), np.log(2e-3))))
    top = float(rng.uniform(1.5, 4.0))
    grid = [1e-4 * 2.0 ** k for k in range(6)]
    lows = [_curve(x, lr0, top)[0] for x in grid]
    level = float(rng.uniform(lows[0], lows[-1]))
    records = [_rec("ref", 1e-3, level, -1.0)] + [
        _rec("m", x, *_curve(x, lr0, top)) for x in grid]
    grids = {("b", "m"): grid, ("b", "ref"): [1e-3]}
    p = refine.plan(records, grids)
    assert p.levels["b"] == pytest.approx(level)
    for _ in range(12):
      if not p.added:
        break
      width = p.widths[("b", "m")]
      assert width > brackets.MAX_WIDTH
      (lr,) = p.added[("b", "m")]
      records.append(_rec("m", lr, *_curve(lr, lr0, top)))
      grids[("b", "m")] = sorted(grids[("b", "m")] + [lr])
      p = refine.plan(records, grids)
      # The midpoint's checkpoint lands strictly inside the old bracket
      # (learning is monotone in lr), so the bracket shrinks; L is ref's.
      assert p.levels["b"] == pytest.approx(level)
      assert p.widths[("b", "m")] < width
    assert not p.added
    assert p.widths[("b", "m")] <= brackets.MAX_WIDTH
    # The report reads the same width off the same records.
    fronts = consistency.seed_frontiers(records)
    front = fronts[("b", "m")][0]
    lo, hi = brackets.points_around(front, level)
    assert hi[0] - lo[0] == pytest.approx(p.widths[("b", "m")])


def test_plan_runs_adds_the_midpoints_for_every_seed_on_one_base_only():
  rc = study_config.config("mini")
  _, runs = study.plan_runs(rc, "/w", "/w/train.json")
  mid = _geometric_mean(1e-3, 2e-3)
  _, more = study.plan_runs(rc, "/w", "/w/train.json",
                            extra_lrs={("adamw", "muon"): [mid]})
  added = [r for r in more if r.name not in {q.name for q in runs}]
  assert {(r.labels["base"], r.labels["method"], r.labels["lr"])
          for r in added} == {("adamw", "muon", mid)}
  assert sorted(r.labels["seed"] for r in added) == list(range(
      rc.seed, rc.seed + rc.finetune.seeds))
  groups = dict(study.population_groups(rc, [], added))
  assert list(groups) == ["bases__muon"]
  assert refine.grids_of(r.labels for r in more)[("adamw", "muon")] == [
      1e-3, mid]


def test_refine_settings_are_checked():
  with pytest.raises(ValueError, match="refine_rounds=-1"):
    study_config.config("mini", finetune__refine_rounds=-1)
  with pytest.raises(ValueError, match="refine_max_width=-0.1"):
    study_config.config("mini", finetune__refine_max_width=-0.1)
  for mode in ("quick", "matrix", "mini", "causal"):
    assert study_config.config(mode).finetune.refine_rounds == 0, mode
  assert study_config.config("standard").finetune.refine_rounds == 2


def test_c_mini_study_refines_trains_evaluates_and_reports(tmp_path,
                                                          monkeypatch):
  # One base, one method, two learning rates 10x apart, two seeds; any
  # width > 0 is too wide. The mini base is barely pretrained (4 steps), so
  # finetuning lowers the held-out LM loss and the response loss together;
  # with the response loss itself as the learning axis the two learning
  # rates trade off (both on each seed's frontier), the seed with the lower
  # loss at the low rate sets L, and the other seed's two checkpoints
  # bracket it.
  rc = study_config.config(
      "mini", pretrain__optimizers=("adamw",), finetune__methods=("adamw",),
      finetune__lrs={"adamw": (3e-4, 3e-3)}, finetune__epochs=1,
      finetune__refine_rounds=1, finetune__refine_max_width=0.0,
      eval__probes=False, eval__learning_metric="math/response_loss",
      fingerprints={"enabled": False},
      reproduce={"bases": "", "matrix": "never"})
  outputs = reproduce.run(rc, str(tmp_path))
  info = json.loads((tmp_path / "run_info.json").read_text())
  ref = info["refinement"]
  mid = _geometric_mean(3e-4, 3e-3)
  assert [(e["round"], e["base"], e["method"]) for e in ref["added"]] == [
      (1, "adamw", "adamw")]
  assert ref["added"][0]["lrs"] == pytest.approx([mid], rel=1e-12)
  assert ref["added"][0]["width_after"] < ref["added"][0]["width_before"]
  assert info["runs"] == 3 * rc.finetune.seeds
  # The added runs trained (one population) and were evaluated.
  train_file = str(tmp_path / "data" / "math_train.json")
  _, runs = study.plan_runs(rc, str(tmp_path), train_file,
                            extra_lrs={("adamw", "adamw"): [mid]})
  added = [r for r in runs if r.labels["lr"] == pytest.approx(mid)]
  assert len(added) == rc.finetune.seeds
  for r in added:
    done = json.loads((pathlib.Path(r.workdir) /
                       reproduce.DONE_FILE).read_text())
    assert done["population_size"] == rc.finetune.seeds
    assert [x.lr for x in results.read_workdir(r.workdir)] == [r.labels["lr"]]
  stages = set(info["stage_seconds"])
  assert "refine1/train/bases__adamw" in stages
  assert {f"refine1/eval/{r.name}" for r in added} <= stages
  # The report's records hold them, and its text says the grid was refined.
  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  (row,) = summary
  assert row["points"] == 3 * rc.finetune.seeds * rc.finetune.epochs
  md = pathlib.Path(outputs["summary"]).read_text()
  assert "Learning-rate grid refined near L" in md
  assert f"{mid:.3g}" in md

  # A rerun plans the same learning rates from the same records and
  # trains and evaluates nothing.
  def fail(*args, **kwargs):
    raise AssertionError("a finished step ran again")

  from optconsist_jax.train import population  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import job  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(population, "train_population", fail)
  monkeypatch.setattr(job.Evaluator, "evaluate_model", fail)
  reproduce.run(rc, str(tmp_path))
  again = json.loads((tmp_path / "run_info.json").read_text())
  assert again["refinement"] == ref
  assert again["invocations"][1]["stages_run"] == []
