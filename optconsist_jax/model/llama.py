"""Llama decoder in Flax NNX.

RMSNorm, rotary embeddings in the Hugging Face (rotate-half) convention,
grouped-query attention (model.attention: XLA, JAX's fused kernels or the TPU
splash kernel, by `LlamaConfig.attention_impl`), SwiGLU MLP,
tied or untied embeddings, and a KV cache for decoding.

Parameters of the decoder blocks are always stacked on a leading `layers` axis
(one `Block` module whose arrays have shape [L, ...]); `LlamaConfig.scan_layers`
only chooses whether the forward pass scans over that axis or unrolls a Python
loop, so checkpoints and optimizer code see one layout.

Every parameter carries logical axis names (Flax `out_sharding` metadata,
eager sharding off) and the main activations pass through `constrain(x, names)`
so that a rules table outside the model (optconsist_jax.sharding) decides the
layout. Shape suffixes: B batch, T query length, S key length / cache slots,
D hidden, N query heads, K kv heads, H head dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from optconsist_jax import sharding
from optconsist_jax.model import attention
from optconsist_jax.model.config import LlamaConfig

Array = jax.Array
# Maps an activation and its logical axis names to a (possibly constrained)
# activation. The identity when no mesh is in use.
Constrain = Callable[[Array, tuple[str | None, ...]], Array]


def no_constraint(x: Array, names: tuple[str | None, ...]) -> Array:
  del names
  return x


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(value: Array, names: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def dense(x: Array, w_IO: Array) -> Array:
  """x[..., I] @ w[I, O] computed as one 2-D matmul [rows, I] @ [I, O].

  Folding the leading (batch, length) axes into one row axis before the dot
  makes the transposed products of the backward pass (the weight gradient
  x^T g) contract a single axis. With x kept [B, T, I], XLA's CPU backend
  receives dot_general(g[B, T, O], x[B, T, I]) contracting two axes and
  materialises a strided transpose of g before a generic dot; the 2-D form
  maps every product onto the GEMM library (bench/model_throughput.py).
  Same values: it is the same sum.

  Only the CPU lowering folds: on TPU the SPMD partitioner re-gathers the
  FSDP-sharded weights once more per micro-batch for the folded form (Llama-2-7B
  on v5p-8: +32 GiB of all-gather per step), so other platforms keep the
  batched product. `lax.platform_dependent` picks by the platform being
  compiled for, so the planner's TPU compiles on a CPU host get the TPU form.
  """
  def rows(x, w_IO):
    return jnp.dot(x.reshape(-1, x.shape[-1]), w_IO).reshape(
        *x.shape[:-1], w_IO.shape[-1])

  def batched(x, w_IO):
    return jnp.einsum("...i,io->...o", x, w_IO)

  return jax.lax.platform_dependent(x, w_IO, cpu=rows, default=batched)


class KVCache(NamedTuple):
  """Keys and values of every layer for incremental decoding.

  Attributes:
    k_LBSKH: rotated keys, one slot per position written so far.
    v_LBSKH: values.
    segment_BS: segment id of each slot (0 = never written / padding).
    index: number of slots written (the next write position), int32 scalar.
  """

  k_LBSKH: Array
  v_LBSKH: Array
  segment_BS: Array
  index: Array


class ForwardOutput(NamedTuple):
  logits_BTV: Array
  cache: KVCache | None
  # Per-layer statistics of the residual stream after each block, each [L].
  stats: dict[str, Array] | None


class Linear(nnx.Module):
  """y = x @ kernel, kernel stored [*stack, in, out] in `param_dtype`.

  `rng` is accepted (and ignored) so adapters that need randomness (LoRA
  dropout) can replace this module without changing the callers.
  """

  def __init__(self, in_features: int, out_features: int,
               names: tuple[str, str], *, stack: tuple[int, ...] = (),
               stack_names: tuple[str, ...] = (), config: LlamaConfig,
               rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(config.initializer_range)
    shape = (*stack, in_features, out_features)
    self.kernel = _param(
        init(rngs.params(), shape, jnp.dtype(config.param_dtype)),
        (*stack_names, *names))
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x: Array, rng: Array | None = None) -> Array:
    del rng
    return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, normalised in fp32 as Hugging Face does.

  With config.norm_type == "layer" the mean is subtracted first (LayerNorm
  without bias, as nanoGPT's bias=False bases).
  """

  def __init__(self, dim: int, *, stack: tuple[int, ...] = (),
               stack_names: tuple[str, ...] = (), config: LlamaConfig):
    self.scale = _param(
        jnp.ones((*stack, dim), jnp.dtype(config.param_dtype)),
        (*stack_names, "norm"))
    self.eps = config.rms_norm_eps
    self.dtype = jnp.dtype(config.dtype)
    self.center = config.norm_type == "layer"

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.center:
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                              + self.eps)
    # HF casts back to the input dtype before multiplying by the weight.
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half convention (Hugging Face Llama)."""
  h = x_BTNH.shape[-1]
  inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  freqs_BTH2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_H2
  emb_BTH = jnp.concatenate([freqs_BTH2, freqs_BTH2], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb_BTH), jnp.sin(emb_BTH)
  x32 = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BTNH.dtype)


def _head_sharding(constrain: Constrain, impl: str):
  """(mesh, batch axes, head axes) of the activations, for the splash kernel.

  None without a mesh (or for the other implementations, which GSPMD
  partitions by itself). A sharded length axis is an error (the kernel sees
  whole sequences).
  """
  mesh = getattr(constrain, "mesh", None)
  if impl != "splash" or mesh is None:
    return None
  batch, length, heads = sharding.logical_to_spec(
      ("act_batch", "act_length", "act_heads"), constrain.rules)
  if length is not None:
    raise ValueError("attention_impl='splash' needs an unsharded sequence"
                     f" axis; the rules map act_length to {length!r}")
  return mesh, batch, heads


class Attention(nnx.Module):
  """Grouped-query self-attention with optional KV cache."""

  def __init__(self, config: LlamaConfig, *, stack, stack_names,
               rngs: nnx.Rngs):
    c = config
    d, h = c.hidden_size, c.head_dim
    lin = functools.partial(Linear, stack=stack, stack_names=stack_names,
                            config=c, rngs=rngs)
    self.q_proj = lin(d, c.num_heads * h, ("embed", "heads"))
    self.k_proj = lin(d, c.num_kv_heads * h, ("embed", "kv_heads"))
    self.v_proj = lin(d, c.num_kv_heads * h, ("embed", "kv_heads"))
    self.o_proj = lin(c.num_heads * h, d, ("heads", "embed"))
    self.num_heads, self.num_kv_heads, self.head_dim = (
        c.num_heads, c.num_kv_heads, h)
    self.rope_theta = c.rope_theta if c.position_embedding == "rope" else None
    self.impl = c.attention_impl

  def __call__(self, x_BTD, positions_BT, segment_BT, kv, *, constrain,
               rng=None):
    """Returns (output_BTD, (k_BSKH, v_BSKH) if kv was given else None).

    kv: None for a plain causal (and segment-masked) pass, else
      (cache_k_BSKH, cache_v_BSKH, cache_segment_BS, index) with
      cache_segment_BS already holding the segments of this call's tokens.
    """
    b, t, _ = x_BTD.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    keys = jax.random.split(rng, 4) if rng is not None else [None] * 4
    q_BTNH = self.q_proj(x_BTD, keys[0]).reshape(b, t, n, h)
    k_BTKH = self.k_proj(x_BTD, keys[1]).reshape(b, t, k, h)
    v_BTKH = self.v_proj(x_BTD, keys[2]).reshape(b, t, k, h)
    if self.rope_theta is not None:
      q_BTNH = rope(q_BTNH, positions_BT, self.rope_theta)
      k_BTKH = rope(k_BTKH, positions_BT, self.rope_theta)
    q_BTNH = constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
    k_BTKH = constrain(k_BTKH, ("act_batch", "act_length", "act_kv_heads",
                                None))
    v_BTKH = constrain(v_BTKH, ("act_batch", "act_length", "act_kv_heads",
                                None))
    new_kv = None
    if kv is None:
      out_BTNH = attention.attend(self.impl, q_BTNH, k_BTKH, v_BTKH,
                                  segment_BT=segment_BT,
                                  shard=_head_sharding(constrain, self.impl))
    else:
      cache_k, cache_v, cache_segment_BS, index = kv
      k_BSKH = jax.lax.dynamic_update_slice(
          cache_k, k_BTKH.astype(cache_k.dtype), (0, index, 0, 0))
      v_BSKH = jax.lax.dynamic_update_slice(
          cache_v, v_BTKH.astype(cache_v.dtype), (0, index, 0, 0))
      s = k_BSKH.shape[1]
      q_slot_T = index + jnp.arange(t)
      causal_TS = q_slot_T[:, None] >= jnp.arange(s)[None, :]
      mask_BTS = ((segment_BT[:, :, None] == cache_segment_BS[:, None, :])
                  & causal_TS[None])
      out_BTNH = attention.attend(self.impl, q_BTNH, k_BSKH, v_BSKH,
                                  mask_BTS=mask_BTS)
      new_kv = (k_BSKH, v_BSKH)
    out_BTNH = constrain(out_BTNH, ("act_batch", "act_length", "act_heads",
                                    None))
    return self.o_proj(out_BTNH.reshape(b, t, n * h), keys[3]), new_kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, stack, stack_names,
               rngs: nnx.Rngs):
    c = config
    lin = functools.partial(Linear, stack=stack, stack_names=stack_names,
                            config=c, rngs=rngs)
    self.gate_proj = lin(c.hidden_size, c.intermediate_size, ("embed", "mlp"))
    self.up_proj = lin(c.hidden_size, c.intermediate_size, ("embed", "mlp"))
    self.down_proj = lin(c.intermediate_size, c.hidden_size, ("mlp", "embed"))

  def __call__(self, x_BTD, *, constrain, rng=None):
    keys = jax.random.split(rng, 3) if rng is not None else [None] * 3
    h_BTF = jax.nn.silu(self.gate_proj(x_BTD, keys[0])) * self.up_proj(
        x_BTD, keys[1])
    h_BTF = constrain(h_BTF, ("act_batch", "act_length", "act_mlp"))
    return self.down_proj(h_BTF, keys[2])


class Block(nnx.Module):
  """Pre-norm decoder block. Built stacked ([L, ...] params), called per layer."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    stack, stack_names = (config.num_layers,), ("layers",)
    self.attn_norm = RMSNorm(config.hidden_size, stack=stack,
                             stack_names=stack_names, config=config)
    self.attn = Attention(config, stack=stack, stack_names=stack_names,
                          rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, stack=stack,
                            stack_names=stack_names, config=config)
    self.mlp = MLP(config, stack=stack, stack_names=stack_names, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, segment_BT, kv, *, constrain,
               rng=None):
    rng_attn, rng_mlp = (jax.random.split(rng) if rng is not None
                         else (None, None))
    attn_BTD, new_kv = self.attn(self.attn_norm(x_BTD), positions_BT,
                                 segment_BT, kv, constrain=constrain,
                                 rng=rng_attn)
    x_BTD = constrain(x_BTD + attn_BTD.astype(x_BTD.dtype),
                      ("act_batch", "act_length", "act_embed"))
    mlp_BTD = self.mlp(self.mlp_norm(x_BTD), constrain=constrain, rng=rng_mlp)
    x_BTD = constrain(x_BTD + mlp_BTD.astype(x_BTD.dtype),
                      ("act_batch", "act_length", "act_embed"))
    return x_BTD, new_kv


def residual_stats(x_BTD: Array) -> dict[str, Array]:
  """Mean, RMS, max |x| and kurtosis of all entries of a residual stream."""
  x = x_BTD.astype(jnp.float32)
  mean = jnp.mean(x)
  centered = x - mean
  var = jnp.mean(centered**2)
  return {
      "mean": mean,
      "rms": jnp.sqrt(jnp.mean(x * x)),
      "max_abs": jnp.max(jnp.abs(x)),
      "kurtosis": jnp.mean(centered**4) / jnp.maximum(var * var, 1e-30),
  }


class Llama(nnx.Module):
  """Llama causal language model.

  Calling the model on int32 tokens [B, T] returns float32 logits [B, T, V].
  `forward` is the general entry point (segment ids for packed rows, a KV
  cache, residual statistics).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs,
               constrain: Constrain = no_constraint):
    c = config
    self.config = c
    self.constrain = constrain
    init = jax.nn.initializers.normal(c.initializer_range)
    self.embed = _param(
        init(rngs.params(), (c.vocab_size, c.hidden_size),
             jnp.dtype(c.param_dtype)), ("vocab", "embed"))
    self.pos_embed = (
        _param(init(rngs.params(), (c.max_position_embeddings, c.hidden_size),
                    jnp.dtype(c.param_dtype)), ("positions", "embed"))
        if c.position_embedding == "learned" else None)
    self.layers = Block(c, rngs=rngs)
    self.final_norm = RMSNorm(c.hidden_size, config=c)
    self.lm_head = (None if c.tie_embeddings else
                    Linear(c.hidden_size, c.vocab_size, ("embed", "vocab"),
                           config=c, rngs=rngs))

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segment_ids_BT: Array | None = None) -> Array:
    return self.forward(tokens_BT, positions_BT, segment_ids_BT).logits_BTV

  def init_cache(self, batch: int, max_len: int,
                 dtype: Any | None = None) -> KVCache:
    c = self.config
    dtype = jnp.dtype(dtype or c.dtype)
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))

  def forward(self, tokens_BT: Array, positions_BT: Array | None = None,
              segment_ids_BT: Array | None = None,
              cache: KVCache | None = None, *, return_stats: bool = False,
              dropout_rng: Array | None = None) -> ForwardOutput:
    """The decoder.

    Args:
      tokens_BT: int32 token ids.
      positions_BT: rotary positions; default 0..T-1 (or continuing from
        `cache.index` when decoding).
      segment_ids_BT: packed-example ids; tokens attend only within their
        segment. 0 marks padding. Default: one segment per row.
      cache: a KV cache to write this call's keys/values into at
        `cache.index` and to attend over (prefill and one-token steps).
      return_stats: also return per-layer residual-stream statistics.
      dropout_rng: randomness for adapters with dropout (LoRA), None to run
        deterministically.

    Returns:
      ForwardOutput(logits_BTV float32, updated cache or None, stats or None).
    """
    c, constrain = self.config, self.constrain
    b, t = tokens_BT.shape
    if positions_BT is None:
      start = 0 if cache is None else cache.index
      positions_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    if segment_ids_BT is None and cache is not None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)
    cache_segment_BS = None
    if cache is not None:
      cache_segment_BS = jax.lax.dynamic_update_slice(
          cache.segment_BS, segment_ids_BT.astype(jnp.int32), (0, cache.index))

    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(c.dtype)
    if self.pos_embed is not None:
      x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT,
                               axis=0).astype(c.dtype)
    x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

    graphdef, layer_state = nnx.split(self.layers)

    def apply_block(x_BTD, layer_state, kv, rng):
      block = nnx.merge(graphdef, layer_state)
      return block(x_BTD, positions_BT, segment_ids_BT, kv,
                   constrain=constrain, rng=rng)

    if c.remat_policy != "none":
      apply_block = jax.checkpoint(apply_block, policy=_REMAT[c.remat_policy])

    def layer_rng(i):
      return None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)

    def step(x_BTD, xs):
      layer_state, kv_pair, i = xs
      kv = None if cache is None else (*kv_pair, cache_segment_BS, cache.index)
      x_BTD, new_kv = apply_block(x_BTD, layer_state, kv, layer_rng(i))
      stats = residual_stats(x_BTD) if return_stats else None
      return x_BTD, (new_kv, stats)

    kv_xs = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH)
    layer_ids = jnp.arange(c.num_layers)
    if c.scan_layers:
      x_BTD, (new_kv, stats) = jax.lax.scan(
          step, x_BTD, (layer_state, kv_xs, layer_ids))
    else:
      outs = []
      for i in range(c.num_layers):
        xs = jax.tree.map(lambda a, i=i: a[i],
                          (layer_state, kv_xs, layer_ids))
        x_BTD, out = step(x_BTD, xs)
        outs.append(out)
      new_kv, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)

    x_BTD = self.final_norm(x_BTD)
    if self.lm_head is None:
      logits_BTV = dense(x_BTD, self.embed[...].astype(c.dtype).T)
    else:
      logits_BTV = self.lm_head(x_BTD)
    logits_BTV = constrain(logits_BTV.astype(jnp.float32),
                           ("act_batch", "act_length", "act_vocab"))
    new_cache = None
    if cache is not None:
      new_cache = KVCache(new_kv[0], new_kv[1], cache_segment_BS,
                          cache.index + t)
    return ForwardOutput(logits_BTV, new_cache, stats)


def parameter_count(model: nnx.Module) -> int:
  """Number of scalars in the model's nnx.Param variables."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def make_model(config: LlamaConfig, *, constrain: Constrain = no_constraint,
               seed: int = 0,
               transform: Callable[[Llama], Any] | None = None) -> nnx.Module:
  """A Llama initialized from `nnx.Rngs(seed)`, then `transform` applied.

  Args:
    config: model shapes.
    constrain: places activations (sharding.LogicalConstraint on a mesh).
    seed: init seed.
    transform: applied to the new model, e.g. LoRA's apply_lora; may change
      it in place (return None) or return a new model.
  """
  model = Llama(config, rngs=nnx.Rngs(seed), constrain=constrain)
  if transform is not None:
    out = transform(model)
    model = model if out is None else out
  return model


def abstract_model(config: LlamaConfig, *, constrain: Constrain = no_constraint,
                   seed: int = 0,
                   transform: Callable[[Llama], Any] | None = None
                   ) -> nnx.Module:
  """`make_model` with ShapeDtypeStructs instead of arrays (no memory used).

  The one abstract trace of the model: the train state builder
  (train/state.py) and every weight loader (io/) start from it.
  """
  return nnx.eval_shape(lambda: make_model(
      config, constrain=constrain, seed=seed, transform=transform))
