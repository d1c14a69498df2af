"""What a run measures about itself: profiles, rates, memory, restart cost.

`config.profile.steps` (a jax.profiler trace into W/profile), the scalars the
loop logs (tokens/s per chip, device memory where the backend reports it),
read back from the TensorBoard event files, and the persistent compilation
cache (`config.train.compilation_cache_dir`) across two processes.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_config

from optconsist_jax import platforms
from optconsist_jax import train
from optconsist_jax.train import loop
from optconsist_jax.train.config import ProfileConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_metamath.py"
NUM_STEPS = 6
OVERRIDES = {
    "data.synthetic_examples": 120,
    "data.seq_len": 128,
    "data.global_batch_size": 8,
    "train.num_steps": NUM_STEPS,
    "train.log_every": 1,
    "train.stats_every": 0,
    "train.parameter_overview": False,
    "train.progress_every_secs": 1000.0,
    "checkpoint.every_steps": 0,
}


def _config(**extra):
  return tiny_config.load("adamw", {**OVERRIDES, **extra})


def _scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of the TensorBoard event files under logdir."""
  # deferred: tensorboard's reader loads protobufs; only this test needs it.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                for e in acc.Tensors(tag)}
          for tag in acc.Tags()["tensors"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same tiny run without and with a trace of steps 2..4."""
  plain = tmp_path_factory.mktemp("plain")
  traced = tmp_path_factory.mktemp("traced")
  return (plain, train.train(_config(), plain),
          traced, train.train(_config(**{"profile.steps": "2:4"}), traced))


def test_profile_writes_a_trace_and_leaves_the_losses_alone(runs):
  plain, r_plain, traced, r_traced = runs
  assert r_traced.step == r_plain.step == NUM_STEPS
  assert r_traced.losses == r_plain.losses  # Bitwise: tracing changes nothing.
  xplanes = list((traced / "profile" / "plugins" / "profile").glob(
      "*/*.xplane.pb"))
  assert len(xplanes) == 1 and xplanes[0].stat().st_size > 0, xplanes
  assert not (plain / "profile").exists()


def test_rates_and_memory_scalars_are_logged_and_consistent(runs):
  plain, result, _, _ = runs
  s = _scalars(plain / "metrics")
  tokens_per_step = 8 * 128  # global batch x seq_len: every slot counts.
  logged = sorted(s["tokens_per_s"])
  assert logged == list(range(2, NUM_STEPS + 1))  # Step 1 includes compiling.
  for step in logged:
    per_chip = s["tokens_per_s_per_chip"][step]
    np.testing.assert_allclose(per_chip * jax.device_count(),
                               s["tokens_per_s"][step], rtol=1e-5)
    np.testing.assert_allclose(s["tokens_per_s"][step] * s["step_time_s"][step],
                               tokens_per_step, rtol=1e-5)
  np.testing.assert_allclose(
      result.perf["tokens_per_s_per_chip"] * jax.device_count(),
      result.perf["tokens_per_s"], rtol=1e-12)
  # The CPU backend keeps no memory statistics: nothing is logged for it.
  has_stats = jax.local_devices()[0].memory_stats() is not None
  assert ("memory/bytes_in_use" in s) == has_stats
  assert ("memory/peak_bytes_in_use" in s) == has_stats


class _Device:

  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_device_memory_is_the_largest_over_local_devices(monkeypatch):
  devices = [_Device({"bytes_in_use": 5, "peak_bytes_in_use": 9,
                      "bytes_limit": 100}),
             _Device({"bytes_in_use": 7, "peak_bytes_in_use": 8})]
  monkeypatch.setattr(jax, "local_devices", lambda: devices)
  assert loop.device_memory() == {"memory/bytes_in_use": 7.0,
                                  "memory/peak_bytes_in_use": 9.0}
  monkeypatch.setattr(jax, "local_devices", lambda: [_Device(None)])
  assert not loop.device_memory()


@pytest.mark.parametrize("steps, window", [("", None), ("2:4", (2, 4)),
                                           ("3:3", (3, 3)), (" 1 : 10 ", (1, 10))])
def test_profile_steps_parse(steps, window):
  assert ProfileConfig(steps=steps).window() == window


@pytest.mark.parametrize("steps", ["4:2", "0:3", "3", "a:b", "2:4:6", "-1:2"])
def test_bad_profile_steps_are_named(steps):
  with pytest.raises(ValueError, match=re.escape(
      f"config.profile.steps={steps!r}: expected START:END")):
    _config(**{"profile.steps": steps})


def test_compilation_cache_dir_choices(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  where = platforms.compilation_cache_dir
  assert where("auto", "gs://bucket/run", "tpu") == (
      "gs://bucket/run/compilation_cache")
  assert where("auto", "/runs/a/", "tpu") == "/runs/a/compilation_cache"
  assert where("auto", "/runs/a", "cpu") is None
  assert where("auto", "/runs/a", "gpu") is None
  assert where("", "/runs/a", "tpu") is None
  assert where("gs://bucket/xla", "/runs/a", "cpu") == "gs://bucket/xla"
  assert where("cache/xla", "/runs/a", "cpu") == str(tmp_path / "cache/xla")


def _run_command(workdir, cache_dir):
  env = {k: v for k, v in os.environ.items()
         if k != "JAX_COMPILATION_CACHE_DIR"}  # conftest's session cache
  env.update(JAX_LOG_COMPILES="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = [sys.executable, "-m", "optconsist_jax.train", "--config",
          f"{CONFIG}:adamw", "--workdir", str(workdir),
          f"--config.train.compilation_cache_dir={cache_dir}"]
  # parameter_overview is a TrainConfig default the config file leaves out.
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()
           if k != "train.parameter_overview"]
  p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
  return p.stdout + p.stderr


def test_a_restart_loads_the_step_from_the_compilation_cache(tmp_path):
  cache = tmp_path / "xla"
  hit = r"Persistent compilation cache hit for '([^']+)'"
  first = _run_command(tmp_path / "w1", cache)
  assert [p for p in cache.rglob("*") if p.is_file()], "no cache entries"
  assert "jit_step" not in re.findall(hit, first)  # Compiled, then written.
  second = _run_command(tmp_path / "w2", cache)
  # step.make_train_step's program, loaded instead of compiled.
  assert "jit_step" in re.findall(hit, second), second[-3000:]
  loss = r"done: step 6, loss (\S+)\."
  assert re.search(loss, first)[1] == re.search(loss, second)[1]
