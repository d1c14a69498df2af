"""DeepSeek-V3's mixture-of-experts layer in Flax NNX: router, routed and
shared experts.

DeepSeekMoE (arXiv 2401.06066) as DeepSeek-V3 uses it (DeepSeek-AI 2024,
arXiv 2412.19437 section 2.1.2) and as transformers' modeling_deepseek_v3.py
computes it (DeepseekV3TopkRouter, DeepseekV3MoE):

* Routing (`route`): sigmoid affinities; a per-expert bias
  (`e_score_correction_bias`, V3's auxiliary-loss-free balancing; here
  `router_bias`, a `RoutingBias` variable) is added for choosing the experts
  only; group-limited choice (n_group, topk_group); weights are the unbiased
  affinities of the chosen experts, normalised if norm_topk_prob, times
  routed_scaling_factor.
* Routed experts, SwiGLU, stored stacked [*stack, E, in, out], by one of two
  paths (`moe_impl`): "dense", every expert on every token with unchosen
  experts weighing 0 (the reference), or "ragged", assignments sorted by
  expert and one `jax.lax.ragged_dot` per projection.
* Shared experts every token passes through: one llama.MLP of width
  n_shared_experts x moe_intermediate_size.

LoRA (model/lora.py) sets the layer's `<proj>_lora` hooks: per-expert adapters
both expert paths add to each routed-expert projection. Logical axes:
`expert` (routed experts) and `expert_mlp` (an expert's hidden width), as
model/deepseek_v3.py documents. Shape suffixes: D hidden, F an expert's
hidden width, E routed experts, K top-k, M tokens (B*T), A assignments (M*K).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from optconsist_jax.model import llama
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config
from optconsist_jax.model.layers import param as _param

Array = jax.Array


class RoutingBias(nnx.Variable):
  """The experts' selection bias, set by load balancing, not by gradients
  (its own Variable type: optimizers over nnx.Param leave it alone)."""


def route(x_MD: Array, kernel_DE: Array, bias_E: Array,
          config: DeepseekV3Config) -> tuple[Array, Array]:
  """DeepSeek-V3's top-k routing: (expert ids [M, K], weights [M, K]).

  Computed in float32 (transformers keeps the gate in float32). The bias
  changes which experts are chosen, not their weights.
  """
  c = config
  scores_ME = jax.nn.sigmoid(jnp.dot(x_MD.astype(jnp.float32),
                                     kernel_DE.astype(jnp.float32)))
  choice_ME = scores_ME + bias_E.astype(jnp.float32)
  m, e = choice_ME.shape
  if c.topk_group < c.n_group:
    grouped_MGX = choice_ME.reshape(m, c.n_group, e // c.n_group)
    group_MG = jnp.sum(jax.lax.top_k(grouped_MGX, 2)[0], axis=-1)
    _, keep_MK = jax.lax.top_k(group_MG, c.topk_group)
    keep_MG = jnp.zeros_like(group_MG, bool).at[
        jnp.arange(m)[:, None], keep_MK].set(True)
    choice_ME = jnp.where(jnp.repeat(keep_MG, e // c.n_group, axis=1),
                          choice_ME, -jnp.inf)
  _, ids_MK = jax.lax.top_k(choice_ME, c.num_experts_per_tok)
  weights_MK = jnp.take_along_axis(scores_ME, ids_MK, axis=1)
  if c.norm_topk_prob:
    weights_MK = weights_MK / (jnp.sum(weights_MK, -1, keepdims=True) + 1e-20)
  return ids_MK, weights_MK * c.routed_scaling_factor


class MoE(nnx.Module):
  """Routed experts (dense reference or ragged_dot) plus shared experts."""

  def __init__(self, config: DeepseekV3Config, *, stack, stack_names,
               rngs: nnx.Rngs):
    c = config
    d, f, e = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
    init = jax.nn.initializers.normal(c.initializer_range)
    dtype = jnp.dtype(c.param_dtype)

    def experts(shape, names):
      return _param(init(rngs.params(), (*stack, e, *shape), dtype),
                    (*stack_names, "expert", *names))

    # float32 whatever param_dtype (transformers' _keep_in_fp32_modules_strict).
    self.router = _param(init(rngs.params(), (*stack, d, e), jnp.float32),
                         (*stack_names, "embed", "expert"))
    self.router_bias = RoutingBias(
        jnp.zeros((*stack, e), jnp.float32),
        out_sharding=(*stack_names, "expert"), eager_sharding=False)
    # "expert_mlp": expert parallelism may map "expert" onto tensor's axis.
    self.gate_proj = experts((d, f), ("embed", "expert_mlp"))
    self.up_proj = experts((d, f), ("embed", "expert_mlp"))
    self.down_proj = experts((f, d), ("expert_mlp", "embed"))
    self.shared = llama.MLP(c, stack=stack, stack_names=stack_names, rngs=rngs,
                            intermediate_size=f * c.n_shared_experts)
    # LoRA hooks (lora.ExpertLoRA, set by apply_lora), added in both expert
    # paths; nnx.data: module-valued later, so pytree data from now on.
    self.gate_proj_lora = nnx.data(None)
    self.up_proj_lora = nnx.data(None)
    self.down_proj_lora = nnx.data(None)
    self.config = c

  def _experts(self, proj: str, x, sizes_E, rng):
    """x [M|E,M, in] -> [E, M, out], or [A, in] sorted -> [A, out] (sizes_E),
    times each expert's `proj` weight plus its LoRA update if any."""
    dt = x.dtype
    w_EIO = getattr(self, proj)[...].astype(dt)
    if sizes_E is not None:
      y = jax.lax.ragged_dot(x, w_EIO, sizes_E)
    else:
      y = jnp.einsum("mi,eio->emo" if x.ndim == 2 else "emi,eio->emo", x,
                     w_EIO)
    adapter = getattr(self, f"{proj}_lora")
    if adapter is not None:
      y = y + adapter(x, sizes_E, rng).astype(dt)
    return y

  def _dense(self, x_MD, ids_MK, weights_MK, keys):
    """Every expert on every token; unchosen experts weigh 0."""
    dt = x_MD.dtype
    m, e = x_MD.shape[0], self.config.n_routed_experts
    w_ME = jnp.zeros((m, e), jnp.float32).at[
        jnp.arange(m)[:, None], ids_MK].add(weights_MK)
    h_EMF = (jax.nn.silu(self._experts("gate_proj", x_MD, None, keys[0]))
             * self._experts("up_proj", x_MD, None, keys[1]))
    y_EMD = self._experts("down_proj", h_EMF, None, keys[2])
    return jnp.einsum("emd,me->md", y_EMD, w_ME.astype(dt))

  def _ragged(self, x_MD, ids_MK, weights_MK, keys):
    """Tokens sorted by expert; one ragged_dot per projection."""
    dt = x_MD.dtype
    k = ids_MK.shape[1]
    e = self.config.n_routed_experts
    ids_A = ids_MK.reshape(-1)
    order_A = jnp.argsort(ids_A, stable=True)
    token_A = order_A // k
    sizes_E = jnp.bincount(ids_A, length=e).astype(jnp.int32)
    x_AD = x_MD[token_A]
    h_AF = (jax.nn.silu(self._experts("gate_proj", x_AD, sizes_E, keys[0]))
            * self._experts("up_proj", x_AD, sizes_E, keys[1]))
    y_AD = self._experts("down_proj", h_AF, sizes_E, keys[2])
    y_AD = y_AD * weights_MK.reshape(-1)[order_A][:, None].astype(dt)
    return jnp.zeros_like(x_MD).at[token_A].add(y_AD)

  def __call__(self, x_BTD, *, constrain, rng=None):
    """Returns (output_BTD, chosen expert ids [B, T, K])."""
    b, t, d = x_BTD.shape
    x_MD = x_BTD.reshape(b * t, d)
    ids_MK, weights_MK = route(x_MD, self.router[...],
                               self.router_bias[...], self.config)
    # Dropout keys of the experts' adapters (the shared MLP's: rng).
    keys = ([None] * 3 if rng is None
            else list(jax.random.split(jax.random.fold_in(rng, 1), 3)))
    routed = self._ragged if self.config.moe_impl == "ragged" else self._dense
    y_BTD = routed(x_MD, ids_MK, weights_MK, keys).reshape(b, t, d)
    y_BTD = y_BTD + self.shared(x_BTD, constrain=constrain, rng=rng)
    return y_BTD, jnp.sort(ids_MK, axis=-1).reshape(b, t, -1)
