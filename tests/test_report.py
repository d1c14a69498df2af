"""Pareto frontier, results-file validation and the report outputs."""

import json
import os

import pytest

from optconsist_jax.report import __main__ as report_cli
from optconsist_jax.report import tables as report

from optconsist_jax.evaluate import results


def test_pareto_frontier_hand_made():
  points = [
      (0.50, 0.10),  # 0 base-like: dominated by 1
      (0.55, 0.30),  # 1 frontier
      (0.40, 0.60),  # 2 frontier
      (0.45, 0.55),  # 3 frontier (more x than 2, less y)
      (0.44, 0.50),  # 4 dominated by 3
      (0.60, 0.20),  # 5 frontier (best x)
      (0.40, 0.60),  # 6 duplicate of 2: neither dominates, both kept
      (0.55, 0.25),  # 7 dominated by 1 (same x, less y)
  ]
  assert results.pareto_frontier(points) == [2, 6, 3, 1, 5]
  # Minimizing x (a loss): the smallest-x points win.
  assert results.pareto_frontier(points, maximize=(False, True)) == [2, 6]
  assert results.pareto_frontier([]) == []
  assert results.pareto_frontier([(1.0, 1.0)]) == [0]


def test_pareto_frontier_matches_brute_force_definition():
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(0)
  pts = [(rng.randint(0, 9) / 10, rng.randint(0, 9) / 10) for _ in range(60)]
  front = set(results.pareto_frontier(pts))
  for i, (x, y) in enumerate(pts):
    dominated = any(a >= x and b >= y and (a, b) != (x, y) for a, b in pts)
    assert (i in front) == (not dominated)


def record(**kw):
  d = {"step": 100, "epoch": 1.0, "method": "adamw", "base": "adamw",
       "lr": 1e-5, "learning": 0.3, "retention": 0.6}
  d.update(kw)
  return d


def write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_missing_fields_are_named(tmp_path):
  w = tmp_path / "run"
  bad = record()
  del bad["lr"], bad["retention"]
  write(str(w / "eval" / "results.jsonl"), [record(), "", bad])
  with pytest.raises(results.EvalFileError) as e:
    results.read_workdir(str(w))
  msg = str(e.value)
  assert "results.jsonl:3" in msg and "'lr'" in msg and "'retention'" in msg


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not JSON"),
    (json.dumps(record(step="7")), "field 'step' must be int"),
    (json.dumps(record(is_base=1)), "field 'is_base' must be bool"),
    (json.dumps(record(step=True)), "field 'step' must be int"),
    (json.dumps(record(learning=float("nan"))), "field 'learning' is nan"),
    (json.dumps(record(metrics={"acc": "high"})), "metrics ['acc']"),
    (json.dumps(record(colour="red")), "unknown fields ['colour']"),
    (json.dumps(record(seed="1")), "field 'seed' must be int"),
    (json.dumps(record(seed=1.0)), "field 'seed' must be int"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_are_named(tmp_path, line, needle):
  path = str(tmp_path / "eval" / "results.jsonl")
  write(path, [line])
  with pytest.raises(results.EvalFileError) as e:
    results.read_results(path)
  assert f"{path}:1" in str(e.value) and needle in str(e.value)


def test_report_end_to_end(tmp_path, capsys):
  runs = {
      "adamw_run": [record(step=s, epoch=e, learning=l, retention=r)
                    for s, e, l, r in [(10, 1, 0.30, 0.58), (20, 2, 0.40, 0.55),
                                       (30, 3, 0.42, 0.50)]],
      "muon_run": [record(step=s, epoch=e, method="muon", learning=l,
                          retention=r)
                   for s, e, l, r in [(10, 1, 0.25, 0.56), (20, 2, 0.35, 0.52),
                                      (20, 2, 0.36, 0.52)]],  # re-evaluated
      "base": [record(step=0, epoch=0.0, method="base", lr=0.0, learning=0.1,
                      retention=0.60, is_base=True,
                      metrics={"lm_loss": 3.0})],
  }
  for name, rows in runs.items():
    write(str(tmp_path / name / "eval" / "results.jsonl"), rows)
  out = tmp_path / "out"
  rc = report_cli.main([str(tmp_path / n) for n in runs] + ["--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  for name in ("pareto.png", "pareto.svg", "pareto.md", "summary.md",
               "summary.json", "frontiers.png", "gaps.png"):
    assert (out / name).stat().st_size > 0
  # One pretraining optimizer: no matrix unless asked for.
  assert not (out / "matrix.md").exists()
  # One seed: the gap is measured but never resolved.
  summary = json.loads((out / "summary.json").read_text())
  (muon,) = [s for s in summary if s["method"] == "muon"]
  assert muon["gap_vs_matched"]["n"] == 1
  # One seed bounds nothing: the ends are null (strict JSON).
  assert muon["gap_vs_matched"]["lo"] is None
  assert muon["verdict"] == "no difference resolved"
  assert f"outputs in {out}" in capsys.readouterr().out
  table = (out / "pareto.md").read_text().splitlines()
  assert len(table) == 2 + 3 + 2 + 1  # header + points (re-eval deduped)
  frontier_rows = [l for l in table if l.endswith("| yes |")]
  # Frontier: base (0.60, 0.1), adamw epochs 1-3; muon is dominated.
  assert len(frontier_rows) == 4
  assert not any("muon" in l for l in frontier_rows)
  assert any("0.3600" in l for l in table) and not any("0.3500" in l
                                                      for l in table)
  svg = (out / "pareto.svg").read_text()
  assert "Pareto frontier" in svg and "base model" in svg


def test_report_errors_are_reported(tmp_path, capsys):
  from optconsist_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match="no eval results"):
    report_cli.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


def test_seed_is_read_and_defaults_to_zero(tmp_path):
  path = str(tmp_path / "eval" / "results.jsonl")
  write(path, [record(), record(step=200, seed=3)])
  assert [r.seed for r in results.read_results(path)] == [0, 3]
  assert json.loads(results.EvalRecord(**record(seed=2)).to_json())["seed"] == 2


def test_headline_records_negate_losses():
  (r,) = report.headline_records(
      [results.EvalRecord(**record(metrics={"lm_loss/loss": 3.5, "acc": 0.4}))],
      x_metric="lm_loss/loss", y_metric="acc")
  assert (r.retention, r.retention_metric) == (-3.5, "-lm_loss/loss")
  assert (r.learning, r.learning_metric) == (0.4, "acc")


def test_matrix_from_the_command_line(tmp_path, capsys):
  # 3 pretraining optimizers x (3 full finetuning + LoRA) x 3 seeds, one LR
  # and three epochs each; the diagonal keeps 0.1 more retention.
  bases = ("adamw", "muon", "lion")
  dirs = []
  for b in bases:
    for m in bases + ("lora",):
      for seed in range(3):
        name = f"{b}_{m}_s{seed}"
        rows = [record(step=10 * e, epoch=float(e), base=b, method=m,
                       seed=seed, learning=0.1 * e,
                       retention=-1 - 0.2 * e + 0.01 * seed
                       + (0.1 if m == b else 0.0))
                for e in (1, 2, 3)]
        write(str(tmp_path / name / "eval" / "results.jsonl"), rows)
        dirs.append(str(tmp_path / name))
  out = tmp_path / "out"
  assert report_cli.main(dirs + ["--out", str(out)]) == 0, capsys.readouterr().err
  for name in ("matrix.md", "matrix.json", "matrix.png", "matrix.svg"):
    assert (out / name).stat().st_size > 0, name
  table = (out / "matrix.md").read_text()
  # Columns: the pretraining optimizers in row order, LoRA last.
  assert "| adamw | lion | muon | lora |" in table
  assert table.count("| yes |") == 3
  rows = json.loads((out / "matrix.json").read_text())
  assert [r["base"] for r in rows] == ["adamw", "lion", "muon"]
  assert [r["diagonal_best"] for r in rows] == ["yes"] * 3
  for r in rows:
    assert r["level"] == pytest.approx(0.3)
    assert r["diagonal_margin"]["mean"] == pytest.approx(0.1, abs=1e-9)
    assert r["cells"][r["base"]]["mean"] == pytest.approx(-1.6 + 0.1 + 0.01)
  assert "matrix.png" in capsys.readouterr().out


def test_eval_job_labels_rows_with_the_train_seed():
  from optconsist_jax.evaluate import job  # pylint: disable=g-import-not-at-top
  data = {"format": "stdlib"}
  run = job.run_info({"model": {}, "data": data,
                      "train": {"seed": 5, "num_epochs": 1}}, "cfg")
  assert run.seed == 5
  assert job.run_info({"model": {}, "data": data,
                       "train": {"num_epochs": 1}}, "cfg").seed == 0
