"""DeepSeek-V3 decoder in Flax NNX: multi-head latent attention and MoE.

The architecture of DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437) and of
Moonlight-16B-A3B (arXiv 2502.16982), as transformers' modeling_deepseek_v3.py
computes it, built from the Llama model's blocks (model/layers.py Linear and
RMSNorm, model/rope.py, model/attention.py's XLA attention, llama.MLP):

* Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434 section
  2.1): queries directly (q_proj) or through a low-rank bottleneck (q_a_proj,
  RMSNorm, q_b_proj); keys and values from one compressed latent c
  (kv_a_proj_with_mqa, RMSNorm, kv_b_proj) plus a rotary key part shared by
  all heads (decoupled RoPE). The KV cache holds the latent and the shared
  rotary key, kv_lora_rank + qk_rope_head_dim numbers per token and layer.
  Rotary pairs are interleaved in DeepSeek's checkpoints (`rope_interleave`):
  they are de-interleaved before the rotate-half rotation, as transformers'
  apply_rotary_pos_emb_interleave does. With YaRN scaling the softmax scale is
  multiplied by mscale(factor, mscale_all_dim)^2 and cos/sin by the
  attention factor (transformers' yarn_apply_mscale, _compute_yarn_parameters).
* Mixture of experts (DeepSeekMoE, arXiv 2401.06066; V3 section 2.1.2;
  model/moe.py): sigmoid-routed experts, chosen with V3's auxiliary-loss-free
  balancing bias and group-limited choice, plus shared experts every token
  passes through. The first `first_k_dense_replace` layers have a dense MLP
  instead.

Layers are stacked as in model/llama.py in two scanned (or unrolled) stacks,
`dense_layers` [k, ...] and `moe_layers` [L - k, ...]; int32 tokens [B, T]
give float32 logits [B, T, V]; `forward` and `init_cache` follow the Llama
model's protocol, so model/generate.py decodes it. Logical axes as
llama.py's plus `expert` (routed experts; replicated by sharding.RULES),
`expert_mlp` (an expert's hidden width; tensor-parallel) and `latent` (MLA's
latents); expert parallelism is a rules change: ("expert", "tensor"),
("expert_mlp", None). Shape suffixes as llama.py's plus C kv_lora_rank,
R qk_rope_head_dim, K top-k experts (not kv heads).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from optconsist_jax.model import attention
from optconsist_jax.model import llama
from optconsist_jax.model import moe as moe_lib
from optconsist_jax.model import rope as rope_lib
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config
from optconsist_jax.model.layers import dense
from optconsist_jax.model.layers import Linear
from optconsist_jax.model.layers import param as _param
from optconsist_jax.model.layers import RMSNorm

Array = jax.Array
no_constraint = llama.no_constraint
# transformers' DeepseekV3RMSNorm(q_lora_rank / kv_lora_rank): default eps.
LATENT_NORM_EPS = 1e-6


class MLACache(NamedTuple):
  """Compressed keys/values of every layer for incremental decoding.

  Attributes:
    ckv_LBSC: normalised KV latents, one slot per position written so far.
    k_rope_LBSR: rotated shared rotary keys.
    segment_BS: segment id of each slot (0 = never written / padding).
    index: number of slots written (the next write position), int32 scalar.
  """

  ckv_LBSC: Array
  k_rope_LBSR: Array
  segment_BS: Array
  index: Array


class ForwardOutput(NamedTuple):
  logits_BTV: Array
  cache: MLACache | None
  # Per-layer residual statistics, each [L] (return_stats), else None.
  stats: dict[str, Array] | None
  # Routed experts chosen per MoE layer and token, ascending ids [Lm, B, T, K].
  experts_LBTK: Array | None


def rope_scaling(config: DeepseekV3Config) -> tuple[Array, float, float]:
  """(inverse frequencies [R / 2], cos/sin factor, softmax scale)."""
  c, r = config, config.qk_rope_head_dim
  scale = c.qk_head_dim**-0.5
  if c.rope_type == "default":
    inv = 1.0 / (c.rope_theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
    return inv, 1.0, scale
  inv = rope_lib.yarn_inverse_frequencies(
      r, c.rope_theta, c.rope_factor, c.rope_original_max_position,
      beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow,
      truncate=c.rope_truncate)
  factor = c.rope_attention_factor
  if factor is None:
    factor = (rope_lib.yarn_mscale(c.rope_factor, c.rope_mscale)
              / rope_lib.yarn_mscale(c.rope_factor, c.rope_mscale_all_dim)
              if c.rope_mscale and c.rope_mscale_all_dim
              else rope_lib.yarn_mscale(c.rope_factor))
  if c.rope_mscale_all_dim:
    scale *= rope_lib.yarn_mscale(c.rope_factor, c.rope_mscale_all_dim) ** 2
  return inv, factor, scale


class MLAttention(nnx.Module):
  """Multi-head latent attention with a compressed KV cache."""

  def __init__(self, config: DeepseekV3Config, *, stack, stack_names,
               rngs: nnx.Rngs):
    c = config
    d, n = c.hidden_size, c.num_heads
    lin = functools.partial(Linear, stack=stack, stack_names=stack_names,
                            config=c, rngs=rngs)
    norm = functools.partial(RMSNorm, stack=stack, stack_names=stack_names,
                             config=c, eps=LATENT_NORM_EPS)
    # Each attribute is assigned once (None or a module), as in llama.py.
    r = c.q_lora_rank
    self.q_proj = (lin(d, n * c.qk_head_dim, ("embed", "heads"))
                   if r is None else None)
    self.q_a_proj = lin(d, r, ("embed", "latent")) if r else None
    self.q_a_layernorm = norm(r) if r else None
    self.q_b_proj = (lin(r, n * c.qk_head_dim, ("latent", "heads"))
                     if r else None)
    self.kv_a_proj_with_mqa = lin(d, c.kv_lora_rank + c.qk_rope_head_dim,
                                  ("embed", "latent"))
    self.kv_a_layernorm = norm(c.kv_lora_rank)
    self.kv_b_proj = lin(c.kv_lora_rank,
                         n * (c.qk_nope_head_dim + c.v_head_dim),
                         ("latent", "heads"))
    self.o_proj = lin(n * c.v_head_dim, d, ("heads", "embed"))
    self.config = c

  def _rotate(self, x_BTNR, positions_BT):
    c = self.config
    if c.rope_interleave:  # (x0, x1), (x2, x3), ... -> evens then odds
      x_BTNR = jnp.concatenate([x_BTNR[..., 0::2], x_BTNR[..., 1::2]], -1)
    inv_freq, factor, _ = rope_scaling(c)
    out = rope_lib.rope(x_BTNR, positions_BT, inv_freq)
    return out if factor == 1.0 else out * jnp.asarray(factor, out.dtype)

  def __call__(self, x_BTD, positions_BT, segment_BT, kv, *, constrain,
               rng=None):
    """Returns (output_BTD, (ckv_BSC, k_rope_BSR) if kv was given else None).

    kv: None for a causal (segment-masked) pass, else (cache_ckv_BSC,
      cache_k_rope_BSR, cache_segment_BS, index) as llama.Attention's.
    """
    c = self.config
    b, t, _ = x_BTD.shape
    n, nope, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
    keys = jax.random.split(rng, 5) if rng is not None else [None] * 5
    if self.q_proj is not None:
      q_BTX = self.q_proj(x_BTD, keys[0])
    else:
      q_BTX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD, keys[0])),
                            keys[1])
    q_BTNH = q_BTX.reshape(b, t, n, c.qk_head_dim)
    q_rope_BTNR = self._rotate(q_BTNH[..., nope:], positions_BT)
    latent_BTX = self.kv_a_proj_with_mqa(x_BTD, keys[2])
    ckv_BTC = self.kv_a_layernorm(latent_BTX[..., :c.kv_lora_rank])
    k_rope_BTR = self._rotate(latent_BTX[..., None, c.kv_lora_rank:],
                              positions_BT)[:, :, 0]
    new_kv, mask_BTS = None, None
    if kv is None:
      ckv_BSC, k_rope_BSR = ckv_BTC, k_rope_BTR
    else:
      cache_ckv, cache_k_rope, cache_segment_BS, index = kv
      ckv_BSC = jax.lax.dynamic_update_slice(
          cache_ckv, ckv_BTC.astype(cache_ckv.dtype), (0, index, 0))
      k_rope_BSR = jax.lax.dynamic_update_slice(
          cache_k_rope, k_rope_BTR.astype(cache_k_rope.dtype), (0, index, 0))
      s = ckv_BSC.shape[1]
      causal_TS = (index + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
      mask_BTS = ((segment_BT[:, :, None] == cache_segment_BS[:, None, :])
                  & causal_TS[None])
      new_kv = (ckv_BSC, k_rope_BSR)
    s = ckv_BSC.shape[1]
    kv_BSNX = self.kv_b_proj(ckv_BSC.astype(x_BTD.dtype), keys[3]).reshape(
        b, s, n, nope + c.v_head_dim)
    k_BSNH = jnp.concatenate([kv_BSNX[..., :nope], jnp.broadcast_to(
        k_rope_BSR[:, :, None].astype(kv_BSNX.dtype), (b, s, n, r))], -1)
    v_BSNV = kv_BSNX[..., nope:]
    q_BTNH = jnp.concatenate([q_BTNH[..., :nope], q_rope_BTNR], -1)
    q_BTNH = constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
    k_BSNH = constrain(k_BSNH, ("act_batch", "act_length", "act_heads", None))
    v_BSNV = constrain(v_BSNV, ("act_batch", "act_length", "act_heads", None))
    _, _, scale = rope_scaling(c)
    out_BTNV = attention.attend(c.attention_impl, q_BTNH, k_BSNH, v_BSNV,
                                segment_BT=segment_BT, mask_BTS=mask_BTS,
                                scale=scale)
    out_BTNV = constrain(out_BTNV, ("act_batch", "act_length", "act_heads",
                                    None))
    return self.o_proj(out_BTNV.reshape(b, t, n * c.v_head_dim),
                       keys[4]), new_kv


class Block(nnx.Module):
  """Pre-norm decoder block with a dense MLP or MoE; built stacked."""

  def __init__(self, config: DeepseekV3Config, num_layers: int, *, moe: bool,
               rngs: nnx.Rngs):
    stack, names = (num_layers,), ("layers",)
    per_layer = dict(stack=stack, stack_names=names)
    self.attn_norm = RMSNorm(config.hidden_size, config=config, **per_layer)
    self.attn = MLAttention(config, rngs=rngs, **per_layer)
    self.mlp_norm = RMSNorm(config.hidden_size, config=config, **per_layer)
    self.mlp = (moe_lib.MoE(config, rngs=rngs, **per_layer) if moe
                else llama.MLP(config, rngs=rngs, **per_layer))
    self.moe = moe

  def __call__(self, x_BTD, positions_BT, segment_BT, kv, *, constrain,
               rng=None):
    rng_attn, rng_mlp = (jax.random.split(rng) if rng is not None
                         else (None, None))
    attn_BTD, new_kv = self.attn(self.attn_norm(x_BTD), positions_BT,
                                 segment_BT, kv, constrain=constrain,
                                 rng=rng_attn)
    names = ("act_batch", "act_length", "act_embed")
    x_BTD = constrain(x_BTD + attn_BTD.astype(x_BTD.dtype), names)
    out = self.mlp(self.mlp_norm(x_BTD), constrain=constrain, rng=rng_mlp)
    mlp_BTD, experts_BTK = out if self.moe else (out, None)
    x_BTD = constrain(x_BTD + mlp_BTD.astype(x_BTD.dtype), names)
    return x_BTD, new_kv, experts_BTK


class DeepseekV3(nnx.Module):
  """DeepSeek-V3 causal language model (see the module docstring)."""

  def __init__(self, config: DeepseekV3Config, *, rngs: nnx.Rngs,
               constrain: llama.Constrain = no_constraint):
    c = config
    self.config = c
    self.constrain = constrain
    init = jax.nn.initializers.normal(c.initializer_range)
    self.embed = _param(init(rngs.params(), (c.vocab_size, c.hidden_size),
                             jnp.dtype(c.param_dtype)), ("vocab", "embed"))
    k = c.first_k_dense_replace
    self.dense_layers = (Block(c, k, moe=False, rngs=rngs) if k else None)
    self.moe_layers = (Block(c, c.num_moe_layers, moe=True, rngs=rngs)
                       if c.num_moe_layers else None)
    self.final_norm = RMSNorm(c.hidden_size, config=c)
    self.lm_head = (None if c.tie_embeddings else
                    Linear(c.hidden_size, c.vocab_size, ("embed", "vocab"),
                           config=c, rngs=rngs))

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segment_ids_BT: Array | None = None) -> Array:
    return self.forward(tokens_BT, positions_BT, segment_ids_BT).logits_BTV

  def init_cache(self, batch: int, max_len: int,
                 dtype: Any | None = None) -> MLACache:
    c = self.config
    dtype = jnp.dtype(dtype or c.dtype)
    return MLACache(
        jnp.zeros((c.num_layers, batch, max_len, c.kv_lora_rank), dtype),
        jnp.zeros((c.num_layers, batch, max_len, c.qk_rope_head_dim), dtype),
        jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

  def _run_stack(self, stack: Block, x_BTD, kv_xs, first: int, run):
    """Scans (or unrolls) `run` over the layers of one stack."""
    c = self.config
    graphdef, layer_state = nnx.split(stack)

    def apply_block(x_BTD, layer_state, kv, rng):
      block = nnx.merge(graphdef, layer_state)
      return block(x_BTD, run["positions"], run["segment"], kv,
                   constrain=self.constrain, rng=rng)

    if c.remat_policy != "none":
      apply_block = jax.checkpoint(apply_block,
                                   policy=llama._REMAT[c.remat_policy])

    def step(x_BTD, xs):
      layer_state, kv_pair, i = xs
      kv = None if kv_pair is None else (*kv_pair, run["cache_segment"],
                                         run["index"])
      rng = (None if run["dropout_rng"] is None
             else jax.random.fold_in(run["dropout_rng"], i))
      x_BTD, new_kv, experts = apply_block(x_BTD, layer_state, kv, rng)
      stats = llama.residual_stats(x_BTD) if run["stats"] else None
      return x_BTD, (new_kv, stats, experts)

    n = jax.tree.leaves(layer_state)[0].shape[0]
    xs = (layer_state, kv_xs, first + jnp.arange(n))
    if c.scan_layers:
      return jax.lax.scan(step, x_BTD, xs)
    outs = []
    for i in range(n):
      x_BTD, out = step(x_BTD, jax.tree.map(lambda a, i=i: a[i], xs))
      outs.append(out)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *outs)

  def forward(self, tokens_BT: Array, positions_BT: Array | None = None,
              segment_ids_BT: Array | None = None,
              cache: MLACache | None = None, *, return_stats: bool = False,
              dropout_rng: Array | None = None) -> ForwardOutput:
    """The decoder; arguments as `llama.Llama.forward`.

    Returns:
      ForwardOutput(logits_BTV float32, updated cache or None, stats or None,
      chosen experts [MoE layers, B, T, K] or None without MoE layers).
    """
    c, constrain = self.config, self.constrain
    b, t = tokens_BT.shape
    if positions_BT is None:
      start = 0 if cache is None else cache.index
      positions_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    if segment_ids_BT is None and cache is not None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)
    run = dict(positions=positions_BT, segment=segment_ids_BT,
               cache_segment=None, index=None, dropout_rng=dropout_rng,
               stats=return_stats)
    if cache is not None:
      run.update(index=cache.index, cache_segment=jax.lax.dynamic_update_slice(
          cache.segment_BS, segment_ids_BT.astype(jnp.int32),
          (0, cache.index)))

    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(c.dtype)
    x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
    k = c.first_k_dense_replace
    kv_outs, stats, experts = [], [], None
    for stack, lo, hi in ((self.dense_layers, 0, k),
                          (self.moe_layers, k, c.num_layers)):
      if stack is None:
        continue
      kv_xs = (None if cache is None else
               (cache.ckv_LBSC[lo:hi], cache.k_rope_LBSR[lo:hi]))
      x_BTD, (new_kv, layer_stats, layer_experts) = self._run_stack(
          stack, x_BTD, kv_xs, lo, run)
      kv_outs.append(new_kv)
      stats.append(layer_stats)
      if stack is self.moe_layers:
        experts = layer_experts

    x_BTD = self.final_norm(x_BTD)
    if self.lm_head is None:
      logits_BTV = dense(x_BTD, self.embed[...].astype(c.dtype).T)
    else:
      logits_BTV = self.lm_head(x_BTD)
    logits_BTV = constrain(logits_BTV.astype(jnp.float32),
                           ("act_batch", "act_length", "act_vocab"))
    new_cache = None
    if cache is not None:
      new_cache = MLACache(
          jnp.concatenate([kv[0] for kv in kv_outs]),
          jnp.concatenate([kv[1] for kv in kv_outs]), run["cache_segment"],
          cache.index + t)
    all_stats = (jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
                 if return_stats else None)
    return ForwardOutput(logits_BTV, new_cache, all_stats, experts)


def make_model(config: DeepseekV3Config, *,
               constrain: llama.Constrain = no_constraint, seed: int = 0,
               transform: Callable[[DeepseekV3], Any] | None = None
               ) -> nnx.Module:
  """A DeepseekV3 initialized from `nnx.Rngs(seed)`, then `transform`."""
  model = DeepseekV3(config, rngs=nnx.Rngs(seed), constrain=constrain)
  out = None if transform is None else transform(model)
  return model if out is None else out


def abstract_model(config: DeepseekV3Config, *,
                   constrain: llama.Constrain = no_constraint, seed: int = 0,
                   transform: Callable[[DeepseekV3], Any] | None = None
                   ) -> nnx.Module:
  """`make_model` with ShapeDtypeStructs instead of arrays (no memory)."""
  return nnx.eval_shape(lambda: make_model(
      config, constrain=constrain, seed=seed, transform=transform))
