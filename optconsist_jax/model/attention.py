"""Masked grouped-query attention: the XLA form, JAX's fused kernels, splash.

`attend` is the one entry point the model calls. `LlamaConfig.attention_impl`
picks the implementation:

* xla (default; CPU, GPU, TPU): softmax(q k^T / sqrt(H) + mask) v written as
  plain XLA ops. Heads are laid out [B, K, G*T, H] (the G query heads that
  share a kv head folded into the query-row axis), so every product of the
  forward and backward pass is a batched matmul over B x K contracting one
  axis. On the CPU backend this maps each product onto the GEMM library without
  the strided transposes `jax.nn.dot_product_attention`'s [B, T, N, H] einsums
  need (bench/model_throughput.py times it against torch's sdpa). Causal
  passes skip the all-masked key blocks (causal_xla_attention). Takes any
  boolean mask, so it serves segment masks and the KV cache.
* cudnn / auto: `jax.nn.dot_product_attention` with that implementation
  (auto lets JAX pick; on GPU it selects the cuDNN fused kernel when the
  dtype and shapes allow).
* splash: the TPU Pallas splash-attention kernel
  (jax.experimental.pallas.ops.tpu.splash_attention), causal with segment ids
  (packing), for training/scoring passes without a KV cache; decoding with a
  cache uses the xla form. Under a mesh it runs per shard (shard_map over the
  batch and head axes of the model's sharding rules).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_NEG = -0.7 * float(np.finfo(np.float32).max)
# Query row blocks of causal_xla_attention.
CAUSAL_BLOCKS = 4


def xla_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                  mask_BTS: Array, scale: float | None = None) -> Array:
  """Masked softmax attention; mask True = may attend. Returns [B, T, N, Hv].

  Scores and softmax are computed in float32. (A row with no allowed key would
  average all values; causal self-attention always allows the diagonal.)
  `scale` multiplies q k^T (default 1/sqrt(H)); values may have their own
  head dim Hv (multi-head latent attention).
  """
  b, t, n, h = q_BTNH.shape
  s, k = k_BSKH.shape[1], k_BSKH.shape[2]
  hv = v_BSKH.shape[-1]
  g = n // k
  dtype = q_BTNH.dtype
  scale = h**-0.5 if scale is None else scale
  q_BKQH = (q_BTNH * jnp.asarray(scale, dtype)).reshape(
      b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  k_BKSH = k_BSKH.astype(dtype).transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.astype(dtype).transpose(0, 2, 1, 3)
  scores_BKQS = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH,
                           preferred_element_type=jnp.float32)
  mask_BQS = jnp.tile(mask_BTS, (1, g, 1)) if g > 1 else mask_BTS
  scores_BKQS = jnp.where(mask_BQS[:, None], scores_BKQS, _NEG)
  probs_BKQS = jax.nn.softmax(scores_BKQS, axis=-1).astype(dtype)
  out_BKQH = jnp.einsum("bkqs,bksh->bkqh", probs_BKQS, v_BKSH)
  return out_BKQH.reshape(b, k, g, t, hv).transpose(0, 3, 1, 2, 4).reshape(
      b, t, n, hv)


def causal_xla_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array,
                         segment_BT: Array | None,
                         scale: float | None = None) -> Array:
  """Causal (segment-masked) self-attention that skips the masked key blocks.

  Queries are split into CAUSAL_BLOCKS row blocks (when T is a multiple of it
  and T >= 64); block i attends only to keys [0, end of block i), so the
  all-masked upper-right blocks are never computed: 10/16 of the full score
  and softmax work with 4 blocks. Same result as the full masked form.
  """
  t = q_BTNH.shape[1]
  mask_BTT = causal_segment_mask(segment_BT, t)
  blocks = CAUSAL_BLOCKS if t % CAUSAL_BLOCKS == 0 and t >= 64 else 1
  c = t // blocks
  outs = [xla_attention(q_BTNH[:, i * c:(i + 1) * c],
                        k_BTKH[:, :(i + 1) * c], v_BTKH[:, :(i + 1) * c],
                        mask_BTT[:, i * c:(i + 1) * c, :(i + 1) * c], scale)
          for i in range(blocks)]
  return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)


def causal_segment_mask(segment_BT: Array | None, t: int) -> Array:
  """[B or 1, T, T] mask: causal, and within one segment when ids are given."""
  causal_TT = jnp.tril(jnp.ones((t, t), bool))
  if segment_BT is None:
    return causal_TT[None]
  return (segment_BT[:, :, None] == segment_BT[:, None, :]) & causal_TT[None]


def _splash_block(t: int) -> int:
  for block in (512, 256, 128):
    if t % block == 0:
      return block
  raise ValueError(f"attention_impl='splash' needs a sequence length that is"
                   f" a multiple of 128 (the kernel's block); got {t}")


def splash_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array,
                     segment_BT: Array | None, *, mesh=None,
                     batch_axes=None, head_axes=None,
                     interpret: bool = False) -> Array:
  """Causal (and segment-masked) attention by the TPU splash kernel.

  Args:
    q_BTNH, k_BTKH, v_BTKH: queries, keys, values of one self-attention pass.
    segment_BT: packed-example ids (None: one segment per row). As in the xla
      form, a query attends to keys of its own segment only.
    mesh, batch_axes, head_axes: when a mesh is given the kernel runs per
      shard (shard_map), with the batch dim over `batch_axes` and the head dims
      over `head_axes` (mesh axes or None); the length axis must be unsharded.
    interpret: run the Pallas kernel in interpret mode (any backend; tests).

  The kernel's dots follow jax_default_matmul_precision when it is lowered;
  with bf16 inputs that must not be "highest" (Mosaic rejects fp32
  contractions of bf16 tiles).
  """
  b, t, n, h = q_BTNH.shape
  k = k_BTKH.shape[2]
  if segment_BT is None:
    segment_BT = jnp.ones((b, t), jnp.int32)
  head_shards = 1
  if mesh is not None and head_axes is not None:
    axes = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes)
    head_shards = int(np.prod([mesh.shape[a] for a in axes]))
  block = _splash_block(t)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask(
      [splash.CausalMask((t, t)) for _ in range(n // head_shards)])
  kernel = splash.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
      interpret=interpret)

  def per_shard(q_BTNH, k_BTKH, v_BTKH, segment_BT):
    q_BNTH = (q_BTNH * jnp.asarray(h**-0.5, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    ids = splash.SegmentIds(q=segment_BT, kv=segment_BT)
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BTKH.transpose(0, 2, 1, 3),
                                v_BTKH.transpose(0, 2, 1, 3), segment_ids=ids)
    return out_BNTH.transpose(0, 2, 1, 3)

  if mesh is None:
    return per_shard(q_BTNH, k_BTKH, v_BTKH, segment_BT)
  p = jax.sharding.PartitionSpec
  kv_axes = head_axes if k % head_shards == 0 else None
  if kv_axes is None and head_axes is not None:
    raise ValueError(f"attention_impl='splash': {k} kv heads cannot be split"
                     f" over the {head_shards}-way head sharding")
  return jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(p(batch_axes, None, head_axes, None),
                p(batch_axes, None, kv_axes, None),
                p(batch_axes, None, kv_axes, None), p(batch_axes, None)),
      out_specs=p(batch_axes, None, head_axes, None),
      check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_BT)


def attend(impl: str, q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, *,
           segment_BT: Array | None = None, mask_BTS: Array | None = None,
           shard=None, scale: float | None = None) -> Array:
  """Self-attention by `impl` (see module docstring).

  Args:
    impl: LlamaConfig.attention_impl.
    q_BTNH: queries. k_BSKH, v_BSKH: keys/values (S = T without a cache).
    segment_BT: segment ids for a cache-free causal pass (None: one segment).
    mask_BTS: an explicit mask (KV-cache decoding); None means causal within
      segment_BT.
    shard: for splash under a mesh, (mesh, batch_axes, head_axes).
    scale: multiplies q k^T; default 1/sqrt(H). Only the xla form takes
      another (and values of another head dim).
  """
  t = q_BTNH.shape[1]
  if scale is not None and impl != "xla":
    raise ValueError(f"attention_impl={impl!r} takes the default 1/sqrt(H)"
                     " softmax scale only; use 'xla'")
  if impl == "splash" and mask_BTS is None:
    mesh, batch_axes, head_axes = shard or (None, None, None)
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_BT, mesh=mesh,
                            batch_axes=batch_axes, head_axes=head_axes)
  if impl in ("xla", "splash"):
    if mask_BTS is None:
      return causal_xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_BT, scale)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
  implementation = None if impl == "auto" else impl
  dtype = q_BTNH.dtype
  if mask_BTS is None and segment_BT is None:
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), is_causal=True,
        implementation=implementation)
  if mask_BTS is None:
    mask_BTS = causal_segment_mask(segment_BT, t)
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype),
      mask=mask_BTS[:, None], implementation=implementation)

