"""Attention implementations (optconsist_jax.model.attention).

References: a float64 numpy softmax attention with an explicit mask; the
splash kernel (Pallas interpret mode on CPU) against it with packed segments;
and an ahead-of-time compile of the splash path for a TPU topology.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optconsist_jax.tools.plan import aot as planner
from optconsist_jax.model import attention


def _numpy_attention(q, k, v, mask):
  """q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H] in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(mask)[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _qkv(b, t, n, k, h, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, n, h)),
          jax.random.normal(keys[1], (b, t, k, h)),
          jax.random.normal(keys[2], (b, t, k, h)))


SEGMENTS = np.array([[1] * 5 + [2] * 7 + [0] * 4,
                     [1] * 16], np.int32)


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (6, 1)])
def test_xla_attention_matches_numpy_with_segments(n, k):
  q, kk, v = _qkv(2, 16, n, k, 8)
  mask = attention.causal_segment_mask(jnp.asarray(SEGMENTS), 16)
  out = attention.attend("xla", q, kk, v, segment_BT=jnp.asarray(SEGMENTS))
  ref = _numpy_attention(q, kk, v, np.asarray(mask))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  # Segment 2 starts fresh: its first token sees only itself.
  np.testing.assert_allclose(out[0, 5], np.repeat(np.asarray(v[0, 5]),
                                                  n // k, axis=0), atol=1e-5)


def test_causal_blocks_match_numpy_with_segments():
  # T = 64: four query blocks, each over the keys up to its end; segments
  # cross the block boundaries.
  t = 64
  segments = np.ones((2, t), np.int32)
  segments[0, 10:37] = 2
  segments[0, 37:50] = 3
  segments[0, 50:] = 0
  q, kk, v = _qkv(2, t, 4, 2, 8, seed=4)
  out = attention.attend("xla", q, kk, v, segment_BT=jnp.asarray(segments))
  mask = attention.causal_segment_mask(jnp.asarray(segments), t)
  np.testing.assert_allclose(out, _numpy_attention(q, kk, v, np.asarray(mask)),
                             atol=2e-5, rtol=1e-5)
  out_causal = attention.attend("xla", q, kk, v)
  causal = np.tril(np.ones((t, t), bool))[None].repeat(2, 0)
  np.testing.assert_allclose(out_causal, _numpy_attention(q, kk, v, causal),
                             atol=2e-5, rtol=1e-5)


def test_xla_attention_with_cache_mask_matches_numpy():
  # A decoding step: 3 new queries over 8 cache slots, slots 0-1 padding.
  q, _, _ = _qkv(2, 3, 4, 2, 8, seed=1)
  _, kk, v = _qkv(2, 8, 4, 2, 8, seed=2)
  slots = np.arange(8)
  causal = (2 + np.arange(3))[:, None] >= slots[None]
  mask = np.broadcast_to(causal & (slots >= 2)[None], (2, 3, 8))
  out = attention.attend("xla", q, kk, v, mask_BTS=jnp.asarray(mask))
  np.testing.assert_allclose(out, _numpy_attention(q, kk, v, mask),
                             atol=2e-5, rtol=1e-5)


def test_splash_kernel_keeps_segment_masking():
  # Interpret mode runs the Pallas TPU kernel's semantics on CPU.
  t = 128
  segments = np.ones((2, t), np.int32)
  segments[0, 40:90] = 2
  segments[0, 90:] = 3
  q, kk, v = _qkv(2, t, 4, 2, 128, seed=3)
  out = attention.splash_attention(q, kk, v, jnp.asarray(segments),
                                   interpret=True)
  mask = attention.causal_segment_mask(jnp.asarray(segments), t)
  np.testing.assert_allclose(out, _numpy_attention(q, kk, v, np.asarray(mask)),
                             atol=2e-4, rtol=1e-3)


def test_splash_needs_block_multiple():
  q, kk, v = _qkv(1, 48, 2, 2, 8)
  with pytest.raises(ValueError, match="multiple of 128"):
    attention.attend("splash", q, kk, v)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (the test extra)")
def test_splash_path_compiles_for_a_tpu_topology(tmp_path):
  spec = dict(model="tiny_gqa", mesh="fsdp", topology="v5p-8", seq_len=128,
              global_batch=8, per_chip_batch=2, dtype="bfloat16")
  hlo = {impl: tmp_path / f"{impl}.hlo" for impl in ("splash", "xla")}
  # conftest asks for "highest" matmul precision; the kernel's bf16 dots are
  # lowered with the default (as in a training run).
  with jax.default_matmul_precision("default"):
    results = {impl: planner.plan(planner.PlanSpec(**spec, attention_impl=impl),
                               hlo_path=str(path))
               for impl, path in hlo.items()}
  assert all(r.fits and r.collectives is not None for r in results.values())
  # The Pallas kernel is in the compiled TPU program (Mosaic custom calls,
  # forward and backward), and only with attention_impl='splash'.
  assert hlo["splash"].read_text().count("tpu_custom_call") >= 2
  assert "tpu_custom_call" not in hlo["xla"].read_text()
