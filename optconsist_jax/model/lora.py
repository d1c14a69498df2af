"""LoRA adapters on the Llama projections, and merging them back.

  y = x W + dropout(x) A B * alpha / rank          (Hu et al. 2021)

with A [in, r] initialised uniform(+-1/sqrt(in)) (PEFT's Kaiming-uniform with
a = sqrt(5)) and B [r, out] zeros, so an adapted model starts equal to its
base. Adapters are stacked on the same leading `layers` axis as the base
kernels ([L, in, r] and [L, r, out]) and carry logical axis names (the rank
axis is unnamed, i.e. replicated).

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
from optconsist_jax.model.llama import dense
from optconsist_jax.model.llama import Linear
from optconsist_jax.model.llama import Llama

# target -> (block attribute, projection attribute); "head" is the model's
# own LM head (no block; an untied head only).
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


def apply_lora(model: Llama, lora_config: LoRAConfig | Any,
               rngs: nnx.Rngs) -> Llama:
  """Replaces the targeted projections of `model` (in place) with LoRALinear.

  Returns the same model object for chaining.
  """
  c = LoRAConfig.from_dict(lora_config)
  for target in c.targets:
    block, proj = TARGETS[target]
    parent = _parent(model, block)
    base = getattr(parent, proj)
    if base is None:
      raise ValueError(f"apply_lora: target {target!r}: the model has no"
                       f" {proj} (tied embeddings)")
    if isinstance(base, LoRALinear):
      raise ValueError(f"apply_lora: {block or 'model'}/{proj} already has"
                       " an adapter")
    setattr(parent, proj, LoRALinear(base, c, rngs=rngs))
  return model


def _parent(model: Llama, block: str) -> nnx.Module:
  return getattr(model.layers, block) if block else model


def merge(model: Llama) -> Llama:
  """A plain Llama with W + A B * alpha / r folded in (the input is unchanged).

  For evaluation and export (hf.save); its nnx.Param tree has the base
  model's paths, shapes and dtypes.
  """
  merged = nnx.clone(model)
  c = merged.config
  for block, proj in TARGETS.values():
    parent = _parent(merged, block)
    lora = getattr(parent, proj)
    if not isinstance(lora, LoRALinear):
      continue
    w = lora.kernel[...]
    delta = jnp.einsum("...ir,...ro->...io",
                       lora.lora_a[...].astype(jnp.float32),
                       lora.lora_b[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    new_w = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
    *stack, fan_in, fan_out = w.shape
    names = lora.kernel.get_metadata().get("out_sharding")
    stack_names = tuple(names[:-2]) if names else ()
    # Built abstractly (no random init), then given the merged kernel.
    linear = nnx.eval_shape(lambda: Linear(  # pylint: disable=cell-var-from-loop
        fan_in, fan_out, tuple(names[-2:]) if names else (None, None),
        stack=tuple(stack), stack_names=stack_names, config=c,
        rngs=nnx.Rngs(0)))
    linear.kernel = lora.kernel.replace(new_w)
    setattr(parent, proj, linear)
  return merged
