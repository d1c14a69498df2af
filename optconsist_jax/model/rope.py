"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864).

Rotate-half convention, as Hugging Face's Llama, Qwen2/3 and OLMo-2
(`apply_rotary_pos_emb` in their modeling files): the head dim is split into
two halves rather than interleaved pairs.

`inverse_frequencies` gives theta^(-2i/H); with `LlamaConfig.rope_type ==
"llama3"` they are rescaled by frequency as Llama 3.1 does (Dubey et al. 2024,
arXiv 2407.21783; transformers' `_compute_llama3_parameters` in
modeling_rope_utils.py, whose float32 operations are mirrored here):
wavelengths 2*pi/f shorter than original_max_position / high_freq_factor are
kept, those longer than original_max_position / low_freq_factor are divided by
`factor`, and those between are interpolated with
s = (original_max_position / wavelength - low) / (high - low):
f' = (1 - s) f / factor + s f. No attention scaling (cos/sin unscaled).

`yarn_inverse_frequencies` and `yarn_mscale` are YaRN's (Peng et al. 2023,
arXiv 2309.00071) as DeepSeek-V2/V3 use it: transformers'
`_compute_yarn_parameters` and `yarn_get_mscale` (modeling_rope_utils.py),
float32 operations mirrored. Frequencies below the correction range are
divided by `factor`, those above it kept, and a linear ramp blends between.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optconsist_jax.model.config import LlamaConfig

Array = jax.Array


def inverse_frequencies(head_dim: int, config: LlamaConfig) -> Array:
  """[head_dim // 2] float32 rotary inverse frequencies of `config`."""
  h = head_dim
  inv_freq_H2 = 1.0 / (config.rope_theta
                       ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if config.rope_type == "default":
    return inv_freq_H2
  factor = config.rope_factor
  low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
  old_context = config.rope_original_max_position
  wavelen_H2 = 2 * math.pi / inv_freq_H2
  scaled_H2 = jnp.where(wavelen_H2 > old_context / low,
                        inv_freq_H2 / factor, inv_freq_H2)
  smooth_H2 = (old_context / wavelen_H2 - low) / (high - low)
  smoothed_H2 = (1 - smooth_H2) * scaled_H2 / factor + smooth_H2 * scaled_H2
  medium_H2 = ((wavelen_H2 >= old_context / high)
               & (wavelen_H2 <= old_context / low))
  return jnp.where(medium_H2, smoothed_H2, scaled_H2)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (eq. 21)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inverse_frequencies(head_dim: int, theta: float, factor: float,
                             original_max_position: int, *,
                             beta_fast: float = 32.0, beta_slow: float = 1.0,
                             truncate: bool = True) -> Array:
  """[head_dim // 2] float32 YaRN inverse frequencies."""
  h = head_dim

  def correction_dim(rotations):
    return (h * math.log(original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, h - 1)
  if low == high:
    high += 0.001  # as transformers: no zero-width ramp
  pos_freqs_H2 = theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  ramp_H2 = jnp.clip((jnp.arange(h // 2, dtype=jnp.float32) - low)
                     / (high - low), 0, 1)
  extrapolation_H2 = 1 - ramp_H2
  return ((1.0 / (factor * pos_freqs_H2)) * (1 - extrapolation_H2)
          + (1.0 / pos_freqs_H2) * extrapolation_H2)


def rope(x_BTNH: Array, positions_BT: Array, inv_freq_H2: Array) -> Array:
  """Rotary embedding of queries or keys at `positions_BT`."""
  freqs_BTH2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_H2
  emb_BTH = jnp.concatenate([freqs_BTH2, freqs_BTH2], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb_BTH), jnp.sin(emb_BTH)
  x32 = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BTNH.dtype)
