"""Mesh, rules and sharded train steps on 8 fake CPU devices.

The reference is the same step on a one-device mesh: sharding must not change
the numbers (fp32, within 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optconsist_jax import sharding
from optconsist_jax.train import state as state_lib
from optconsist_jax.train import step as train_step
from optconsist_jax.model import preset
from optconsist_jax.model.llama import abstract_model

# Its fixtures are built once per test session (session scope: a module
# fixture is rebuilt whenever xdist interleaves another module's tests), and
# every test here runs on the same xdist worker (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("sharding_reference")

CONFIG = preset("tiny_gqa")
BATCH, SEQ = 8, 16


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ + 1), np.int32)
  weights = (rng.random((BATCH, SEQ)) < 0.8).astype(np.float32)
  # Two packed segments in half of the rows.
  segments = np.ones((BATCH, SEQ), np.int32)
  segments[::2, SEQ // 2:] = 2
  positions = np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))
  positions[::2, SEQ // 2:] -= SEQ // 2
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": weights, "positions": positions, "segment_ids": segments}


def _run(mesh_config, devices, init_state, grad_accum_steps):
  """Two SGD(lr=1) steps.

  Returns:
    (losses, grads of step 1, step fn, {param path: (spec, bytes on device
    0)} of the sharded initial params).
  """
  mesh = sharding.make_mesh(mesh_config, devices)
  tx = optax.sgd(1.0)
  builder = state_lib.StateBuilder(CONFIG, mesh, mesh_config.rules)
  graphdef = builder.graphdef
  _, shardings = builder.abstract_state(tx)
  state = jax.device_put(init_state, shardings)
  layout = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    layout[name] = (_without_size_one(x.sharding.spec, mesh),
                    x.addressable_shards[0].data.nbytes)
  step = train_step.make_train_step(
      graphdef, tx, mesh=mesh, rules=mesh_config.rules,
      state_shardings=shardings, grad_accum_steps=grad_accum_steps)
  batch = train_step.global_batch(_batch(), mesh, mesh_config.rules)
  before = jax.device_get(state.params)
  state, m1 = step(state, batch)
  after = jax.device_get(state.params)
  state, m2 = step(state, batch)
  grads = jax.tree.map(lambda a, b: a - b, before, after)  # sgd(1): p - g
  return [float(m1["loss"]), float(m2["loss"])], grads, step, layout


def _without_size_one(spec, mesh):
  """A PartitionSpec's mesh axes per dim, axes of size 1 dropped."""
  out = []
  for axes in spec:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    kept = tuple(a for a in axes if mesh.shape[a] > 1)
    out.append(kept or None)
  return tuple(out)


# The layout the module docstring promises (FSDP on `embed`, Megatron tensor
# parallelism on heads / kv_heads / mlp / vocab, norms replicated), written
# out per parameter of tiny_gqa, independently of sharding.RULES.
EXPECTED_AXES = {
    "embed": ("tensor", "fsdp"),
    "final_norm/scale": (None,),
    "layers/attn/q_proj/kernel": (None, "fsdp", "tensor"),
    "layers/attn/k_proj/kernel": (None, "fsdp", "tensor"),
    "layers/attn/v_proj/kernel": (None, "fsdp", "tensor"),
    "layers/attn/o_proj/kernel": (None, "tensor", "fsdp"),
    "layers/attn_norm/scale": (None, None),
    "layers/mlp/gate_proj/kernel": (None, "fsdp", "tensor"),
    "layers/mlp/up_proj/kernel": (None, "fsdp", "tensor"),
    "layers/mlp/down_proj/kernel": (None, "tensor", "fsdp"),
    "layers/mlp_norm/scale": (None, None),
    "lm_head/kernel": ("fsdp", "tensor"),
}


def _expected_layout(init_params, sizes):
  """{param path: (spec without size-1 axes, fp32 bytes per device)}."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(init_params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    axes = tuple(a if a is not None and sizes[a] > 1 else None
                 for a in EXPECTED_AXES[name])
    shards = np.prod([sizes[a] for a in axes if a is not None])
    out[name] = (tuple((a,) if a else None for a in axes),
                 x.size * x.dtype.itemsize // shards)
  return out


@pytest.fixture(scope="session")
def reference():
  """Initial state and the one-device results, for grad_accum 1 and 2."""
  one = [jax.devices()[0]]
  cfg = sharding.MeshConfig(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(cfg, one)
  state = state_lib.StateBuilder(CONFIG, mesh, cfg.rules).init(optax.sgd(1.0))
  init = jax.device_get(state)
  return init, {a: _run(cfg, one, init, a)[:2] for a in (1, 2)}


# Every preset, and meshes (8), (1, 8), (2, 4), (2, 2, 2) over (data, fsdp,
# tensor); odd cases accumulate gradients over 2 micro-batches.
CASES = [
    ("dp", (8, 1, 1), 1),
    ("fsdp", (1, 8, 1), 2),
    ("fsdp_tp", (1, 1, 8), 1),
    ("fsdp_tp", (1, 2, 4), 2),
    ("dp_fsdp", (2, 4, 1), 1),
    ("fsdp", (2, 2, 2), 1),
    ("fsdp_tp", (2, 2, 2), 2),
]


@pytest.mark.parametrize("name,shape,accum", CASES)
def test_sharded_step_matches_single_device(reference, name, shape, accum):
  init, ref = reference
  data, fsdp, tensor = shape
  cfg = sharding.MeshConfig.preset(name, data=data, fsdp=fsdp, tensor=tensor)
  losses, grads, step, layout = _run(cfg, jax.devices(), init, accum)
  # Each parameter is laid out as promised: its PartitionSpec and the bytes
  # device 0 holds (a layout that replicates anything fails here).
  expected = _expected_layout(init.params, dict(zip(("data", "fsdp",
                                                     "tensor"), shape)))
  assert layout == expected
  ref_losses, ref_grads = ref[accum]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # Step 2 reused the executable of step 1.
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_grad_accumulation_is_the_full_batch_mean(reference):
  _, ref = reference
  np.testing.assert_allclose(ref[1][0], ref[2][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ref[1][1]), jax.tree.leaves(ref[2][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_against_numpy(reference):
  """Step-1 loss equals a numpy cross-entropy of the one-device logits."""
  init, ref = reference
  model = nnx.merge(abstract_graphdef(), init.params, init.frozen)
  b = _batch()
  logits = np.asarray(model.forward(b["inputs"], b["positions"],
                                    b["segment_ids"]).logits_BTV, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + (
      logits.max(-1))
  nll = logz - np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
  expected = (nll * b["weights"]).sum() / b["weights"].sum()
  np.testing.assert_allclose(ref[1][0][0], expected, rtol=1e-5)


def abstract_graphdef():
  graphdef, _, _ = nnx.split(abstract_model(CONFIG), nnx.Param, ...)
  return graphdef


def test_fsdp_state_bytes_per_device_is_an_eighth():
  cfg = sharding.MeshConfig.preset("fsdp")
  mesh = sharding.make_mesh(cfg)
  tx = optax.adamw(1e-3)
  builder = state_lib.StateBuilder(CONFIG, mesh, cfg.rules)
  state, shardings = builder.abstract_state(tx)
  step = train_step.make_train_step(builder.graphdef, tx, mesh=mesh, rules=cfg.rules,
                                    state_shardings=shardings)
  batch = train_step.abstract_batch(BATCH, SEQ, mesh, cfg.rules)
  mem = step.lower(state, batch).compile().memory_analysis()
  total_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  batch_per_device = sum(x.size * x.dtype.itemsize
                         for x in jax.tree.leaves(batch)) / 8
  per_device_state = mem.argument_size_in_bytes - batch_per_device
  assert abs(per_device_state - total_state / 8) <= 0.10 * total_state / 8, (
      per_device_state, total_state / 8)
  # Donated state: the new state reuses the argument buffers.
  assert mem.alias_size_in_bytes >= 0.9 * per_device_state


# ---------------------------------------------------------------------------
# Rules and bad input.


def test_presets_cover_every_model_name():
  model = abstract_model(CONFIG.replace(position_embedding="learned"))
  names = {n for v in jax.tree.leaves(nnx.state(model, nnx.Param),
                                      is_leaf=lambda x: isinstance(x, nnx.Variable))
           for n in v.get_metadata()["out_sharding"]}
  names |= set(sharding.ACTIVATION_NAMES)
  for p in sharding.preset_names():
    rules = sharding.MeshConfig.preset(p).rules
    for n in names:
      sharding.logical_to_spec((n,), rules)  # raises when a name has no rule


def test_logical_to_spec():
  rules = sharding.RULES
  assert sharding.logical_to_spec(("layers", "embed", "heads"), rules) == (
      jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
  assert sharding.logical_to_spec(("act_batch", None), rules) == (
      jax.sharding.PartitionSpec(("data", "fsdp"), None))
  with pytest.raises(ValueError, match="mesh axis 'tensor' is mapped from both"):
    sharding.logical_to_spec(("heads", "mlp"), rules)
  with pytest.raises(ValueError, match="'bogus' has no rule"):
    sharding.logical_to_spec(("bogus",), rules)


def test_fill_axis_and_preset_sizes():
  assert sharding.MeshConfig.preset("fsdp").axis_sizes(8) == {
      "data": 1, "fsdp": 8, "tensor": 1}
  assert sharding.MeshConfig.preset("fsdp_tp").axis_sizes(8) == {
      "data": 1, "fsdp": 4, "tensor": 2}
  assert sharding.MeshConfig.preset("dp_fsdp").axis_sizes(8) == {
      "data": 2, "fsdp": 4, "tensor": 1}
  assert sharding.MeshConfig.preset("fsdp", dcn_data=2).axis_sizes(8) == {
      "data": 2, "fsdp": 4, "tensor": 1}
  mesh = sharding.make_mesh(sharding.MeshConfig.preset("dp"))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  from_dict = sharding.MeshConfig.from_dict({"preset": "fsdp_tp", "tensor": 4})
  assert from_dict.axis_sizes(8)["fsdp"] == 2


def test_mesh_size_mismatch_is_an_error():
  with pytest.raises(ValueError, match=r"= 4 per slice .* 8 devices"):
    sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="cannot fill fsdp=-1"):
    sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=-1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="unknown keys"):
    sharding.MeshConfig.from_dict({"preset": "fsdp", "model": 2})


def test_rule_with_unknown_mesh_axis_is_an_error():
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.MeshConfig(extra_rules=(("embed", "model"),))
  mesh = sharding.make_mesh(sharding.MeshConfig.preset("fsdp"))
  with pytest.raises(ValueError, match="unknown mesh axis 'expert'"):
    sharding.LogicalConstraint(mesh, (("act_batch", ("data", "expert")),))


def test_extra_rules_win_and_unused_axes_are_errors():
  # One config entry: the vocab dims leave tensor parallelism.
  cfg = sharding.MeshConfig.from_dict(
      {"preset": "fsdp_tp", "extra_rules": [["vocab", None]]})
  assert sharding.logical_to_spec(("vocab", "embed"), cfg.rules) == (
      jax.sharding.PartitionSpec(None, "fsdp"))
  assert sharding.logical_to_spec(("embed", "mlp"), cfg.rules) == (
      jax.sharding.PartitionSpec("fsdp", "tensor"))
  mesh = sharding.make_mesh(cfg)
  params = nnx.state(abstract_model(CONFIG), nnx.Param)
  specs = sharding.state_shardings(params, mesh, cfg.rules)
  assert specs["embed"].get_value().spec == jax.sharding.PartitionSpec(
      None, "fsdp")
  # An axis of size > 1 that no rule uses would replicate over it.
  no_tensor = [[n, None] for n in ("vocab", "heads", "kv_heads", "mlp",
                                   "expert_mlp", "act_heads", "act_kv_heads",
                                   "act_mlp", "act_vocab")]
  with pytest.raises(ValueError, match="mesh axis 'tensor' has size 2 but no"
                     " sharding rule maps a logical name to it"):
    sharding.MeshConfig.preset("fsdp_tp", extra_rules=no_tensor)
  ok = sharding.MeshConfig.preset("fsdp_tp", tensor=1, extra_rules=no_tensor)
  with pytest.raises(ValueError, match="mesh axis 'tensor' has size 4"):
    sharding.make_mesh(sharding.MeshConfig.preset(
        "dp", data=2, tensor=-1, extra_rules=no_tensor))
  with pytest.raises(ValueError, match="mesh axis 'tensor' has size 8"):
    sharding.state_shardings(params, sharding.make_mesh(
        sharding.MeshConfig.preset("fsdp_tp", fsdp=1, tensor=8)),
                             ok.rules)
  with pytest.raises(ValueError, match="'rules' .* is gone.*extra_rules"):
    sharding.MeshConfig.from_dict({"preset": "fsdp", "rules": []})


def test_non_divisible_dim_is_an_error_naming_it():
  cfg = sharding.MeshConfig.preset("fsdp_tp", fsdp=1, tensor=8)
  mesh = sharding.make_mesh(cfg)
  model = abstract_model(CONFIG.replace(vocab_size=100))
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ValueError, match=r"param 'embed' shape \(100, 64\): dim 0"
                     r" \('vocab', size 100\) is not divisible by mesh axes"
                     r" 'tensor' of size 8"):
    sharding.state_shardings(params, mesh, cfg.rules)


def test_activation_constraint_skips_non_divisible_dims():
  cfg = sharding.MeshConfig.preset("fsdp_tp", fsdp=2, tensor=4)
  mesh = sharding.make_mesh(cfg)
  constrain = sharding.LogicalConstraint(mesh, cfg.rules)
  assert hash(constrain) == hash(sharding.LogicalConstraint(mesh, cfg.rules))
  x = jnp.ones((8, 4, 2, 8))  # 2 kv heads over tensor=4
  y = jax.jit(lambda x: constrain(x, ("act_batch", "act_length",
                                      "act_kv_heads", None)))(x)
  expected = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None))
  assert y.sharding.is_equivalent_to(expected, 4), y.sharding


# ---------------------------------------------------------------------------
# Optimizer state of any family (state_shardings' default rule).


def _gram_factors():
  """A Shampoo-like state: per param a [d, d] factor of its last dim, a
  global [48, 256] buffer (matches no param) and a step count."""
  def init(params):
    return {"factor": jax.tree.map(
                lambda p: jnp.zeros((p.shape[-1],) * 2), params),
            "buffer": jnp.zeros((48, 256)), "count": jnp.zeros([], jnp.int32)}
  return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_opt_state_default_rule_factored_kronecker_and_scalars():
  cfg = sharding.MeshConfig.preset("fsdp_tp")  # fsdp=4, tensor=2
  mesh = sharding.make_mesh(cfg)
  builder = state_lib.StateBuilder(CONFIG, mesh, cfg.rules)
  tx = optax.chain(optax.adafactor(1e-3, min_dim_size_to_factor=8),
                   _gram_factors())
  state, _ = builder.abstract_state(tx)
  specs = {sharding.path_name(p): (x.shape, tuple(x.sharding.spec))
           for p, x in jax.tree_util.tree_flatten_with_path(
               state.opt_state)[0]}

  def get(suffix):
    [hit] = [v for k, v in specs.items() if k.endswith(suffix)]
    return hit
  # gate_proj [3, 64, 160] (layers, embed->fsdp, mlp->tensor): Adafactor
  # factors its two largest dims, keeping [3, 64] and [3, 160].
  assert get("v_row/layers/mlp/gate_proj/kernel") == ((3, 64), (None, "fsdp"))
  assert get("v_col/layers/mlp/gate_proj/kernel") == ((3, 160),
                                                     (None, "tensor"))
  # The [160, 160] factor is no param shape: its largest dim splits on fsdp.
  assert get("factor/layers/mlp/gate_proj/kernel") == ((160, 160),
                                                      ("fsdp", None))
  # [64, 64] of o_proj [3, 64, 64] is the param's shape less its layers dim.
  assert get("factor/layers/attn/o_proj/kernel") == ((64, 64),
                                                    ("tensor", "fsdp"))
  assert get("1/buffer") == ((48, 256), (None, "fsdp"))
  assert get("1/count") == ((), ())
  # Nothing of the factored state is held whole by every device.
  leaves = jax.tree.leaves(state.opt_state)
  total = sum(x.size for x in leaves)
  per_device = sum(np.prod(x.sharding.shard_shape(x.shape)) for x in leaves)
  assert per_device < 0.3 * total, (per_device, total)
