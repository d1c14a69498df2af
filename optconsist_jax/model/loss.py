"""Token-level cross-entropy shared by training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_likelihood(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log p(target) per position, computed in fp32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(
      logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target_logit_BT - log_z_BT


def masked_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                         weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted token losses, sum of weights)."""
  nll_BT = -token_log_likelihood(logits_BTV, targets_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)
