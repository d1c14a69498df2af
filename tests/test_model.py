"""The Llama model: parameter counts, KV-cache decoding, layer loop variants.

References are independent of the code path under test: published Hugging
Face parameter counts, the full (cache-free) forward for decoding, separate
sequences for packing, and fp32 for bf16 compute.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optconsist_jax.model.loss import masked_cross_entropy
from optconsist_jax.model import Llama
from optconsist_jax.model import preset
from optconsist_jax.model.llama import abstract_model
from optconsist_jax.model.llama import parameter_count


def _model(config, seed=0):
  return Llama(config, rngs=nnx.Rngs(seed))


def _with_config(model, config):
  """A model with `config` holding `model`'s parameters."""
  other = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(other)
  return nnx.merge(graphdef, nnx.state(model))


@nnx.jit
def _forward(model, tokens, positions=None, segments=None, cache=None):
  return model.forward(tokens, positions, segments, cache)


def _logits(model, tokens, positions=None, segments=None):
  return np.asarray(_forward(model, tokens, positions, segments).logits_BTV)


def _tokens(config, shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size,
                            jnp.int32)


# Published counts: transformers LlamaForCausalLM.num_parameters() for
# meta-llama/Llama-2-{7b,13b,70b}-hf.
@pytest.mark.parametrize("name,expected", [
    ("llama2_7b", 6_738_415_616),
    ("llama2_13b", 13_015_864_320),
    ("llama2_70b", 68_976_648_192),
])
def test_preset_parameter_counts(name, expected):
  config = preset(name)
  abstract = abstract_model(config)  # ShapeDtypeStructs only, no memory
  assert parameter_count(abstract) == expected
  assert config.num_params() == expected


def _decode(model, tokens_BT, prefill, positions_BT, segments_BT, max_len):
  """Prefill `prefill` tokens, then feed the rest one token at a time."""
  cache = model.init_cache(tokens_BT.shape[0], max_len)
  out = _forward(model, tokens_BT[:, :prefill], positions_BT[:, :prefill],
                 segments_BT[:, :prefill], cache)
  logits = [out.logits_BTV]
  cache = out.cache
  for t in range(prefill, tokens_BT.shape[1]):
    out = _forward(model, tokens_BT[:, t:t + 1], positions_BT[:, t:t + 1],
                   segments_BT[:, t:t + 1], cache)
    logits.append(out.logits_BTV)
    cache = out.cache
  assert int(cache.index) == tokens_BT.shape[1]
  return np.concatenate([np.asarray(l) for l in logits], axis=1)


@pytest.mark.parametrize("name", ["tiny_gqa", "tiny_tied"])
def test_kv_cache_decoding_matches_full_forward(name):
  config = preset(name)
  model = _model(config)
  b, t = 2, 10
  tokens = _tokens(config, (b, t))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.ones((b, t), jnp.int32)
  full = _logits(model, tokens)
  decoded = _decode(model, tokens, 4, positions, segments, max_len=12)
  np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)


def test_kv_cache_left_padded_rows():
  config = preset("tiny_gqa")
  model = _model(config)
  t, pad = 10, 3
  tokens = np.array(_tokens(config, (2, t), seed=1))
  tokens[1, :pad] = 0
  positions = np.stack([np.arange(t),
                        np.r_[np.zeros(pad, int), np.arange(t - pad)]])
  segments = np.ones((2, t), np.int32)
  segments[1, :pad] = 0
  decoded = _decode(model, jnp.asarray(tokens), 5, jnp.asarray(positions),
                    jnp.asarray(segments), max_len=t)
  # Each row alone, unpadded, through the full forward.
  row0 = _logits(model, jnp.asarray(tokens[:1]))[0]
  row1 = _logits(model, jnp.asarray(tokens[1:, pad:]))[0]
  np.testing.assert_allclose(decoded[0], row0, atol=1e-5, rtol=0)
  np.testing.assert_allclose(decoded[1, pad:], row1, atol=1e-5, rtol=0)


def test_scanned_and_unrolled_layers_agree():
  config = preset("tiny_gqa").replace(scan_layers=True)
  scanned = _model(config)
  unrolled = _with_config(scanned, config.replace(scan_layers=False))
  tokens = _tokens(config, (2, 9))
  np.testing.assert_allclose(_logits(scanned, tokens),
                             _logits(unrolled, tokens), atol=1e-5, rtol=0)


def test_packed_segments_equal_separate_sequences():
  config = preset("tiny_mha")
  model = _model(config)
  a = _tokens(config, (1, 5), seed=2)
  b = _tokens(config, (1, 7), seed=3)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 0]])
  segments = jnp.asarray([[1] * 5 + [2] * 7 + [0, 0]])
  logits = _logits(model, packed, positions, segments)
  np.testing.assert_allclose(logits[0, :5], _logits(model, a)[0],
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[0, 5:12], _logits(model, b)[0],
                             atol=1e-5, rtol=0)


def _loss_and_grad(model, tokens):
  graphdef, params = nnx.split(model)
  targets = jnp.roll(tokens, -1, axis=1)
  weights = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)

  @jax.jit
  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(tokens)
    total, count = masked_cross_entropy(logits, targets, weights)
    return total / count

  return jax.value_and_grad(loss_fn)(params)


def test_remat_policies_same_loss_and_grad():
  config = preset("tiny_gqa")
  base = _model(config)
  tokens = _tokens(config, (2, 8))
  ref_loss, ref_grad = _loss_and_grad(base, tokens)
  for policy, scan in (("full", True), ("dots", True),
                       ("dots_no_batch", False)):
    model = _with_config(base, config.replace(remat_policy=policy,
                                              scan_layers=scan))
    loss, grad = _loss_and_grad(model, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(
        g, r, atol=1e-6, rtol=1e-5), grad, ref_grad)
  # The gradient is not trivially zero.
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grad)) > 0


def test_bf16_compute_close_to_fp32():
  config = preset("tiny_gqa").replace(initializer_range=0.1)
  fp32 = _model(config)
  bf16 = _with_config(fp32, config.replace(dtype="bfloat16"))
  tokens = _tokens(config, (2, 12))
  ref = _logits(fp32, tokens)
  out = _logits(bf16, tokens)
  assert out.dtype == np.float32  # logits always come back in fp32
  err = np.abs(out - ref).max()
  assert 0 < err < 0.03 * np.abs(ref).max()
  # Params stay fp32; only compute is bf16.
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
