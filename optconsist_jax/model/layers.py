"""The parameterised building blocks of the model: Linear, Bias, RMSNorm.

Parameters carry logical axis names (Flax `out_sharding` metadata, eager
sharding off); a rules table outside the model (optconsist_jax.sharding)
decides their layout. Per-layer modules are built stacked ([*stack, ...]).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from optconsist_jax.model.config import LlamaConfig

Array = jax.Array


def param(value: Array, names: tuple[str, ...]) -> nnx.Param:
  """A parameter with logical axis names, placed later by the rules table."""
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
    self.kernel = param(
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

  def __init__(self, dim: int, *, names: tuple[str, ...] = ("norm",),
               stack: tuple[int, ...] = (),
               stack_names: tuple[str, ...] = (), config: LlamaConfig,
               eps: float | None = None):
    self.scale = param(
        jnp.ones((*stack, dim), jnp.dtype(config.param_dtype)),
        (*stack_names, *names))
    # `eps` overrides the config's (DeepSeek-V3's latent norms use 1e-6).
    self.eps = config.rms_norm_eps if eps is None else eps
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


class Bias(nnx.Module):
  """y = x + bias, bias stored [*stack, dim] in `param_dtype`.

  Kept apart from `Linear` (Qwen2's q/k/v biases), so adapters that replace a
  projection's kernel (LoRA) leave the bias as it is. Zeros at init; a loaded
  checkpoint sets it.
  """

  def __init__(self, dim: int, names: tuple[str, ...], *,
               stack: tuple[int, ...] = (), stack_names: tuple[str, ...] = (),
               config: LlamaConfig):
    self.bias = param(jnp.zeros((*stack, dim), jnp.dtype(config.param_dtype)),
                      (*stack_names, *names))
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x: Array) -> Array:
    return x + self.bias[...].astype(self.dtype)
