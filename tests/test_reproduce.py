"""The small-reproduction driver end to end, in its miniature mode."""

import importlib.util
import json
import os
import pathlib

import pytest

from optconsist_jax import report
from optconsist_jax.experiments import reproduce

REPO = pathlib.Path(__file__).resolve().parent.parent


def _mini_config():
  spec = importlib.util.spec_from_file_location(
      "small_consistency", REPO / "configs" / "small_consistency.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return reproduce.ReproConfig.from_dict(mod.get_config("mini").to_dict())


def _mtimes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[p] = os.stat(p).st_mtime_ns
  return out


def test_driver_end_to_end_then_skips_everything(tmp_path, monkeypatch):
  rc = _mini_config()
  outputs = reproduce.run(rc, str(tmp_path))

  # Every planned run trained and was marked done; 2 bases x 3 methods.
  bases, runs = reproduce.plan_runs(rc, str(tmp_path),
                                    str(tmp_path / "data" / "math_train.json"))
  assert len(bases) == 2 and len(runs) == 6
  for r in bases + runs:
    assert (pathlib.Path(r.workdir) / reproduce.DONE_FILE).exists(), r.name

  # One base point per base model, one point per epoch checkpoint per run.
  records = []
  for r in runs:
    records += report.read_workdir(r.workdir)
  assert sum(r.is_base for r in records) == 2
  finetuned = [r for r in records if not r.is_base]
  assert len(finetuned) == len(runs) * rc.finetune.epochs
  assert {(r.base, r.method) for r in finetuned} == {
      (b, m) for b in ("adamw", "muon") for m in ("adamw", "muon", "lora")}
  for r in records:
    assert r.learning_metric == "-math/response_loss"
    assert r.retention_metric == "-lm_loss/loss"
    assert r.learning == -r.metrics["math/response_loss"] < 0.0
    assert 0.0 <= r.metrics["math/metamath/acc"] <= 1.0
    assert r.retention < 0.0

  # The report: per-base frontiers, the summary table, fingerprints.
  for key in ("adamw_base_png", "muon_base_png", "all_svg", "summary",
              "fingerprints_spectra", "fingerprints_activations"):
    assert os.path.getsize(outputs[key]) > 0, key
  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  roles = {(s["base"], s["method"]): s["role"] for s in summary}
  assert roles[("adamw", "adamw")] == "matched"
  assert roles[("adamw", "muon")] == "mismatched"
  assert roles[("muon", "lora")] == "lora"

  # Second run: nothing trains or evaluates again, no output file changes
  # except the report and run_info, which are rewritten.
  before = _mtimes(tmp_path)

  def fail(*args, **kwargs):
    raise AssertionError("a finished step ran again")

  from optconsist_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, "train", fail)
  from optconsist_jax import evaluate  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(evaluate.Evaluator, "evaluate_model", fail)
  info = json.loads((tmp_path / "run_info.json").read_text())
  again = reproduce.run(rc, str(tmp_path))
  after = _mtimes(tmp_path)
  changed = sorted(p for p in before if after.get(p) != before[p])
  assert all(("/report/" in p) or p.endswith("run_info.json")
             for p in changed), changed

  # run_info keeps the first invocation's stage timings; the second one is
  # recorded as an invocation that ran nothing and skipped every stage.
  info2 = json.loads((tmp_path / "run_info.json").read_text())
  stages = {f"train/{r.name}" for r in bases + runs} | {
      f"eval/{r.name}" for r in runs} | {"fingerprints"} | (
          {"memorization"} if rc.memorization else set())
  assert set(info["stage_seconds"]) == stages
  assert info2["stage_seconds"] == info["stage_seconds"]
  assert [len(i["stages_run"]) for i in info2["invocations"]] == [
      len(stages), 0]
  assert set(info2["invocations"][1]["stages_skipped"]) == stages
  # The output listing of the rerun still names every picture.
  pngs = {k for k, v in outputs.items() if v.endswith(".png")}
  assert pngs >= {"adamw_base_png", "muon_base_png", "all_png",
                  "fingerprints_spectra", "fingerprints_activations"}
  assert {k for k, v in again.items() if v.endswith(".png")} == pngs


def test_unknown_keys_and_methods_are_named():
  with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
    reproduce.ReproConfig.from_dict({"bogus": 1, "model": {}})
  with pytest.raises(ValueError, match=r"finetune.methods: unknown optimizer"
                     r" 'adamz'"):
    reproduce.ReproConfig.from_dict({
        "model": {}, "finetune": {"methods": ["adamz"],
                                  "lrs": {"adamz": [1.0]}}})
