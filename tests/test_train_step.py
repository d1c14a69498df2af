"""Train state creation, per-group metrics, batch placement, on fake CPUs."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from optconsist_jax import platforms
from optconsist_jax import sharding
from optconsist_jax.train import state as state_lib
from optconsist_jax.train import step as train_step
from optconsist_jax.model import Llama, preset

CONFIG = preset("tiny_gqa")
BATCH, SEQ = 8, 16


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ + 1), np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((BATCH, SEQ), np.float32),
          "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
          "segment_ids": np.ones((BATCH, SEQ), np.int32)}


def _plain_model():
  return Llama(CONFIG, rngs=nnx.Rngs(0))


def test_train_state_is_born_sharded():
  cfg = sharding.MeshConfig.preset("fsdp_tp", fsdp=2, tensor=4)
  mesh = sharding.make_mesh(cfg)
  tx = optax.adamw(1e-3)
  builder = state_lib.StateBuilder(CONFIG, mesh, cfg.rules)
  state = builder.init(tx)
  abstract, shardings = builder.abstract_state(tx)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  q = state.params["layers"]["attn"]["q_proj"]["kernel"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  # Column-parallel q: each device holds [L, D/2, N*H/4].
  l, d, nh = q.shape
  assert {s.data.shape for s in q.addressable_shards} == {(l, d // 2, nh // 4)}
  embed = state.params["embed"].get_value()
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  mu = state.opt_state[0].mu["layers"]["mlp"]["down_proj"]["kernel"].get_value()
  assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding == sh
  # Same values as an unsharded init (threefry is partitionable; the normal
  # sampler may round differently per layout, hence not bit-exact).
  ref = nnx.state(_plain_model(), nnx.Param)
  np.testing.assert_allclose(np.asarray(embed),
                             np.asarray(ref["embed"].get_value()), rtol=1e-6)


def test_global_batch_single_process():
  cfg = sharding.MeshConfig.preset("dp_fsdp")
  mesh = sharding.make_mesh(cfg)
  b = _batch()
  g = train_step.global_batch(b, mesh, cfg.rules)
  for k, v in b.items():
    np.testing.assert_array_equal(np.asarray(g[k]), v)
    assert g[k].sharding.spec == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None)
    assert {s.data.shape for s in g[k].addressable_shards} == {(1, SEQ)}



def test_maybe_initialize_distributed_is_a_noop_locally():
  assert not platforms.maybe_initialize_distributed({})
  assert not platforms.maybe_initialize_distributed(
      {"TPU_WORKER_HOSTNAMES": "localhost"})
  assert not platforms.maybe_initialize_distributed(
      {"OPTCONSIST_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "x:1"})


def _group(path, _):
  keys = [getattr(k, "key", None) for k in path]
  return "matrix" if "kernel" in keys else "other"


def test_param_group_update_stats():
  cfg = sharding.MeshConfig.preset("fsdp")
  mesh = sharding.make_mesh(cfg)
  lr = 0.5
  tx = optax.sgd(lr)
  builder = state_lib.StateBuilder(CONFIG, mesh, cfg.rules)
  graphdef, state = builder.graphdef, builder.init(tx)
  _, shardings = builder.abstract_state(tx)
  groups = jax.tree_util.tree_map_with_path(_group, state.params)
  step = train_step.make_train_step(
      graphdef, tx, mesh=mesh, rules=cfg.rules, state_shardings=shardings,
      param_groups=groups)
  before = jax.device_get(state.params)
  state, metrics = step(state, train_step.global_batch(_batch(), mesh,
                                                        cfg.rules))
  after = jax.device_get(state.params)
  assert int(state.step) == 1
  sums, sizes = {}, {}
  for g, a, b in zip(jax.tree.leaves(groups), jax.tree.leaves(after),
                     jax.tree.leaves(before)):
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    sums[g] = sums.get(g, 0.0) + (d * d).sum()
    sizes[g] = sizes.get(g, 0) + d.size
  assert set(sums) == {"matrix", "other"}
  for g in sums:
    np.testing.assert_allclose(metrics[f"update_norm/{g}"], np.sqrt(sums[g]),
                               rtol=1e-4)
    np.testing.assert_allclose(metrics[f"update_rms/{g}"],
                               np.sqrt(sums[g] / sizes[g]), rtol=1e-4)
  # With SGD the whole update is lr * grad.
  total = np.sqrt(sum(sums.values()))
  np.testing.assert_allclose(total, lr * float(metrics["grad_norm"]), rtol=1e-4)
  assert float(metrics["num_tokens"]) == BATCH * SEQ


def test_batch_with_missing_key_is_an_error():
  cfg = sharding.MeshConfig.preset("dp")
  mesh = sharding.make_mesh(cfg)
  tx = optax.sgd(0.1)
  builder = state_lib.StateBuilder(CONFIG, mesh, cfg.rules)
  state, shardings = builder.abstract_state(tx)
  step = train_step.make_train_step(builder.graphdef, tx, mesh=mesh, rules=cfg.rules,
                                    state_shardings=shardings)
  batch = train_step.abstract_batch(BATCH, SEQ, mesh, cfg.rules)
  del batch["segment_ids"]
  with pytest.raises(ValueError, match=r"missing keys \['segment_ids'\]"):
    step.lower(state, batch)


def test_microbatches_are_strided_rows():
  x = np.arange(8 * 3).reshape(8, 3)
  mb = train_step.microbatches({"inputs": x}, 4)["inputs"]
  assert mb.shape == (4, 2, 3)
  np.testing.assert_array_equal(mb[1], x[[1, 5]])
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps=3"):
    train_step.microbatches({"inputs": x}, 3)
