"""Real faults: refused input, another run's workdir, corrupt checkpoints,
an unwritable or full checkpoint directory, and params-only epoch checkpoints.

Tiny config, a few steps each (tests/test_train.py's settings).
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from flax import nnx
import numpy as np
import pytest

from optconsist_jax.io import checkpoint_layout as checkpoints
from optconsist_jax.io import checkpointer as run_checkpoints
from optconsist_jax.io import weights
from optconsist_jax import errors
from optconsist_jax import train

sys.path.insert(0, os.path.dirname(__file__))
import test_train as tt  # noqa: E402  pylint: disable=g-import-not-at-top

# Its fixtures are built once per test session (session scope: a module
# fixture is rebuilt whenever xdist interleaves another module's tests), and
# every test here runs on the same xdist worker (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("reliability_reference")

REPO = tt.REPO


def _tree_hash(root):
  """sha256 over every path, mode and file content under root."""
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(dirnames + filenames):
      p = os.path.join(dirpath, name)
      st = os.lstat(p)
      h.update(f"{os.path.relpath(p, root)} {st.st_mode}".encode())
      if os.path.isfile(p):
        with open(p, "rb") as f:
          h.update(f.read())
  return h.hexdigest()


def _cfg(**extra):
  return tt._config(**{"train.num_steps": 8, "checkpoint.every_steps": 2,
                       "checkpoint.keep": None, "train.stats_every": 0,
                       **extra})


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """An uninterrupted run of 8 steps, checkpoints 2, 4, 6, 8."""
  w = tmp_path_factory.mktemp("reference")
  r = train.train(_cfg(), w)
  assert r.stopped == "done" and r.step == 8
  return w, r


@pytest.fixture(scope="session")
def four_steps(reference, tmp_path_factory):
  """The reference run as if stopped after 4 steps (checkpoints 2 and 4)."""
  w = tmp_path_factory.mktemp("four")
  shutil.copytree(reference[0], w, dirs_exist_ok=True)
  for step in (6, 8):
    shutil.rmtree(w / "checkpoints" / str(step))
  return w


def _copy(src, dst):
  shutil.copytree(src, dst, dirs_exist_ok=True)
  return dst


# ---------------------------------------------------------------------------
# One identity per workdir.


@pytest.mark.parametrize("extra, key", [
    ({"optim.groups.adamw.schedule.peak": 0.02},
     "optim.groups.adamw.schedule.peak: checkpoint has 0.003, config has"
     " 0.02"),
    ({"data.seed": 7}, "data.seed: checkpoint has 0, config has 7"),
    ({"model.intermediate_size": 192},
     "model.intermediate_size: checkpoint has 160, config has 192"),
])
def test_other_run_is_refused_and_workdir_untouched(four_steps, tmp_path,
                                                    extra, key):
  w = _copy(four_steps, tmp_path / "w")
  before = _tree_hash(w)
  with pytest.raises(errors.UserError) as e:
    train.train(_cfg(**extra), w)
  msg = str(e.value)
  assert "\n" not in msg, repr(msg)
  assert key in msg
  assert "checkpoints/4 was written for a different run" in msg
  assert "use a fresh --workdir" in msg
  assert _tree_hash(w) == before


def test_runtime_settings_may_change_on_resume(four_steps, tmp_path):
  """Mesh, logging and checkpoint cadence are not the run's identity."""
  w = _copy(four_steps, tmp_path / "w")
  r = train.train(_cfg(**{"mesh.preset": "dp_fsdp", "train.log_every": 3,
                          "checkpoint.every_steps": 4}), w)
  assert r.stopped == "done" and min(r.losses) == 5
  meta = checkpoints.read_meta(w / "checkpoints" / "8")
  # Each checkpoint records the config that wrote it.
  assert meta["config"]["mesh"]["data"] == 2
  assert meta["config"]["optim"]["groups"]["adamw"]["schedule"]["peak"] == 3e-3


def test_workdir_without_checkpoints_keeps_its_config(tmp_path):
  """A run stopped before its first save: W/config.json is its identity."""
  w = tmp_path / "w"
  w.mkdir()
  cfg = _cfg().resolve_total_steps(8)
  (w / "config.json").write_text(cfg.to_json())
  before = _tree_hash(w)
  with pytest.raises(errors.UserError, match=r"config.json was written for a"
                     r" different run: train.seed: checkpoint has 0, config"
                     r" has 1"):
    train.train(_cfg(**{"train.seed": 1}), w)
  assert _tree_hash(w) == before


# ---------------------------------------------------------------------------
# Resume past an unreadable checkpoint.


def _corrupt(step_dir, fault):
  if fault == "truncated_meta":
    f = step_dir / "meta" / "metadata"
    f.write_text(f.read_text()[:40])
  elif fault == "missing_meta":
    shutil.rmtree(step_dir / "meta")
  else:  # The arrays' data files overwritten after the save committed.
    for p in (step_dir / "params").rglob("*"):
      if p.is_file() and p.parent.name == "d":
        p.write_bytes(b"garbage")


@pytest.mark.parametrize("fault", ["truncated_meta", "missing_meta",
                                   "corrupt_array"])
def test_resume_falls_back_to_newest_readable(reference, four_steps, tmp_path,
                                              capsys, fault):
  w = _copy(four_steps, tmp_path / "w")
  _corrupt(w / "checkpoints" / "4", fault)
  r = train.train(_cfg(), w)
  assert r.stopped == "done" and min(r.losses) == 3  # Resumed from step 2.
  out = capsys.readouterr().out
  assert "checkpoints/4 is unreadable (" in out
  assert "moved it to" in out and "checkpoints/4.corrupt" in out
  assert (w / "checkpoints" / "4.corrupt").is_dir()
  assert [c.step for c in checkpoints.list_checkpoints(w)] == [2, 4, 6, 8]
  # The rerun's losses are those of an uninterrupted run.
  ref = reference[1]
  for step in range(3, 9):
    assert r.losses[step] == ref.losses[step], step


# ---------------------------------------------------------------------------
# A save that cannot be written.


def test_unwritable_checkpoint_dir_stops_with_one_line(four_steps, tmp_path):
  """W/checkpoints read-only (root's override dropped with setpriv)."""
  if shutil.which("setpriv") is None:
    pytest.skip("setpriv (util-linux) not installed")
  w = _copy(four_steps, tmp_path / "w")
  ckpt = w / "checkpoints"
  before = _tree_hash(ckpt)
  os.chmod(ckpt, 0o555)
  try:
    args = ["setpriv", "--inh-caps=-all", "--bounding-set=-all",
            *tt._command(w, **{"train.num_steps": 8,
                               "checkpoint.every_steps": 2,
                               "checkpoint.keep": 10,
                               "train.stats_every": 0})]
    t0 = time.monotonic()
    out = subprocess.run(args, cwd=REPO, env=tt._env(), capture_output=True,
                         text=True, timeout=600)
    took = time.monotonic() - t0
  finally:
    os.chmod(ckpt, 0o755)
  assert out.returncode == errors.SAVE_FAILED, out.stderr[-3000:]
  (line,) = [x for x in out.stderr.splitlines() if x.startswith("ERROR:")]
  assert line.startswith(f"ERROR: could not save checkpoint {ckpt}/6:")
  assert "Permission denied" in line
  assert f"last good checkpoint: {ckpt}/4 (step 4)" in line
  assert "Traceback" not in out.stderr
  assert _tree_hash(ckpt) == before  # Nothing half-written left behind.
  # Before: 300 s stall in Orbax's directory creation, then a TimeoutError.
  assert took < 290, took  # Startup included; the old stall alone was 300 s.


def _tmpfs(path, size):
  path.mkdir(parents=True, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                      str(path)], capture_output=True, text=True, check=False)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")


def test_uncommitted_save_names_the_error_orbax_logged(tmp_path, monkeypatch):
  """A write error Orbax's background thread only logged (not raised to
  check_for_errors) still reaches the message, on one line."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  c = run_checkpoints.RunCheckpoints(
      tmp_path / "w", run_checkpoints.CheckpointConfig(), model={})
  logged = ('RESOURCE_EXHAUSTED: Error writing "final_norm.scale/1": Failed'
            " to write 725530 bytes to file 15: No space left on device"
            " [os_error_code='28']")

  def save_that_only_logs(step, args, force):
    del step, args, force
    absl_logging.error(logged)
    return True

  monkeypatch.setattr(c._manager, "save", save_that_only_logs)
  c.save(4, params={"w": np.zeros(2, np.float32)},
         opt_state={"m": np.zeros(2, np.float32)})
  with pytest.raises(run_checkpoints.SaveFailedError) as e:
    c.wait()
  msg = str(e.value)
  assert "\n" not in msg
  assert "the save did not commit; Orbax logged RESOURCE_EXHAUSTED" in msg
  assert "No space left on device" in msg and "os_error_code" not in msg
  # The handler is gone once the save settled: later errors are not kept.
  assert c._logged not in __import__("logging").getLogger("absl").handlers


def test_full_disk_stops_training_and_leaves_no_tmp(four_steps, tmp_path):
  """W/checkpoints on a small tmpfs filled up after the first checkpoint."""
  w = tmp_path / "w"
  ckpt = w / "checkpoints"
  _tmpfs(ckpt, "64m")
  try:
    shutil.copytree(four_steps / "checkpoints" / "2", ckpt / "2")
    shutil.copy(four_steps / "config.json", w / "config.json")
    used = sum(p.stat().st_size for p in (ckpt / "2").rglob("*")
               if p.is_file())
    free = shutil.disk_usage(ckpt).free
    # Leave room for a fifth of a checkpoint.
    with open(ckpt / "filler", "wb") as f:
      f.write(b"\0" * max(0, free - used // 5))
    t0 = time.monotonic()
    with pytest.raises(run_checkpoints.SaveFailedError) as e:
      train.train(_cfg(), w)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"could not save checkpoint {ckpt}/4:")
    assert "No space left on device" in msg or "ENOSPC" in msg, msg
    assert f"last good checkpoint: {ckpt}/2 (step 2)" in msg
    # Nothing past the failed save: no later checkpoint, no temporary dir.
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["2", "filler"], names
    assert took < 120, took
  finally:
    subprocess.run(["umount", str(ckpt)], check=False)


# ---------------------------------------------------------------------------
# Params-only epoch checkpoints.


def test_epoch_checkpoints_keep_params_only(tmp_path):
  w = tmp_path / "w"
  # 14 steps per epoch: epoch end at 14, periodic saves every 4, keep 3.
  cfg = tt._config(**{"checkpoint.epoch_params_only": True,
                      "checkpoint.keep": 3, "train.stats_every": 0})
  r = train.train(cfg, w)
  assert r.step == tt.NUM_STEPS
  infos = {c.step: c for c in checkpoints.list_checkpoints(w)}
  assert sorted(infos) == [12, 14, 16]
  assert infos[14].epoch == 1 and infos[14].params_only
  assert not (w / "checkpoints" / "14" / "opt_state").exists()
  assert not infos[16].params_only and not infos[12].params_only
  # The eval job's read: params of both kinds.
  a = weights.restore_run_model(w / "checkpoints" / "14", cfg.model)
  b = weights.restore_run_model(w / "checkpoints" / "16", cfg.model)
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a = jax.tree.leaves(nnx.state(a, nnx.Param))
  leaves_b = jax.tree.leaves(nnx.state(b, nnx.Param))
  assert len(leaves_a) == len(leaves_b) > 0
  assert any(np.any(np.asarray(x) != np.asarray(y))
             for x, y in zip(leaves_a, leaves_b))
  # Resume passes over a params-only checkpoint (it cannot resume) without
  # setting it aside.
  shutil.rmtree(w / "checkpoints" / "16")
  cfg2 = tt._config(**{"checkpoint.epoch_params_only": True,
                       "checkpoint.keep": 3, "train.stats_every": 0})
  r2 = train.train(cfg2, w)
  assert min(r2.losses) == 13
  assert (w / "checkpoints" / "14" / "params").is_dir()
  assert not list((w / "checkpoints").glob("*.corrupt"))


# ---------------------------------------------------------------------------
# Refused input on the command line: one line, exit 2.


BAD_DATA_CONFIG = """
import importlib.util
spec = importlib.util.spec_from_file_location("t", {config!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)


def get_config(arg="adamw"):
  c = m.get_config(arg)
  c.data.format = "metamathqa"
  c.data.path = {path!r}
  return c
"""


@pytest.mark.parametrize("case", ["key", "variant", "missing", "record"])
def test_user_mistake_costs_one_line(tmp_path, case):
  data = tmp_path / "data.json"
  config = tmp_path / "bad_data.py"
  config.write_text(BAD_DATA_CONFIG.format(config=str(tt.CONFIG),
                                           path=str(data)))
  if case == "record":
    data.write_text(json.dumps([
        {"query": "What is 1+1?", "response": "2. The answer is: 2"},
        {"query": "What is 2+2?"}]))
  args = {
      "key": ["--config", str(tt.CONFIG), "--config.train.num_epoch=2"],
      "variant": ["--config", f"{tt.CONFIG}:adamx"],
      "missing": ["--config", str(config)],
      "record": ["--config", str(config)],
  }[case]
  w = tmp_path / "w"
  out = subprocess.run(
      [sys.executable, "-m", "optconsist_jax.train", *args, "--workdir",
       str(w)], cwd=REPO, env=tt._env(), capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [x for x in out.stderr.splitlines() if x.startswith("ERROR:")]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
  want = {
      "key": ("--config.train.num_epoch=2: the config has no key 'num_epoch'."
              ' Did you mean "num_epochs" instead of "num_epoch"?'),
      "variant": (f"--config={tt.CONFIG}:adamx: ValueError:"
                  " configs/tiny_metamath.py:adamx: unknown optimizer 'adamx'"),
      "missing": f"data file not found: {data}",
      "record": f"{data}: record 1",
  }[case]
  assert want in lines[0]
  assert "\\n" not in lines[0] and "\\'" not in lines[0]
  assert not w.exists()


def test_verbose_keeps_the_traceback(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "optconsist_jax.train", "--config",
       f"{tt.CONFIG}:adamx", "--workdir", str(tmp_path / "w"), "--verbose"],
      cwd=REPO, env=tt._env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "Traceback" in out.stderr and "ERROR: --config=" in out.stderr


def test_short_cause_drops_the_spec_dump():
  spec = json.dumps({"driver": "zarr", "kvstore": {"path": "x" * 500}})
  try:
    try:
      raise ValueError(
          'Error opening "zarr" driver: Error reading local file'
          ' "/w/checkpoints/4/params/d/abc": Invalid data'
          f" [source locations='a.cc:1'] [tensorstore_spec='{spec}']")
    except ValueError as inner:
      raise RuntimeError(f"restore failed: {inner}\n{spec}") from inner
  except RuntimeError as e:
    cause = errors.short_cause(e)
  assert cause == ('ValueError: Error opening "zarr" driver: Error reading'
                   ' local file "/w/checkpoints/4/params/d/abc": Invalid data')
