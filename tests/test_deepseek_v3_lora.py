"""LoRA on DeepSeek-V3: every linear layer, per-expert adapters, merging.

A tiny random DeepSeek-V3 (low-rank or direct queries, dense first layer,
8 routed experts and a shared one) with adapters on every target; checked
against properties that hold whatever the numbers: zero-initialised B gives
the base's logits bit for bit, the merged weights are W + A B alpha / r
computed independently in float64 numpy per expert and give the adapted
model's logits, only adapters get gradients, and the sharded step (expert
parallel rules on 8 fake devices) equals the one-device step.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optconsist_jax import optim
from optconsist_jax import sharding
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model import lora as lora_lib

import tiny_deepseek

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 10)),
                     jnp.int32)
RANK, ALPHA = 4, 8.0


_config = tiny_deepseek.config


def _lora(targets=lora_lib.DEFAULT_TARGETS, dropout=0.0):
  c = lora_lib.LoRAConfig(rank=RANK, alpha=ALPHA, dropout=dropout,
                          targets=targets)
  return lambda m: lora_lib.apply_lora(m, c, nnx.Rngs(1))


def _model(config, transform=None, **kw):
  return deepseek_v3.make_model(config, seed=3, transform=transform, **kw)


def _randomize_b(model, scale=0.05, seed=7):
  """Nonzero B factors, so the adapters change the model."""
  state = nnx.state(model, lora_lib.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, x.shape, x.dtype) for k, x in
      zip(keys, leaves)]))


def _adapted_weights(model):
  """Param path -> (a, b) of every adapter, by the weight it adapts."""
  flat = nnx.to_flat_state(nnx.state(model, lora_lib.LoRAParam))
  out = {}
  for path, var in flat:
    *parent, factor = (str(p) for p in path)
    out.setdefault("/".join(parent), {})[factor] = np.asarray(var[...])
  return out


@pytest.mark.parametrize("q_lora_rank,moe_impl", [(8, "dense"),
                                                  (None, "ragged")])
def test_zero_init_gives_the_base_logits_exactly(q_lora_rank, moe_impl):
  config = _config(q_lora_rank=q_lora_rank, moe_impl=moe_impl)
  base = np.asarray(_model(config)(TOKENS))
  model = _model(config, _lora())
  np.testing.assert_array_equal(np.asarray(model(TOKENS)), base)
  # Every linear layer has an adapter, the router none.
  queries = (["q_a_proj", "q_b_proj"] if q_lora_rank else ["q_proj"])
  attn = [f"attn/{p}" for p in
          (*queries, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
  mlp = [f"mlp/{p}" for p in ("gate_proj", "up_proj", "down_proj")]
  want = {f"dense_layers/{p}" for p in (*attn, *mlp)}
  want |= {f"moe_layers/{p}" for p in attn}
  want |= {f"moe_layers/mlp/shared/{p[4:]}" for p in mlp}
  want |= {f"moe_layers/{p}_lora" for p in mlp}  # the routed experts
  assert set(_adapted_weights(model)) == want
  # Adapter shapes: per expert for the routed experts.
  up = model.moe_layers.mlp.up_proj_lora
  assert up.lora_a[...].shape == (2, 8, 32, RANK)
  assert up.lora_b[...].shape == (2, 8, RANK, 16)


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
def test_merged_weights_are_w_plus_ab_and_give_the_adapted_logits(moe_impl):
  config = _config(moe_impl=moe_impl)
  model = _model(config, _lora())
  _randomize_b(model)
  base_w = {"/".join(map(str, p)): np.asarray(v[...], np.float64)
            for p, v in nnx.to_flat_state(nnx.state(_model(config),
                                                    nnx.Param))}
  adapted = np.asarray(model(TOKENS))
  merged = lora_lib.merge(model)
  assert not jax.tree.leaves(nnx.state(merged, lora_lib.LoRAParam))
  assert model.moe_layers.mlp.up_proj_lora is not None  # input unchanged
  merged_w = {"/".join(map(str, p)): np.asarray(v[...], np.float64)
              for p, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
  assert set(merged_w) == set(base_w)
  # W + A B alpha / r per (layer, expert) matrix, in float64.
  scale = ALPHA / RANK
  adapters = _adapted_weights(model)
  for name, ab in adapters.items():
    w_name = (name[:-len("_lora")] if name.endswith("_lora")
              else f"{name}/kernel")
    a = ab["lora_a"].astype(np.float64)
    b = ab["lora_b"].astype(np.float64)
    want = base_w[w_name].copy()
    for idx in np.ndindex(*want.shape[:-2]):
      want[idx] += scale * a[idx] @ b[idx]
    np.testing.assert_allclose(merged_w[w_name], want, atol=1e-6, rtol=1e-6,
                               err_msg=w_name)
  untouched = set(base_w) - {n[:-len("_lora")] if n.endswith("_lora")
                             else f"{n}/kernel" for n in adapters}
  assert "moe_layers/mlp/router" in untouched
  for name in untouched:
    np.testing.assert_array_equal(merged_w[name], base_w[name])
  # The merged model computes what the adapted one does.
  assert np.abs(adapted - np.asarray(_model(config)(TOKENS))).max() > 1e-3
  np.testing.assert_allclose(np.asarray(merged(TOKENS)), adapted, atol=2e-5,
                             rtol=0)


def _lora_loss(graphdef, rest, tokens=TOKENS, rng=None):
  def loss(lora_params):
    m = nnx.merge(graphdef, lora_params, rest)
    logits = m.forward(tokens[:, :-1], dropout_rng=rng).logits_BTV
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return loss


def test_dense_and_ragged_adapters_agree_in_value_and_gradient():
  def value_and_grads(impl):
    model = _model(_config(moe_impl=impl), _lora())
    _randomize_b(model)
    graphdef, lora_params, rest = nnx.split(model, lora_lib.LoRAParam, ...)
    return jax.jit(jax.value_and_grad(_lora_loss(graphdef, rest)))(
        lora_params)

  v_dense, g_dense = value_and_grads("dense")
  v_ragged, g_ragged = value_and_grads("ragged")
  np.testing.assert_allclose(v_ragged, v_dense, rtol=1e-5)
  for (path, g), r in zip(nnx.to_flat_state(g_dense),
                          jax.tree.leaves(g_ragged), strict=True):
    np.testing.assert_allclose(np.asarray(r), np.asarray(g[...]), atol=1e-5,
                               rtol=1e-4, err_msg=str(path))


def _step(graphdef, rest, tx, rng=None):
  @jax.jit
  def step(lora_params, opt_state):
    loss, grads = jax.value_and_grad(_lora_loss(graphdef, rest, rng=rng))(
        lora_params)
    updates, opt_state = tx.update(grads, opt_state, lora_params)
    return optax.apply_updates(lora_params, updates), opt_state, loss, grads
  return step


def _tx(lora_params):
  return optim.build(optim.presets.preset("lora", peak_lr=1e-2,
                                          total_steps=10,
                                          warmup_fraction=0.0), lora_params)


def test_only_adapters_get_gradients_and_the_base_stays_bit_identical():
  model = _model(_config(), _lora(dropout=0.1))
  graphdef, lora_params, rest = nnx.split(model, lora_lib.LoRAParam, ...)
  base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  tx = _tx(lora_params)
  opt_state = tx.init(lora_params)
  step = _step(graphdef, rest, tx, rng=jax.random.key(0))
  losses = []
  for _ in range(3):
    lora_params, opt_state, loss, grads = step(lora_params, opt_state)
    losses.append(float(loss))
  assert losses[2] < losses[0], losses
  # The gradient tree is the adapters' (the optimizer never sees the base):
  # AdamW's two moments per adapter scalar and nothing else.
  n_adapter = sum(x.size for x in jax.tree.leaves(lora_params))
  assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim) == (
      2 * n_adapter)
  # Every adapter's B got a gradient, the routed experts' included.
  for path, g in nnx.to_flat_state(grads):
    if str(path[-1]) == "lora_b":
      assert np.abs(np.asarray(g[...])).max() > 0, path
  nnx.update(model, lora_params)
  base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def _placed(model, mesh, rules):
  """`model`'s state laid out on `mesh` by `rules`, its activations
  constrained likewise."""
  graphdef, state = nnx.split(model)
  shardings = sharding.state_shardings(state, mesh, rules)
  placed = nnx.merge(graphdef, jax.device_put(state, shardings))
  placed.constrain = sharding.LogicalConstraint(mesh, rules)
  return placed


def test_sharded_step_with_expert_parallel_rules_equals_one_device():
  mesh_config = sharding.MeshConfig.preset(
      "fsdp_tp", tensor=4, extra_rules=(("expert", "tensor"),
                                        ("expert_mlp", None)))
  mesh = sharding.make_mesh(mesh_config)
  model = _model(_config(), _lora())
  _randomize_b(model)
  results = []
  for m in (model, _placed(model, mesh, mesh_config.rules)):
    graphdef, lora_params, rest = nnx.split(m, lora_lib.LoRAParam, ...)
    tx = _tx(lora_params)
    new, _, loss, grads = _step(graphdef, rest, tx)(lora_params,
                                                    tx.init(lora_params))
    results.append((float(loss), grads, new, m))
  (loss1, grads1, new1, _), (loss8, grads8, new8, sharded) = results
  # The experts' adapters are split over the expert axis as the rules say,
  # and so are their gradients.
  a = sharded.moe_layers.mlp.up_proj_lora.lora_a[...]
  assert a.sharding.spec == jax.sharding.PartitionSpec(
      None, "tensor", "fsdp", None)
  assert len(a.sharding.device_set) == 8
  assert grads8["moe_layers"]["mlp"]["up_proj_lora"]["lora_a"][
      ...].sharding.is_equivalent_to(a.sharding, a.ndim)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for (path, g), g8 in zip(nnx.to_flat_state(grads1),
                           jax.tree.leaves(grads8), strict=True):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g[...]), atol=1e-5,
                               rtol=1e-4, err_msg=str(path))
  for (path, p), p8 in zip(nnx.to_flat_state(new1), jax.tree.leaves(new8),
                           strict=True):
    np.testing.assert_allclose(np.asarray(p8), np.asarray(p[...]), atol=1e-5,
                               rtol=1e-4, err_msg=str(path))


def test_keys_and_values_share_mla_projections():
  config = _config()
  with pytest.raises(ValueError, match=r"target both 'k' and 'v'"):
    _model(config, _lora(targets=("q", "k")))
  # "v" alone would adapt the same two matrices "k" does: refused too, and
  # both together adapt them once.
  model = _model(config, _lora(targets=("k", "v")))
  assert set(_adapted_weights(model)) == {
      f"{s}/attn/{p}" for s in ("dense_layers", "moe_layers")
      for p in ("kv_a_proj_with_mqa", "kv_b_proj")}
