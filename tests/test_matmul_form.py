"""The 2-D matmul form of the projections (model.layers.dense).

References: numpy in float64 for one projection; for whole models (untied,
tied head, LoRA) the same parameters run with every projection written as the
3-D einsum `...i,io->...o` (the form before dense), compared on loss and all
gradients; and the lowered HLO of the gradient, whose dots must contract one
axis each (the einsum form is checked to trip the same detector).
"""

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optconsist_jax.model import layers
from optconsist_jax.model import Llama
from optconsist_jax.model import llama
from optconsist_jax.model import lora
from optconsist_jax.model import preset


def _einsum_dense(x, w):
  return jnp.einsum("...i,io->...o", x, w)


def test_dense_values_and_gradients_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 7)).astype(np.float32)
  w = rng.normal(size=(7, 4)).astype(np.float32)
  c = rng.normal(size=(3, 5, 4)).astype(np.float32)
  y = llama.dense(jnp.asarray(x), jnp.asarray(w))
  gx, gw = jax.grad(lambda x, w: jnp.sum(llama.dense(x, w) * c),
                    argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  x64, w64, c64 = (a.astype(np.float64) for a in (x, w, c))
  assert y.shape == (3, 5, 4)
  np.testing.assert_allclose(y, np.einsum("bti,io->bto", x64, w64),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, np.einsum("bto,io->bti", c64, w64),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, np.einsum("bti,bto->io", x64, c64),
                             rtol=1e-5, atol=1e-5)


def _lora_model():
  model = Llama(preset("tiny_gqa"), rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0),
                  nnx.Rngs(1))
  # B starts at zero; give it values so the adapter path matters.
  state = nnx.state(model, lora.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.1 * jax.random.normal(k, v.shape, v.dtype)
      for k, v in zip(keys, leaves)]))
  return model


def _build(kind):
  if kind == "lora":
    return _lora_model()
  return Llama(preset(kind), rngs=nnx.Rngs(0))


def _loss_fn(model, tokens):
  graphdef, params = nnx.split(model)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(tokens)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(
        logp[:, :-1], tokens[:, 1:, None], -1))

  return loss_fn, params


TOKENS = jax.random.randint(jax.random.key(3), (2, 10), 0, 128, jnp.int32)


@pytest.mark.parametrize("kind", ["tiny_gqa", "tiny_tied", "lora"])
def test_model_loss_and_gradients_equal_einsum_form(kind, monkeypatch):
  loss_fn, params = _loss_fn(_build(kind), TOKENS)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  monkeypatch.setattr(layers, "dense", _einsum_dense)  # Linear
  monkeypatch.setattr(llama, "dense", _einsum_dense)  # the tied head
  monkeypatch.setattr(lora, "dense", _einsum_dense)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(
      g, r, rtol=1e-4, atol=1e-6), grads, ref_grads)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\]")


def _multi_axis_contractions(kind):
  """Lowered dot_generals of loss+grad that contract more than one axis."""
  loss_fn, params = _loss_fn(_build(kind), TOKENS)
  text = jax.jit(jax.grad(loss_fn)).lower(params).as_text()
  dots = [m.group(1) for m in map(_DOT.search, text.splitlines()) if m]
  assert dots, "no dot_general found in the lowered gradient"
  return [d for d in dots if "," in d]


@pytest.mark.parametrize("kind", ["tiny_gqa", "tiny_tied", "lora"])
def test_gradient_dots_contract_a_single_axis(kind, monkeypatch):
  assert _multi_axis_contractions(kind) == []
  # The detector sees the two-axis weight-gradient dots of the 3-D form.
  monkeypatch.setattr(layers, "dense", _einsum_dense)  # Linear
  monkeypatch.setattr(llama, "dense", _einsum_dense)  # the tied head
  monkeypatch.setattr(lora, "dense", _einsum_dense)
  assert _multi_axis_contractions(kind)
