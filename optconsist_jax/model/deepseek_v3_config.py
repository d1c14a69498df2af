"""DeepSeek-V3 architecture configuration (MLA + mixture of experts).

The shapes of DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437) and of the
models built on it, Moonlight-16B-A3B (Liu et al. 2025, arXiv 2502.16982, a
Muon-pretrained base) among them; field names follow transformers'
`DeepseekV3Config` (configuration_deepseek_v3.py) where they exist, and
`LlamaConfig`'s for what the two models share, so the shared building blocks
(model/layers.py, model/rope.py) read either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from optconsist_jax import typed_config
from optconsist_jax.model.config import REMAT_POLICIES

ROPE_TYPES = ("default", "yarn")
MOE_IMPLS = ("dense", "ragged")
ATTENTION_IMPLS = ("xla",)


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
  """Shapes and numerics of a DeepSeek-V3 decoder.

  The defaults are Moonlight-16B-A3B's (its config.json on the Hub,
  moonshotai/Moonlight-16B-A3B; tests/test_deepseek_v3.py reads it).

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads: as LlamaConfig.
    intermediate_size: SwiGLU width of the dense layers.
    moe_intermediate_size: SwiGLU width of one expert (shared experts:
      n_shared_experts times this, as one MLP).
    first_k_dense_replace: the first k layers have a dense MLP, the rest MoE.
    q_lora_rank: queries through a rank-r bottleneck (q_a_proj, RMSNorm,
      q_b_proj); None: one q_proj (Moonlight, DeepSeek-V2-Lite).
    kv_lora_rank: width of the compressed key/value latent (the KV cache).
    qk_nope_head_dim: per-head query/key width without rotary embedding.
    qk_rope_head_dim: per-head query width with rotary embedding; keys' rope
      part is one vector shared by all heads (decoupled RoPE).
    v_head_dim: per-head value width.
    n_routed_experts, num_experts_per_tok: experts and the top-k per token.
    n_shared_experts: experts every token goes through.
    n_group, topk_group: experts are split in n_group groups; a token picks
      among the experts of its topk_group best groups (a group scores the
      sum of its 2 best experts).
    norm_topk_prob: the top-k weights are normalised to sum to 1.
    routed_scaling_factor: multiplies the routed experts' weights.
    moe_impl: dense (every expert on every token, weighted by the routing
      weights, zero for unchosen experts: the reference) or ragged (tokens
      sorted by expert, `jax.lax.ragged_dot` per expert group).
    rope_interleave: rotary pairs are (x0, x1), (x2, x3), ... (DeepSeek's
      checkpoints) rather than the two halves.
    rope_type: default or yarn (rope_factor, rope_original_max_position,
      rope_beta_fast, rope_beta_slow, rope_mscale, rope_mscale_all_dim,
      rope_attention_factor, rope_truncate as transformers'
      rope_parameters).
    rms_norm_eps, rope_theta, max_position_embeddings, tie_embeddings,
    param_dtype, dtype, scan_layers, remat_policy, initializer_range,
    bos_token_id, eos_token_id: as LlamaConfig.
    attention_impl: xla only (queries/keys and values differ in head dim).
  """

  vocab_size: int = 163840
  hidden_size: int = 2048
  intermediate_size: int = 11264
  moe_intermediate_size: int = 1408
  num_layers: int = 27
  num_heads: int = 16
  first_k_dense_replace: int = 1
  q_lora_rank: int | None = None
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int = 64
  num_experts_per_tok: int = 6
  n_shared_experts: int = 2
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.446
  moe_impl: str = "ragged"
  rms_norm_eps: float = 1e-5
  rope_theta: float = 50000.0
  rope_interleave: bool = True
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_original_max_position: int = 4096
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 0.0
  rope_mscale_all_dim: float = 0.0
  rope_attention_factor: float | None = None
  rope_truncate: bool = True
  max_position_embeddings: int = 8192
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"
  initializer_range: float = 0.02
  bos_token_id: int = 163584
  eos_token_id: int = 163585

  # What model/layers.py reads of a LlamaConfig beyond the shared fields.
  norm_type = "rms"
  # What the trainer's preflight reads (train/setup.py): rotary, no table.
  position_embedding = "rope"

  def __post_init__(self):
    def bad(key, why):
      raise ValueError(
          f"DeepseekV3Config.{key}={getattr(self, key)!r}: {why}")

    for key, valid in (("rope_type", ROPE_TYPES), ("moe_impl", MOE_IMPLS),
                       ("attention_impl", ATTENTION_IMPLS),
                       ("remat_policy", REMAT_POLICIES)):
      if getattr(self, key) not in valid:
        bad(key, f"expected one of {valid}")
    if not 0 <= self.first_k_dense_replace <= self.num_layers:
      bad("first_k_dense_replace", f"must be in [0, num_layers="
          f"{self.num_layers}]")
    if self.n_routed_experts % self.n_group:
      bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
    if not 1 <= self.topk_group <= self.n_group:
      bad("topk_group", f"must be in [1, n_group={self.n_group}]")
    per_group = self.n_routed_experts // self.n_group
    if self.n_group > 1 and per_group < 2:
      bad("n_group", "groups are scored by their 2 best experts; needs >= 2"
          " experts per group")
    if not 1 <= self.num_experts_per_tok <= per_group * self.topk_group:
      bad("num_experts_per_tok", "must be in [1, experts in the kept groups ="
          f" {per_group * self.topk_group}]")
    if self.qk_rope_head_dim % 2:
      bad("qk_rope_head_dim", "must be even")
    if self.rope_type == "yarn" and not (
        self.rope_factor > 0 and self.rope_original_max_position > 0):
      bad("rope_factor", "yarn needs rope_factor > 0 and"
          " rope_original_max_position > 0")
    for key in ("param_dtype", "dtype"):
      try:
        jnp.dtype(getattr(self, key))
      except TypeError as e:
        bad(key, str(e))

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense_replace

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DeepseekV3Config:
    """From a plain dict; a `preset` key starts from a preset (PRESETS)."""
    d = dict(d)
    base = d.pop("preset", None)
    typed_config.check_keys(cls, d, "DeepSeek-V3 model config",
                            extra=("preset",))
    if base:
      return dataclasses.replace(preset(base), **d)
    return cls(**d)

  def replace(self, **kw) -> DeepseekV3Config:
    return dataclasses.replace(self, **kw)

  def flops_per_token(self, seq_len: int) -> float:
    """Training flops per token (forward + backward = 3x forward), as
    LlamaConfig.flops_per_token counts them: 6 * the matmul params a token
    goes through (the router, num_experts_per_tok routed and the shared
    experts: activated, not total, parameters) plus 12 * L * T * N * (query
    key width + value width) / 2 for causal attention counted in full."""
    d, n = self.hidden_size, self.num_heads
    q = (d * n * self.qk_head_dim if self.q_lora_rank is None else
         self.q_lora_rank * (d + n * self.qk_head_dim))
    attn = (q + d * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
            + n * self.v_head_dim * d)
    experts = self.num_experts_per_tok + self.n_shared_experts
    moe = (d * self.n_routed_experts
           + experts * 3 * d * self.moe_intermediate_size)
    matmul = (self.num_layers * attn
              + self.first_k_dense_replace * 3 * d * self.intermediate_size
              + self.num_moe_layers * moe + d * self.vocab_size)
    scores = 6 * self.num_layers * seq_len * n * (self.qk_head_dim
                                                  + self.v_head_dim)
    return 6.0 * matmul + scores

  def num_params(self) -> int:
    """Analytic parameter count (routing bias included)."""
    d, n = self.hidden_size, self.num_heads
    q = (d * n * self.qk_head_dim if self.q_lora_rank is None else
         self.q_lora_rank * (d + 1 + n * self.qk_head_dim))
    attn = (q + d * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank
            + self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
            + n * self.v_head_dim * d)
    dense = 3 * d * self.intermediate_size
    f = self.moe_intermediate_size
    moe = ((self.n_routed_experts + self.n_shared_experts) * 3 * d * f
           + (d + 1) * self.n_routed_experts)
    block = attn + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return (self.vocab_size * d + head + d + self.num_layers * block
            + self.first_k_dense_replace * dense + self.num_moe_layers * moe)


# The published config.json of moonshotai/Moonlight-16B-A3B, field by field
# (the values also appear in NVIDIA Megatron-Bridge's Moonlight recipe,
# num_layers 27 / hidden 2048 / 16 heads / ffn 11264 / rms eps 1e-5 / rotary
# base 50000 / top-6 / scaling 2.446, and in Miles' Moonlight page: 1 dense +
# 26 MoE layers, 64 routed experts top-6 + 2 shared, kv-LoRA rank 512).
# Liu et al. 2025 (arXiv 2502.16982), table of compared models: 15.29B total
# and 2.24B activated parameters without the embedding and head ("16B" and
# "A3B" with them); tests/test_deepseek_v3.py checks both counts.
PRESETS: dict[str, DeepseekV3Config] = {
    "moonlight_16b_a3b": DeepseekV3Config(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_layers=27, num_heads=16,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.446, rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_interleave=True, rope_type="default",
        max_position_embeddings=8192, tie_embeddings=False,
        bos_token_id=163584, eos_token_id=163585),
    # A small MoE for tests and CPU plans: every feature of the above
    # (dense first layer, MLA without query LoRA, shared experts).
    "tiny_deepseek_v3": DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_layers=3, num_heads=4,
        first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
}


def preset(name: str) -> DeepseekV3Config:
  """The named preset; unknown names list the valid ones."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown DeepSeek-V3 preset {name!r}; valid presets:"
                     f" {sorted(PRESETS)}") from None
