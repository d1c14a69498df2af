"""LoRA: identity at init, frozen base, adapter-only optimizer state, merge."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optconsist_jax import optim
from optconsist_jax.model import Llama, preset
from optconsist_jax.model.lora import LoRAConfig
from optconsist_jax.model.lora import LoRALinear
from optconsist_jax.model.lora import LoRAParam
from optconsist_jax.model.lora import apply_lora
from optconsist_jax.model.lora import merge
from optconsist_jax.model.llama import Linear

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)


def _lora_model(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=4,
                dropout=0.1):
  model = Llama(preset("tiny_gqa"), rngs=nnx.Rngs(0))
  before = np.asarray(model(TOKENS))
  apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=dropout,
                               targets=targets), nnx.Rngs(1))
  return model, before


def _train_steps(model, steps=2):
  """LoRA train steps that differentiate only wrt LoRAParam."""
  graphdef, lora_params, rest = nnx.split(model, LoRAParam, ...)
  tx = optim.build(optim.presets.preset("lora", peak_lr=1e-2, total_steps=10,
                                       warmup_fraction=0.0), lora_params)
  opt_state = tx.init(lora_params)

  @jax.jit
  def step(lora_params, opt_state, rng):
    def loss_fn(lora_params):
      m = nnx.merge(graphdef, lora_params, rest)
      logits = m.forward(TOKENS[:, :-1], dropout_rng=rng).logits_BTV
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))
    grads = jax.grad(loss_fn)(lora_params)
    updates, opt_state = tx.update(grads, opt_state, lora_params)
    return optax.apply_updates(lora_params, updates), opt_state

  for i in range(steps):
    lora_params, opt_state = step(lora_params, opt_state,
                                  jax.random.key(i))
  nnx.update(model, lora_params)
  return opt_state, lora_params


def test_init_leaves_logits_unchanged_and_filters_are_disjoint():
  model, before = _lora_model()
  np.testing.assert_array_equal(np.asarray(model(TOKENS)), before)
  lora = nnx.state(model, LoRAParam)
  base = nnx.state(model, nnx.Param)
  lora_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(lora)}
  base_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(base)}
  assert "layers/attn/q_proj/lora_a" in lora_paths
  assert "layers/attn/q_proj/kernel" in base_paths
  assert not lora_paths & base_paths
  assert len(lora_paths) == 14
  q = model.layers.attn.q_proj
  assert q.lora_a.shape == (3, 64, 4) and q.lora_b.shape == (3, 4, 64)
  assert not np.any(np.asarray(q.lora_b[...]))
  specs = nnx.get_partition_spec(lora)
  assert tuple(specs["layers"]["attn"]["q_proj"]["lora_a"].get_value()) == (
      "layers", "embed", None)
  assert tuple(specs["layers"]["mlp"]["down_proj"]["lora_b"].get_value()) == (
      "layers", None, "embed")


def test_step_keeps_base_bit_identical_and_state_adapter_sized():
  model, _ = _lora_model()
  base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  opt_state, lora_params = _train_steps(model)
  base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
    np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(model.layers.mlp.up_proj.lora_b[...]))
  adapter_shapes = {x.shape for x in jax.tree.leaves(lora_params)}
  state_arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim]
  assert state_arrays and all(x.shape in adapter_shapes for x in state_arrays)
  n_adapter = sum(x.size for x in jax.tree.leaves(lora_params))
  # AdamW keeps two moments per adapter scalar and nothing for the base.
  assert sum(x.size for x in state_arrays) == 2 * n_adapter


def test_merged_logits_equal_adapter_logits():
  model, before = _lora_model(targets=("q", "v", "down"))
  _train_steps(model)
  adapted = np.asarray(model(TOKENS))
  assert np.abs(adapted - before).max() > 1e-4  # the adapters did something
  merged = merge(model)
  assert isinstance(merged.layers.attn.q_proj, Linear)
  assert isinstance(model.layers.attn.q_proj, LoRALinear)  # input unchanged
  assert not jax.tree.leaves(nnx.state(merged, LoRAParam))
  base = nnx.state(Llama(preset("tiny_gqa"), rngs=nnx.Rngs(0)), nnx.Param)
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(
      merged, nnx.Param)) == jax.tree.map(lambda x: (x.shape, x.dtype), base))
  np.testing.assert_allclose(np.asarray(merged(TOKENS)), adapted, atol=1e-5)


def test_dropout_uses_forward_rng_only():
  model, _ = _lora_model(dropout=0.5)
  # Make the adapter path non-zero so dropout shows.
  b = model.layers.attn.q_proj.lora_b
  b[...] = jnp.ones_like(b[...]) * 0.1
  plain = np.asarray(model.forward(TOKENS).logits_BTV)
  np.testing.assert_array_equal(
      plain, np.asarray(model.forward(TOKENS, dropout_rng=None).logits_BTV))
  d1 = np.asarray(model.forward(TOKENS, dropout_rng=jax.random.key(0))
                  .logits_BTV)
  d2 = np.asarray(model.forward(TOKENS, dropout_rng=jax.random.key(0))
                  .logits_BTV)
  np.testing.assert_array_equal(d1, d2)
  assert np.abs(d1 - plain).max() > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    ({"targets": ("q", "x")}, r"\['x'\].*choose from"),
    ({"rank": 0}, r"rank=0"),
    ({"dropout": 1.0}, r"dropout"),
])
def test_bad_lora_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoRAConfig(**kwargs)
  with pytest.raises(ValueError, match=r"unknown keys \['r'\]"):
    LoRAConfig.from_dict({"r": 4})


def test_lora_preset_rejects_base_params():
  model, _ = _lora_model()
  with pytest.raises(ValueError, match=r"'embed'.*matches no rule"):
    optim.build(optim.presets.preset("lora", total_steps=10),
                nnx.state(model))
  with pytest.raises(ValueError, match="already has an adapter"):
    apply_lora(model, LoRAConfig(targets=("q",)), nnx.Rngs(2))
