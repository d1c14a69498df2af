"""Run-to-run determinism: the same training command twice, bitwise-equal params.

Two separate processes (fresh compilation, fresh thread pools) run the tiny
Muon config on the test mesh of 8 CPU devices (FSDP: the gradient reductions
cross devices). XLA's CPU code partitions work by the size of its thread pool,
so results are reproducible for a given machine and core count;
bench/determinism.py measures what changes when the core count does (README,
"What the quick run found").
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_metamath.py"


def _train(workdir, steps=6):
  cmd = [sys.executable, "-m", "optconsist_jax.train", "--config",
         f"{CONFIG}:muon", "--workdir", str(workdir),
         f"--config.train.num_steps={steps}", "--config.train.stats_every=0",
         "--config.data.synthetic_examples=200",
         "--config.checkpoint.async_save=False"]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(REPO), os.environ.get("PYTHONPATH", "")])}
  p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]


def _params(workdir):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  config = ExperimentConfig.from_dict(
      json.loads((workdir / "config.json").read_text()))
  model = weights.restore_run_model(workdir, config.model)
  return {k: np.asarray(v[...])
          for k, v in nnx.state(model, nnx.Param).flat_state()}


def test_two_runs_give_bitwise_equal_params(tmp_path):
  _train(tmp_path / "a")
  _train(tmp_path / "b")
  a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
  assert a.keys() == b.keys() and len(a) > 5
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert np.array_equal(a[k], b[k]), (
        f"{k}: max |diff| {np.max(np.abs(a[k] - b[k]))}")
  # Both compared the step-6 checkpoint of a run that trained.
  for run in ("a", "b"):
    assert (tmp_path / run / "checkpoints" / "6").is_dir()
