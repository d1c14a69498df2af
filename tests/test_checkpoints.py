"""Checkpoints: round trips across meshes, retention, listing, refusal."""

import json

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optconsist_jax.io import checkpoint_layout as checkpoints
from optconsist_jax.io import checkpointer as run_checkpoints
from optconsist_jax.io import weights
from optconsist_jax.model import Llama
from optconsist_jax.model import preset

P = jax.sharding.PartitionSpec


def _mesh(shape, names):
  return jax.make_mesh(shape, names,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _model_and_opt(seed=0):
  model = Llama(preset("tiny_gqa"), rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  # A non-trivial optimizer state: one update's moments.
  grads = jax.tree.map(lambda p: jnp.sin(p * 3.0), params)
  _, opt_state = tx.update(grads, opt_state, params)
  return params, opt_state


def _shard_first_axis(tree, mesh, axis):
  """Puts each array on `mesh`, split on dim 0 when it divides, else replicated."""
  n = mesh.shape[axis] if isinstance(axis, str) else np.prod(
      [mesh.shape[a] for a in axis])

  def one(x):
    spec = P(axis) if x.ndim and x.shape[0] % n == 0 else P()
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  return jax.tree.map(one, tree)


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


MODEL = {"llama": preset("tiny_gqa").__dict__, "lora": None}


def _identity(**changes):
  d = json.loads(json.dumps(MODEL))
  d["llama"].update(changes)
  return d


def _data_iter():
  ds = grain.MapDataset.range(40).shuffle(seed=3).batch(4)
  return iter(ds.to_iter_dataset())


def _assert_tree_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_other_mesh(tmp_path):
  params, opt_state = _model_and_opt()
  mesh8 = _mesh((8,), ("fsdp",))
  params8 = _shard_first_axis(params, mesh8, "fsdp")
  opt8 = _shard_first_axis(opt_state, mesh8, "fsdp")
  it = _data_iter()
  next(it), next(it)
  rng = jax.random.key(7)
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(every_steps=1), MODEL)
  ckpts.save(2, params=params8, opt_state=opt8, data_iter=it, rng=rng,
             epoch=0)
  expected_batches = [next(it) for _ in range(3)]
  ckpts.close()

  # Read back onto a (2, 4) mesh with the other axis sharding dim 0.
  mesh24 = _mesh((2, 4), ("data", "tensor"))
  abs_params = _abstract(_shard_first_axis(params, mesh24, "tensor"))
  abs_opt = _abstract(_shard_first_axis(opt_state, mesh24, "tensor"))
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(), MODEL)
  assert ckpts.latest_step() == 2
  it2 = _data_iter()
  r = ckpts.restore(None, abstract_params=abs_params,
                    abstract_opt_state=abs_opt, data_iter=it2)
  ckpts.close()
  assert r.step == 2 and r.epoch == 0
  _assert_tree_equal(r.params, params)
  _assert_tree_equal(r.opt_state, opt_state)
  for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(abs_params)):
    assert got.sharding == want.sharding
  assert type(r.opt_state) is type(opt_state)
  np.testing.assert_array_equal(jax.random.key_data(r.rng),
                                jax.random.key_data(rng))
  for want in expected_batches:
    np.testing.assert_array_equal(next(it2), want)

  # The eval job's entry point: params only, from W, onto one device.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  abs_one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         params)
  got = checkpoints.restore_params(tmp_path, 2, abs_one,
                                   jax.tree.map(lambda _: one, abs_one),
                                   model=MODEL)
  _assert_tree_equal(got, params)
  assert all(x.sharding == one for x in jax.tree.leaves(got))


def test_retention_keeps_latest_and_epoch_ends(tmp_path):
  params, opt_state = _model_and_opt()
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(keep=2, async_save=False), MODEL)
  for step in range(1, 8):
    ckpts.save(step, params=params, opt_state=opt_state, epoch=step // 3,
               epoch_end=step % 3 == 0)
  assert not ckpts.save(7, params=params, opt_state=opt_state)
  ckpts.close()
  infos = checkpoints.list_checkpoints(tmp_path)
  assert [(c.step, c.epoch, c.complete) for c in infos] == [
      (3, 1, True), (6, 2, True), (7, None, True)]
  assert infos[0].path == tmp_path / "checkpoints" / "3"


def test_incomplete_checkpoint_is_listed_as_such(tmp_path):
  params, opt_state = _model_and_opt()
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(async_save=False), MODEL)
  ckpts.save(1, params=params, opt_state=opt_state)
  ckpts.close()
  # What a save killed half-way leaves behind.
  (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123" / "params").mkdir(
      parents=True)
  infos = checkpoints.list_checkpoints(tmp_path)
  assert [(c.step, c.complete) for c in infos] == [(1, True), (2, False)]
  with pytest.raises(FileNotFoundError, match="step 2"):
    checkpoints.restore_params(tmp_path, 2, params)
  # A resumed run starts from step 1 and writes step 2 again.
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(), MODEL)
  assert ckpts.latest_step() == 1
  assert ckpts.save(2, params=params, opt_state=opt_state)
  ckpts.close()
  infos = checkpoints.list_checkpoints(tmp_path)
  assert [(c.step, c.complete) for c in infos if c.complete] == [
      (1, True), (2, True)]
  _assert_tree_equal(checkpoints.restore_params(tmp_path, 2, params), params)


def test_refuses_other_model(tmp_path):
  params, opt_state = _model_and_opt()
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(async_save=False), MODEL)
  ckpts.save(1, params=params, opt_state=opt_state)
  ckpts.close()
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"llama.hidden_size: checkpoint has 64, config has 96"):
    run_checkpoints.RunCheckpoints(tmp_path, run_checkpoints.CheckpointConfig(),
                               _identity(hidden_size=96))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="num_layers"):
    checkpoints.restore_params(tmp_path, None, params,
                               model=_identity(num_layers=4))
  # Runtime-only settings are not part of the identity.
  ckpts = run_checkpoints.RunCheckpoints(
      tmp_path, run_checkpoints.CheckpointConfig(),
      _identity(remat_policy="full", scan_layers=False))
  ckpts.close()


def test_identity_written_before_a_model_field_existed_still_matches():
  """A checkpoint without a newer LlamaConfig key resumes when the config
  holds that field's default, and is refused when it does not."""
  config = preset("tiny_gqa")
  now = weights.identity(config)
  new_fields = ("rope_type", "qkv_bias", "qk_norm", "norm_placement")
  old = {"llama": {k: v for k, v in now["llama"].items()
                   if k not in new_fields}, "lora": None}
  assert set(now["llama"]) - set(old["llama"]) == set(new_fields)
  checkpoints.compare_models(now, old, "old checkpoint")
  changed = weights.identity(config.replace(qkv_bias=True))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="qkv_bias"):
    checkpoints.compare_models(changed, old, "old checkpoint")
  # Both sides recording a key still compare it.
  with pytest.raises(checkpoints.CheckpointMismatchError, match="qk_norm"):
    checkpoints.compare_models(
        weights.identity(config.replace(qk_norm="head")), now, "checkpoint")
