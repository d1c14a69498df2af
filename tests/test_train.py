"""The training loop end to end on the tiny config (8 fake CPU devices, fp32).

One uninterrupted reference run (module fixture) is compared with runs that
are killed (SIGKILL), preempted (SIGTERM), moved to another mesh, or poisoned
with an infinite learning rate.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_config

from flax import nnx

from optconsist_jax import sharding
from optconsist_jax import train
from optconsist_jax.train import guards as train_guards
from optconsist_jax.train import setup as train_setup
from optconsist_jax.train import state as state_lib
from optconsist_jax.train.config import ExperimentConfig
from optconsist_jax.io import checkpoint_layout as checkpoints
from optconsist_jax.io import checkpointer as run_checkpoints
from optconsist_jax.io import weights

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_metamath.py"
NUM_STEPS = 16

# Small enough for a loaded 2-core machine: 14 steps per epoch, so the runs
# cross an epoch boundary.
OVERRIDES = {
    "data.synthetic_examples": 120,
    "data.seq_len": 128,
    "data.global_batch_size": 8,
    "train.num_steps": NUM_STEPS,
    "train.log_every": 1,
    "train.stats_every": 4,
    "train.progress_every_secs": 1000.0,
    "checkpoint.every_steps": 4,
}


def _config(arg="adamw", **extra):
  return tiny_config.load(arg, {**OVERRIDES, **extra})


def _command(workdir, **extra):
  args = [sys.executable, "-m", "optconsist_jax.train", "--config",
          str(CONFIG), "--workdir", str(workdir)]
  args += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]
  return args


def _env():
  env = dict(os.environ)
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  return env


def _params(workdir, step):
  """Params of one checkpoint, on one device, as numpy arrays."""
  ref = checkpoints.checkpoint_dir(workdir) / str(step) / checkpoints.PARAMS
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(ref).item_metadata.tree
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    tree = ckptr.restore(ref, args=ocp.args.PyTreeRestore(
        restore_args=as_numpy))
  return {k: np.asarray(v) for k, v in _flat(tree).items()}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _wait_for_checkpoint(workdir, proc, min_step, timeout=300, poll=0.05):
  t0 = time.time()
  while time.time() - t0 < timeout:
    done = [c.step for c in checkpoints.list_checkpoints(workdir)
            if c.complete]
    if done and max(done) >= min_step:
      return max(done)
    if proc.poll() is not None:
      out = proc.stdout.read()
      raise AssertionError(f"training exited early ({proc.returncode}):\n"
                           f"{out[-3000:]}")
    time.sleep(poll)
  proc.kill()
  raise AssertionError(f"no checkpoint >= {min_step} after {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, keeping a checkpoint of every step."""
  workdir = tmp_path_factory.mktemp("reference")
  result = train.train(_config(**{"checkpoint.keep": None,
                                  "checkpoint.every_steps": 1}), workdir)
  return workdir, result


def test_loss_falls_and_outputs(reference):
  workdir, result = reference
  assert result.step == NUM_STEPS and result.stopped == "done"
  assert sorted(result.losses) == list(range(1, NUM_STEPS + 1))
  # From ln(2048) = 7.62 at random init; the tiny model learns fast.
  assert abs(result.losses[1] - np.log(2048)) < 0.1
  assert result.losses[NUM_STEPS] < result.losses[1] - 1.5
  assert (workdir / "config.json").exists()
  assert list((workdir / "metrics").glob("events.out.tfevents*"))
  infos = checkpoints.list_checkpoints(workdir)
  assert [c.step for c in infos] == list(range(1, NUM_STEPS + 1))
  assert [c.step for c in infos if c.epoch is not None] == [14]
  assert infos[13].epoch == 1
  assert all(c.complete for c in infos)


def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
  ref_dir, ref = reference
  proc = subprocess.Popen(_command(tmp_path), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  seen = _wait_for_checkpoint(tmp_path, proc, 4)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  assert seen < NUM_STEPS, "the run finished before it could be killed"
  resumed = train.train(_config(), tmp_path)
  first = min(resumed.losses)
  assert first > 4 and resumed.step == NUM_STEPS
  for step in range(first, NUM_STEPS + 1):
    assert resumed.losses[step] == ref.losses[step], step
  want, got = _params(ref_dir, NUM_STEPS), _params(tmp_path, NUM_STEPS)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sigterm_leaves_a_complete_checkpoint(reference, tmp_path):
  ref_dir, _ = reference
  # Saving and measuring every step (runtime settings: the same run) slows
  # the steps, so the signal lands well before the end.
  proc = subprocess.Popen(
      _command(tmp_path, **{"checkpoint.every_steps": 1,
                            "train.stats_every": 1}),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  _wait_for_checkpoint(tmp_path, proc, 2, poll=0.01)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  done = [c for c in checkpoints.list_checkpoints(tmp_path)]
  assert all(c.complete for c in done)
  last = done[-1].step
  # A preemption happened: the run stopped early, said so, and exited 75.
  assert last < NUM_STEPS, "the run finished before the signal: not a test"
  assert proc.returncode == 75, out[-3000:]
  assert (f"preempted (exit code 75): stopped by SIGTERM after saving; rerun"
          f" the same command to resume: step {last}") in out
  assert f"checkpoints/ (last: {done[-1].path})" in out
  # The preemption checkpoint holds the state an uninterrupted run had.
  meta = checkpoints.read_meta(done[-1].path)
  assert meta["step"] == last
  want, got = _params(ref_dir, last), _params(tmp_path, last)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resume_on_another_mesh_continues_with_same_losses(reference,
                                                           tmp_path):
  ref_dir, ref = reference
  shutil.copytree(ref_dir / "checkpoints" / "8", tmp_path / "checkpoints" / "8")
  # Reference: fsdp over all 8 devices; now data=2 x fsdp=4.
  cfg = _config(**{"mesh.preset": "dp_fsdp"})
  assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, -1)
  result = train.train(cfg, tmp_path)
  assert sorted(result.losses) == list(range(9, NUM_STEPS + 1))
  for step, loss in result.losses.items():
    np.testing.assert_allclose(loss, ref.losses[step], rtol=1e-5, err_msg=step)


def test_refuses_checkpoint_of_another_model(reference, tmp_path):
  ref_dir, _ = reference
  shutil.copytree(ref_dir / "checkpoints" / "4", tmp_path / "checkpoints" / "4")
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"model.intermediate_size: checkpoint has 160,"
                     r" config has 192"):
    train.train(_config(**{"model.intermediate_size": 192}), tmp_path)


def _adopt(workdir, step, cfg):
  """Records `cfg` as the config that wrote checkpoint `step` of workdir.

  Stands in for a run of `cfg` whose first steps were fine (the reference
  run's), without training it.
  """
  import json  # pylint: disable=g-import-not-at-top
  meta = workdir / "checkpoints" / str(step) / "meta" / "metadata"
  d = json.loads(meta.read_text())
  d["config"] = json.loads(cfg.resolve_total_steps(NUM_STEPS).to_json())
  meta.write_text(json.dumps(d))


def test_nan_guard_names_step_and_last_good_checkpoint(reference, tmp_path):
  ref_dir, _ = reference
  shutil.copytree(ref_dir / "checkpoints" / "4", tmp_path / "checkpoints" / "4")
  cfg = _config(**{"optim.groups.adamw.schedule.kind": "constant",
                   "optim.groups.adamw.schedule.warmup_fraction": 0.0,
                   "optim.groups.adamw.schedule.peak": float("inf")})
  _adopt(tmp_path, 4, cfg)
  with pytest.raises(train_guards.NonFiniteError,
                     match=r"at step 5; stopping without saving\. Last good"
                     r" checkpoint: .*checkpoints/4 \(step 4\)"):
    train.train(cfg, tmp_path)
  assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [4]


def test_changed_optimizer_structure_is_named(reference, tmp_path):
  ref_dir, _ = reference
  shutil.copytree(ref_dir / "checkpoints" / "4", tmp_path / "checkpoints" / "4")
  with pytest.raises(ValueError, match=r"different run: optim.clip_norm:"
                     r" checkpoint has 1.0, config has 0.0"):
    train.train(_config(**{"optim.clip_norm": 0.0}), tmp_path)
  # A checkpoint that records no config (or one edited to agree) still meets
  # the optimizer-state structure check.
  _adopt(tmp_path, 4, _config(**{"optim.clip_norm": 0.0}))
  with pytest.raises(ValueError, match=r"optimizer state do not\s+match this run"):
    train.train(_config(**{"optim.clip_norm": 0.0}), tmp_path)


def test_init_from_orbax_run_loads_its_params(reference, tmp_path):
  ref_dir, _ = reference
  cfg = _config(**{"init_from.path": str(ref_dir), "init_from.step": 8,
                   "mesh.preset": "dp_fsdp"})
  mesh = sharding.make_mesh(cfg.mesh)
  s = train_setup.setup(cfg.resolve_total_steps(NUM_STEPS), mesh)
  ckpts = run_checkpoints.RunCheckpoints(tmp_path, cfg.checkpoint,
                                     weights.identity(cfg.model, cfg.lora))
  state, epoch, how = train_setup.initial_state(cfg, s, ckpts, data_iter=None)
  ckpts.close()
  assert epoch == 0 and "Orbax checkpoint" in how
  assert int(state.step) == 0
  want = _params(ref_dir, 8)
  got = {k: np.asarray(v) for k, v in _flat(
      nnx.to_pure_dict(state_lib.full_params(state))).items()}
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Fresh optimizer state.
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(
      state.opt_state) if np.ndim(x) and np.asarray(x).dtype.kind == "f")


def _initial_params(cfg, workdir):
  """train_setup.initial_state in an empty workdir: (params, how it was made, mesh)."""
  cfg = cfg.resolve_total_steps(4)
  mesh = sharding.make_mesh(cfg.mesh)
  ckpts = run_checkpoints.RunCheckpoints(workdir, cfg.checkpoint,
                                     weights.identity(cfg.model, cfg.lora))
  try:
    state, _, how = train_setup.initial_state(cfg, train_setup.setup(cfg, mesh), ckpts,
                                        data_iter=None)
  finally:
    ckpts.close()
  return state.params, how, mesh


def _assert_same_params(params, model):
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = (nnx.to_pure_dict(params)
         if isinstance(params, nnx.State) else params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_hugging_face_folder(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import hf  # pylint: disable=g-import-not-at-top
  folder = REPO / "tests" / "fixtures" / "hf" / "gqa"
  cfg = _config(**{"init_from.path": str(folder),
                   "model.preset": "from_init"})
  params, how, _ = _initial_params(cfg, tmp_path)
  assert "Hugging Face folder" in how
  _assert_same_params(params, hf.load(str(folder))[1])
  # A config that disagrees with config.json is refused, naming the key.
  bad = dataclasses.replace(cfg, model=cfg.model.replace(intermediate_size=64))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"intermediate_size: checkpoint has 48, config has"
                     r" 64"):
    _initial_params(bad, tmp_path / "bad")


def test_init_from_nanogpt_checkpoint(tmp_path):
  """A nanoGPT ckpt.pt (the paper's small bases) initialises the run."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
  ckpt = REPO / "tests" / "fixtures" / "nanogpt" / "ckpt.pt"
  cfg = _config(**{"init_from.path": str(ckpt), "model.preset": "from_init",
                   "data.seq_len": 32})
  params, how, mesh = _initial_params(cfg, tmp_path)
  assert "nanoGPT checkpoint" in how
  _assert_same_params(params, nanogpt.load_nanogpt(str(ckpt))[1])
  # Rows past a learned position table would be NaN: refused up front.
  too_long = dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, seq_len=64))
  with pytest.raises(ValueError, match=r"seq_len=64 exceeds .*learned"):
    train_setup.preflight(too_long, mesh)


def test_model_preset_from_init_reads_the_source_architecture(reference):
  """model.preset=from_init: shapes from the HF folder / ckpt.pt / Orbax run."""
  import json  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import hf_layout  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
  ref_dir, _ = reference
  hf_dir = REPO / "tests" / "fixtures" / "hf" / "gqa"
  ckpt = REPO / "tests" / "fixtures" / "nanogpt" / "ckpt.pt"
  want = {
      str(hf_dir): hf_layout.config_from_hf(
          json.loads((hf_dir / "config.json").read_text())),
      str(ckpt): nanogpt.read_config(str(ckpt)),
      str(ref_dir / "checkpoints" / str(NUM_STEPS)): _config().model,
  }
  for path, expected in want.items():
    # The config file's own shapes (vocab 2048, ...) give way to the source's.
    cfg = _config(**{"model.preset": "from_init", "model.remat_policy": "full",
                     "init_from.path": path})
    assert cfg.model == expected.replace(remat_policy="full"), path
  with pytest.raises(ValueError, match="from_init' needs config.init_from"):
    _config(**{"model": {"preset": "from_init"}})
  with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
    _config(**{"model": {"preset": "from_init", "bogus": 1},
               "init_from.path": str(ckpt)})


def test_eval_job_reads_a_nanogpt_base(tmp_path):
  """The eval job's base model from a ckpt.pt equals the importer's model."""
  from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
  ckpt = str(REPO / "tests" / "fixtures" / "nanogpt" / "ckpt.pt")
  mesh_config = sharding.MeshConfig.from_dict({"preset": "fsdp"})
  got = weights.load_model(
      weights.InitFromConfig(path=ckpt, kind="nanogpt"),
      nanogpt.read_config(ckpt), mesh=sharding.make_mesh(mesh_config),
      rules=mesh_config.rules)
  _, want = nanogpt.load_nanogpt(ckpt)
  _assert_same_params(nnx.state(got, nnx.Param), want)
  # Sharded over 8 devices vs one: same logits up to summation order.
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 96
  np.testing.assert_allclose(np.asarray(got(tokens)), np.asarray(want(tokens)),
                             rtol=1e-5, atol=1e-4)


def test_lora_run_from_orbax_base(reference, tmp_path):
  ref_dir, _ = reference
  cfg = _config("lora", **{"init_from.path": str(ref_dir),
                           "init_from.step": NUM_STEPS, "train.num_steps": 2,
                           "train.stats_every": 0})
  result = train.train(cfg, tmp_path)
  assert result.step == 2 and np.isfinite(result.losses[2])
  base, tuned = _params(ref_dir, NUM_STEPS), _params(tmp_path, 2)
  adapters = sorted(k for k in tuned if k not in base)
  assert adapters and all(k.endswith(("lora_a", "lora_b")) for k in adapters)
  for k in base:  # Frozen base weights: bit-identical.
    np.testing.assert_array_equal(tuned[k], base[k], err_msg=k)
  assert np.any(tuned["layers/attn/q_proj/lora_b"] != 0)


@pytest.mark.parametrize("extra, message", [
    ({"data.global_batch_size": 12},
     r"global_batch_size=12 is not divisible by the data-parallel size 8"),
    ({"train.grad_accum_steps": 3},
     r"not divisible by config.train.grad_accum_steps=3"),
    ({"init_from.path": "/nonexistent/base"},
     r"config.init_from.path='/nonexistent/base' does not exist"),
])
def test_bad_input_fails_before_compiling(tmp_path, extra, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train(_config(**extra), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_key_is_named():
  cfg = _config()
  d = {"train": {"num_steps": 3, "learning_rate": 1.0}}
  with pytest.raises(ValueError, match=r"config.train: unknown keys"
                     r" \['learning_rate'\]"):
    ExperimentConfig.from_dict({**_dict(cfg), **d})
  with pytest.raises(ValueError, match=r"config: unknown sections \['trian'\]"):
    ExperimentConfig.from_dict({**_dict(cfg), "trian": {}})


def _dict(cfg):
  return {"model": {"preset": "tiny_gqa", "vocab_size": 2048},
          "optim": cfg.optim.to_dict(),
          "data": {"format": "synthetic", "synthetic_examples": 100}}


def test_command_line_names_unknown_override(tmp_path):
  out = subprocess.run(
      _command(tmp_path) + ["--config.train.learning_rate=1"], cwd=REPO,
      env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr == ("ERROR: --config.train.learning_rate=1: the config has"
                        " no key 'learning_rate'. See the config file for the"
                        " valid keys.\n")
  assert not (tmp_path / "config.json").exists()
