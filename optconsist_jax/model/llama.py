"""Llama decoder in Flax NNX.

RMSNorm, rotary embeddings in the Hugging Face (rotate-half) convention
(model.rope), grouped-query attention (model.attention: XLA, JAX's fused
kernels or the TPU splash kernel, by `LlamaConfig.attention_impl`), SwiGLU
MLP, tied or untied embeddings, and a KV cache for decoding.

The Llama-like families are variants of this one model, chosen by config
switches (model.config): Llama-3.1's rope scaling (`rope_type`), q/k/v biases
(`qkv_bias`, Qwen2/2.5), RMSNorm on queries and keys (`qk_norm`: per head,
Qwen3; over the whole projection, OLMo-2), and OLMo-2's norm after each
sublayer instead of before it (`norm_placement`).

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
from optconsist_jax.model import rope as rope_lib
from optconsist_jax.model.config import LlamaConfig
from optconsist_jax.model.layers import Bias
from optconsist_jax.model.layers import dense
from optconsist_jax.model.layers import Linear
from optconsist_jax.model.layers import param as _param
from optconsist_jax.model.layers import RMSNorm

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
    per_layer = dict(stack=stack, stack_names=stack_names, config=c)
    # Each attribute is assigned once (None or a module): NNX fixes whether
    # an attribute holds data on its first assignment.
    bias = functools.partial(Bias, **per_layer) if c.qkv_bias else None
    self.q_bias = bias and bias(c.num_heads * h, ("heads",))
    self.k_bias = bias and bias(c.num_kv_heads * h, ("kv_heads",))
    self.v_bias = bias and bias(c.num_kv_heads * h, ("kv_heads",))
    # Qwen3 ("head"): one [H] scale, each head normalised on its own. OLMo-2
    # ("full"): over all heads of the projection, [N*H] and [K*H] scales.
    norm = (None if c.qk_norm == "none"
            else functools.partial(RMSNorm, **per_layer))
    full = c.qk_norm == "full"
    self.q_norm = norm and norm(c.num_heads * h if full else h,
                                names=("heads",) if full else ("norm",))
    self.k_norm = norm and norm(c.num_kv_heads * h if full else h,
                                names=("kv_heads",) if full else ("norm",))
    self.qk_norm = c.qk_norm
    self.num_heads, self.num_kv_heads, self.head_dim = (
        c.num_heads, c.num_kv_heads, h)
    self.rope_config = c if c.position_embedding == "rope" else None
    self.impl = c.attention_impl

  def _project(self, proj, bias, norm, x_BTD, heads, rng):
    """[B, T, heads, H]: projection, bias, q/k norm (before the rotation)."""
    b, t, _ = x_BTD.shape
    y = proj(x_BTD, rng)
    if bias is not None:
      y = bias(y)
    if norm is not None and self.qk_norm == "full":
      y = norm(y)
    y = y.reshape(b, t, heads, self.head_dim)
    if norm is not None and self.qk_norm == "head":
      y = norm(y)
    return y

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
    q_BTNH = self._project(self.q_proj, self.q_bias, self.q_norm, x_BTD, n,
                           keys[0])
    k_BTKH = self._project(self.k_proj, self.k_bias, self.k_norm, x_BTD, k,
                           keys[1])
    v_BTKH = self._project(self.v_proj, self.v_bias, None, x_BTD, k, keys[2])
    if self.rope_config is not None:
      inv_freq_H2 = rope_lib.inverse_frequencies(h, self.rope_config)
      q_BTNH = rope_lib.rope(q_BTNH, positions_BT, inv_freq_H2)
      k_BTKH = rope_lib.rope(k_BTKH, positions_BT, inv_freq_H2)
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
               rngs: nnx.Rngs, intermediate_size: int | None = None):
    c = config
    f = intermediate_size or c.intermediate_size
    lin = functools.partial(Linear, stack=stack, stack_names=stack_names,
                            config=c, rngs=rngs)
    self.gate_proj = lin(c.hidden_size, f, ("embed", "mlp"))
    self.up_proj = lin(c.hidden_size, f, ("embed", "mlp"))
    self.down_proj = lin(f, c.hidden_size, ("mlp", "embed"))

  def __call__(self, x_BTD, *, constrain, rng=None):
    keys = jax.random.split(rng, 3) if rng is not None else [None] * 3
    h_BTF = jax.nn.silu(self.gate_proj(x_BTD, keys[0])) * self.up_proj(
        x_BTD, keys[1])
    h_BTF = constrain(h_BTF, ("act_batch", "act_length", "act_mlp"))
    return self.down_proj(h_BTF, keys[2])


class Block(nnx.Module):
  """Decoder block. Built stacked ([L, ...] params), called per layer.

  Pre-norm (Llama): x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)). With
  `norm_placement="post"` (OLMo-2, arXiv 2501.00656 section 3.3) each norm is
  applied to its sublayer's output instead: x + attn_norm(attn(x)), then
  x + mlp_norm(mlp(x)).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    stack, stack_names = (config.num_layers,), ("layers",)
    self.attn_norm = RMSNorm(config.hidden_size, stack=stack,
                             stack_names=stack_names, config=config)
    self.attn = Attention(config, stack=stack, stack_names=stack_names,
                          rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, stack=stack,
                            stack_names=stack_names, config=config)
    self.mlp = MLP(config, stack=stack, stack_names=stack_names, rngs=rngs)
    self.post_norm = config.norm_placement == "post"

  def __call__(self, x_BTD, positions_BT, segment_BT, kv, *, constrain,
               rng=None):
    rng_attn, rng_mlp = (jax.random.split(rng) if rng is not None
                         else (None, None))
    if self.post_norm:
      attn_BTD, new_kv = self.attn(x_BTD, positions_BT, segment_BT, kv,
                                   constrain=constrain, rng=rng_attn)
      attn_BTD = self.attn_norm(attn_BTD)
    else:
      attn_BTD, new_kv = self.attn(self.attn_norm(x_BTD), positions_BT,
                                   segment_BT, kv, constrain=constrain,
                                   rng=rng_attn)
    x_BTD = constrain(x_BTD + attn_BTD.astype(x_BTD.dtype),
                      ("act_batch", "act_length", "act_embed"))
    if self.post_norm:
      mlp_BTD = self.mlp_norm(self.mlp(x_BTD, constrain=constrain,
                                       rng=rng_mlp))
    else:
      mlp_BTD = self.mlp(self.mlp_norm(x_BTD), constrain=constrain,
                         rng=rng_mlp)
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
