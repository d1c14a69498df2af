"""Pareto frontier, results-file validation and the report outputs."""

import json
import os

import pytest

from optconsist_jax import report


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
  assert report.pareto_frontier(points) == [2, 6, 3, 1, 5]
  # Minimizing x (a loss): the smallest-x points win.
  assert report.pareto_frontier(points, maximize=(False, True)) == [2, 6]
  assert report.pareto_frontier([]) == []
  assert report.pareto_frontier([(1.0, 1.0)]) == [0]


def test_pareto_frontier_matches_brute_force_definition():
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(0)
  pts = [(rng.randint(0, 9) / 10, rng.randint(0, 9) / 10) for _ in range(60)]
  front = set(report.pareto_frontier(pts))
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
  with pytest.raises(report.EvalFileError) as e:
    report.read_workdir(str(w))
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
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_are_named(tmp_path, line, needle):
  path = str(tmp_path / "eval" / "results.jsonl")
  write(path, [line])
  with pytest.raises(report.EvalFileError) as e:
    report.read_results(path)
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
  rc = report.main([str(tmp_path / n) for n in runs] + ["--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  for name in ("pareto.png", "pareto.svg", "pareto.md"):
    assert (out / name).stat().st_size > 0
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
    report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
