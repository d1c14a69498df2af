"""LoRA adapters on a model's linear layers, and merging them back.

  y = x W + dropout(x) A B * alpha / rank          (Hu et al. 2021)

with A [in, r] initialised uniform(+-1/sqrt(in)) (PEFT's Kaiming-uniform with
a = sqrt(5)) and B [r, out] zeros, so an adapted model starts equal to its
base. Adapters are stacked on the same leading `layers` axis as the base
kernels ([L, in, r] and [L, r, out]) and carry logical axis names (the rank
axis is unnamed, i.e. replicated).

The targets name roles, the same for both model families:

  target  Llama (model/llama.py)  DeepSeek-V3 (model/deepseek_v3.py)
  q       attn.q_proj             attn.q_proj, or q_a_proj and q_b_proj
  k, v    attn.k_proj, v_proj     attn.kv_a_proj_with_mqa and kv_b_proj
                                  (keys and values come out of the same two
                                  matrices: target both or neither)
  o       attn.o_proj             attn.o_proj
  gate,   mlp.*_proj              the dense layers' mlp.*_proj, the shared
  up,                             experts' mlp.shared.*_proj and the routed
  down                            experts' stacked mlp.*_proj
  head    lm_head                 lm_head

so the default (every linear layer of the blocks, Biderman et al. 2024) is
every linear layer of either. The routed experts' weights are stacked
[*layers, E, in, out]; their adapters (`ExpertLoRA`) are too, one pair of
factors per expert ([*layers, E, in, r], [*layers, E, r, out]), applied by
the MoE layer inside both its dense-reference and its ragged_dot paths, so
expert e's update is A_e B_e, of rank r like every other adapted matrix.
The router (DeepSeek-V3's gate, [embed, experts]) gets no adapter. It is
not a projection of the hidden state but the affinity matrix whose top-k
decides which experts a token reaches, kept in float32 for that reason
(transformers' _keep_in_fp32_modules_strict); an update to it moves tokens
to experts whose weights were never trained on them, and Muon's routing
already treats it apart from the hidden matrices (optim/routing.py). PEFT
arrives at the same set: its `target_modules="all-linear"` expands to every
torch.nn.Linear / Conv1D but the output head
(peft/tuners/tuners_utils.py `_maybe_include_all_linear_layers`), and
transformers' DeepseekV3TopkRouter is a plain nn.Module holding a
Parameter, not an nn.Linear (modeling_deepseek_v3.py), so it is never
adapted. transformers' routed experts are fused Parameters too; PEFT reaches
them through `target_parameters` (peft/tuners/lora/layer.py `ParamWrapper`:
per-expert factors, delta_e = B_e A_e * alpha / r, as here), without dropout
there since it adds the delta to the weight; here dropout acts on the
adapter's input inside the expert paths, as for every other adapter (the
dense and ragged paths draw their masks over different shapes, so under
dropout they agree in distribution, not bit for bit).

Adapters are `LoRAParam` variables, not `nnx.Param`s: `nnx.state(model,
LoRAParam)` is exactly the trainable set of a LoRA run and `nnx.state(model,
nnx.Param)` the frozen base weights, so differentiating with respect to
LoRAParam gives the base no gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from optconsist_jax import typed_config
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model.layers import dense
from optconsist_jax.model.layers import Linear

# target -> the Llama's (block attribute, projection attribute); "head" is the
# model's own LM head (no block; an untied head only). DeepSeek-V3's sites of
# the same targets: `_deepseek_sites` (module doc).
TARGETS = {
    "q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"), "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj"),
    "head": ("", "lm_head"),
}
# Every linear layer of the blocks (Biderman et al. 2024); the head is opt-in.
DEFAULT_TARGETS = tuple(t for t in TARGETS if t != "head")


class LoRAParam(nnx.Variable):
  """A trainable LoRA adapter matrix (deliberately not an nnx.Param)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA hyper-parameters (Biderman et al. 2024: alpha = 2 * rank, 0.05).

  Attributes:
    rank: adapter rank r.
    alpha: scale numerator; the update is A B * alpha / rank.
    dropout: dropout rate on the adapter input (training only).
    targets: which projections get adapters, a subset of TARGETS (default
      DEFAULT_TARGETS; add "head" to adapt the LM head too).
  """
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.05
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    bad = sorted(set(self.targets) - set(TARGETS))
    if bad or not self.targets:
      raise ValueError(f"LoRAConfig.targets: {bad or 'empty'} invalid; "
                       f"choose from {list(TARGETS)}")
    if self.rank < 1:
      raise ValueError(f"LoRAConfig.rank={self.rank} must be >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRAConfig.dropout={self.dropout} not in [0, 1)")

  @classmethod
  def from_dict(cls, d: Any) -> LoRAConfig:
    return typed_config.from_dict(cls, d, "lora config")


class LoRALinear(nnx.Module):
  """A frozen `Linear` kernel plus a trainable low-rank update.

  Holds the base module's own kernel Param (same path `.../kernel`), so
  checkpoints of the base weights keep their names.
  """

  def __init__(self, base: Linear, config: LoRAConfig, *, rngs: nnx.Rngs):
    self.kernel = base.kernel
    self.dtype = base.dtype
    names = self.kernel.get_metadata().get("out_sharding") or (
        (None,) * self.kernel[...].ndim)
    *stack, fan_in, fan_out = self.kernel[...].shape
    *stack_names, in_name, out_name = names
    stack, stack_names = tuple(stack), tuple(stack_names)
    adapter_dtype = self.kernel[...].dtype
    bound = 1.0 / fan_in**0.5
    self.lora_a = LoRAParam(
        jax.random.uniform(rngs.params(), (*stack, fan_in, config.rank),
                           adapter_dtype, -bound, bound),
        out_sharding=(*stack_names, in_name, None), eager_sharding=False)
    self.lora_b = LoRAParam(
        jnp.zeros((*stack, config.rank, fan_out), adapter_dtype),
        out_sharding=(*stack_names, None, out_name), eager_sharding=False)
    self.scale = config.alpha / config.rank
    self.dropout = config.dropout

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    y = dense(x, self.kernel[...].astype(self.dtype))
    h = x
    if rng is not None and self.dropout > 0.0:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(self.dtype)
    low = dense(h, self.lora_a[...].astype(self.dtype))
    delta = dense(low, self.lora_b[...].astype(self.dtype))
    return y + (self.scale * delta).astype(y.dtype)


class ExpertLoRA(nnx.Module):
  """Per-expert low-rank updates of a stacked expert weight.

  For routed experts stored [*stack, E, in, out] (model/moe.py
  `MoE`): lora_a [*stack, E, in, r] and lora_b [*stack, E, r, out], expert
  e's update scale * A_e B_e. The MoE layer adds `__call__`'s output to each
  expert projection, in either of its layouts.
  """

  def __init__(self, kernel: nnx.Param, config: LoRAConfig, *,
               rngs: nnx.Rngs):
    w = kernel[...]
    names = kernel.get_metadata().get("out_sharding") or (None,) * w.ndim
    *stack, experts, fan_in, fan_out = w.shape
    *stack_names, expert_name, in_name, out_name = names
    bound = 1.0 / fan_in**0.5
    self.lora_a = LoRAParam(
        jax.random.uniform(rngs.params(),
                           (*stack, experts, fan_in, config.rank), w.dtype,
                           -bound, bound),
        out_sharding=(*stack_names, expert_name, in_name, None),
        eager_sharding=False)
    self.lora_b = LoRAParam(
        jnp.zeros((*stack, experts, config.rank, fan_out), w.dtype),
        out_sharding=(*stack_names, expert_name, None, out_name),
        eager_sharding=False)
    self.scale = config.alpha / config.rank
    self.dropout = config.dropout

  def __call__(self, x: jax.Array, sizes_E: jax.Array | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    """scale * dropout(x) A_e B_e for the expert e each row belongs to.

    Args:
      x: [M, in] rows every expert sees (-> [E, M, out]); [E, M, in] rows per
        expert (-> [E, M, out]); or, with `sizes_E`, [A, in] rows sorted by
        expert, sizes_E[e] of them expert e's (-> [A, out], ragged_dot).
      sizes_E: int32 [E] group sizes of the sorted layout, else None.
      rng: dropout key (training), or None.
    """
    dt = x.dtype
    if rng is not None and self.dropout > 0.0:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(dt)
    a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
    if sizes_E is not None:
      low = jax.lax.ragged_dot(x, a, sizes_E)
      delta = jax.lax.ragged_dot(low, b, sizes_E)
    else:
      low = jnp.einsum("mi,eir->emr" if x.ndim == 2 else "emi,eir->emr", x, a)
      delta = jnp.einsum("emr,ero->emo", low, b)
    return (self.scale * delta).astype(dt)


# DeepSeek-V3 attention targets -> MLA's projections (module doc); a None
# projection (q_proj with a q-lora rank, q_a/q_b without) is skipped.
_MLA = {"q": ("q_proj", "q_a_proj", "q_b_proj"),
        "k": ("kv_a_proj_with_mqa", "kv_b_proj"),
        "v": ("kv_a_proj_with_mqa", "kv_b_proj"), "o": ("o_proj",)}


def expert_adapter_name(proj: str) -> str:
  """The MoE attribute holding the adapter of expert weight `proj`."""
  return f"{proj}_lora"


def _deepseek_sites(model: deepseek_v3.DeepseekV3, target: str
                    ) -> list[tuple[nnx.Module, str]]:
  if target == "head":
    return [(model, "lm_head")]
  sites = []
  for stack in (model.dense_layers, model.moe_layers):
    if stack is None:
      continue
    if target in _MLA:
      sites += [(stack.attn, a) for a in _MLA[target]
                if getattr(stack.attn, a) is not None]
    elif stack.moe:  # the shared experts' Linear, the routed experts' stack
      sites += [(stack.mlp.shared, f"{target}_proj"),
                (stack.mlp, f"{target}_proj")]
    else:
      sites.append((stack.mlp, f"{target}_proj"))
  return sites


def _sites(model: nnx.Module, target: str) -> list[tuple[nnx.Module, str]]:
  """(parent module, attribute) of every weight `target` names."""
  if isinstance(model, deepseek_v3.DeepseekV3):
    return _deepseek_sites(model, target)
  block, proj = TARGETS[target]
  return [(getattr(model.layers, block) if block else model, proj)]


def apply_lora(model: nnx.Module, lora_config: LoRAConfig | Any,
               rngs: nnx.Rngs) -> nnx.Module:
  """Adds adapters (in place) to the weights the targets name (module doc).

  A Linear becomes a LoRALinear; a routed-expert stack gets an ExpertLoRA
  beside it (the MoE layer's `<proj>_lora` attribute). Returns the same
  model object for chaining.
  """
  c = LoRAConfig.from_dict(lora_config)
  if (isinstance(model, deepseek_v3.DeepseekV3)
      and ("k" in c.targets) != ("v" in c.targets)):
    raise ValueError(
        f"LoRAConfig.targets={list(c.targets)}: DeepSeek-V3's keys and values"
        " come out of the same kv_a_proj_with_mqa and kv_b_proj; target both"
        " 'k' and 'v' or neither")
  seen = set()
  for target in c.targets:
    for parent, attr in _sites(model, target):
      if (id(parent), attr) in seen:  # k and v share MLA's projections
        continue
      seen.add((id(parent), attr))
      base = getattr(parent, attr)
      where = f"{type(parent).__name__}.{attr}"
      if base is None:
        raise ValueError(f"apply_lora: target {target!r}: the model has no"
                         f" {attr} (tied embeddings)")
      if isinstance(base, nnx.Param):  # routed experts [*stack, E, in, out]
        name = expert_adapter_name(attr)
        if getattr(parent, name) is not None:
          raise ValueError(f"apply_lora: {where} already has an adapter")
        setattr(parent, name, ExpertLoRA(base, c, rngs=rngs))
        continue
      if isinstance(base, LoRALinear):
        raise ValueError(f"apply_lora: {where} already has an adapter")
      setattr(parent, attr, LoRALinear(base, c, rngs=rngs))
  return model


def _merged_kernel(kernel: nnx.Param, lora_a: jax.Array, lora_b: jax.Array,
                   scale: float) -> jax.Array:
  """W + scale * A B over any leading (layer, expert) axes, in float32."""
  w = kernel[...]
  delta = jnp.einsum("...ir,...ro->...io", lora_a.astype(jnp.float32),
                     lora_b.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge(model: nnx.Module) -> nnx.Module:
  """The plain model with W + A B * alpha / r folded in (input unchanged).

  For evaluation and export (hf.save); its nnx.Param tree has the base
  model's paths, shapes and dtypes, and it has no LoRAParam left.
  """
  merged = nnx.clone(model)
  c = merged.config
  for target in TARGETS:
    for parent, attr in _sites(merged, target):
      base = getattr(parent, attr, None)
      if isinstance(base, nnx.Param):  # routed experts
        adapter = getattr(parent, expert_adapter_name(attr))
        if adapter is not None:
          base[...] = _merged_kernel(base, adapter.lora_a[...],
                                     adapter.lora_b[...], adapter.scale)
          setattr(parent, expert_adapter_name(attr), None)
        continue
      if not isinstance(base, LoRALinear):
        continue
      new_w = _merged_kernel(base.kernel, base.lora_a[...], base.lora_b[...],
                             base.scale)
      *stack, fan_in, fan_out = new_w.shape
      names = base.kernel.get_metadata().get("out_sharding")
      stack_names = tuple(names[:-2]) if names else ()
      # Built abstractly (no random init), then given the merged kernel.
      linear = nnx.eval_shape(lambda: Linear(  # pylint: disable=cell-var-from-loop
          fan_in, fan_out, tuple(names[-2:]) if names else (None, None),
          stack=tuple(stack), stack_names=stack_names, config=c,
          rngs=nnx.Rngs(0)))
      linear.kernel = base.kernel.replace(new_w)
      setattr(parent, attr, linear)
  return merged
