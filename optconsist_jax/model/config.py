"""Llama architecture configuration and the named presets.

`LlamaConfig` is the typed boundary for model shapes and numerics; ml_collections
configs convert to it with `LlamaConfig.from_dict`. Presets follow the Llama-2
paper (Touvron et al. 2023, arXiv 2307.09288) and the Hugging Face
`config.json` of meta-llama/Llama-2-7b-hf; the Llama-3.1, OLMo-2, Qwen2.5 and
Qwen3 presets the config.json of the Hub repo named beside each. Those families
are switches of the one config (rope_type, qkv_bias, qk_norm, norm_placement).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from optconsist_jax import typed_config

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
POSITION_EMBEDDINGS = ("rope", "learned")
NORM_TYPES = ("rms", "layer")
ATTENTION_IMPLS = ("xla", "cudnn", "auto", "splash")
ROPE_TYPES = ("default", "llama3")
QK_NORMS = ("none", "head", "full")
NORM_PLACEMENTS = ("pre", "post")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a Llama decoder.

  Attributes:
    vocab_size: rows of the embedding table.
    hidden_size: model width D.
    intermediate_size: SwiGLU hidden width F.
    num_layers: decoder blocks L.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0; K < N is grouped-query).
    head_dim: per-head width H; defaults to hidden_size // num_heads.
    rms_norm_eps: epsilon inside RMSNorm.
    rope_theta: base of the rotary frequencies.
    max_position_embeddings: longest sequence the model is meant for.
    tie_embeddings: share the embedding table with the output head.
    param_dtype: dtype parameters are stored in.
    dtype: dtype activations and matmuls are computed in.
    scan_layers: run the blocks with `jax.lax.scan` (one compiled block)
      instead of a Python loop. Parameters are stacked on a leading layer axis
      either way, so checkpoints do not depend on this flag.
    remat_policy: what to keep for the backward pass: none (no remat), full
      (keep nothing), dots, dots_no_batch (jax.checkpoint_policies).
    attention_impl: xla (masked softmax in plain XLA ops, any backend; the
      fast path on CPU), cudnn (GPU, bf16/fp16) or auto (let
      `jax.nn.dot_product_attention` choose its fused kernel), or splash (the
      TPU Pallas splash kernel; training/scoring passes, decoding uses xla).
      See optconsist_jax.model.attention.
    initializer_range: std of the normal initializer (as in Hugging Face).
    position_embedding: rope (Llama) or learned absolute positions added to
      the token embeddings (GPT-2 / nanoGPT style bases).
    norm_type: rms (RMSNorm, Llama) or layer (LayerNorm without bias, as
      nanoGPT with bias=False).
    bos_token_id: beginning-of-sequence token.
    eos_token_id: end-of-sequence token.
    rope_type: default, or llama3 (Llama-3.1's frequency-dependent scaling of
      the rotary inverse frequencies, transformers'
      `_compute_llama3_parameters`; the four rope_* fields below).
    rope_factor: llama3: long wavelengths are divided by this.
    rope_low_freq_factor: llama3: wavelengths above
      original_max_position / low_freq_factor are scaled in full.
    rope_high_freq_factor: llama3: wavelengths below
      original_max_position / high_freq_factor are left alone; between the
      two the scaling is interpolated.
    rope_original_max_position: llama3: the pretraining context length.
    qkv_bias: q, k and v projections carry a bias, o does not (Qwen2 and
      Qwen2.5, Yang et al. 2024, arXiv 2407.10671).
    qk_norm: RMSNorm on queries and keys before the rotary embedding: none;
      head, over each head's head_dim with one [head_dim] scale shared by
      the heads (Qwen3, arXiv 2505.09388); full, over the whole projection,
      [num_heads*head_dim] for q and [num_kv_heads*head_dim] for k (OLMo-2,
      arXiv 2501.00656).
    norm_placement: pre (x + f(norm(x)), Llama) or post (x + norm(f(x)),
      OLMo-2's reordered norm; no norm at a sublayer's input).
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"
  initializer_range: float = 0.02
  position_embedding: str = "rope"
  norm_type: str = "rms"
  bos_token_id: int = 1
  eos_token_id: int = 2
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  qkv_bias: bool = False
  qk_norm: str = "none"
  norm_placement: str = "pre"

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by"
            f" num_heads={self.num_heads}; set head_dim explicitly."
        )
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig: num_heads={self.num_heads} is not a multiple of"
          f" num_kv_heads={self.num_kv_heads}."
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"LlamaConfig.remat_policy={self.remat_policy!r}; expected one of"
          f" {REMAT_POLICIES}."
      )
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"LlamaConfig.attention_impl={self.attention_impl!r}; expected one of"
          f" {ATTENTION_IMPLS}."
      )
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(
          f"LlamaConfig.position_embedding={self.position_embedding!r};"
          f" expected one of {POSITION_EMBEDDINGS}.")
    if self.norm_type not in NORM_TYPES:
      raise ValueError(
          f"LlamaConfig.norm_type={self.norm_type!r}; expected one of"
          f" {NORM_TYPES}.")
    for key, valid in (("rope_type", ROPE_TYPES), ("qk_norm", QK_NORMS),
                       ("norm_placement", NORM_PLACEMENTS)):
      if getattr(self, key) not in valid:
        raise ValueError(f"LlamaConfig.{key}={getattr(self, key)!r}; expected"
                         f" one of {valid}.")
    if self.rope_type == "llama3" and not (
        self.rope_factor > 0
        and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        and self.rope_original_max_position > 0):
      raise ValueError(
          "LlamaConfig: rope_type='llama3' needs rope_factor > 0, 0 <"
          " rope_low_freq_factor < rope_high_freq_factor and"
          " rope_original_max_position > 0; got"
          f" {self.rope_factor}, {self.rope_low_freq_factor},"
          f" {self.rope_high_freq_factor}, {self.rope_original_max_position}.")
    for key in ("param_dtype", "dtype"):
      try:
        jnp.dtype(getattr(self, key))
      except TypeError as e:
        raise ValueError(f"LlamaConfig.{key}={getattr(self, key)!r}: {e}") from e

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
    """Builds a config from a plain dict; a `preset` key starts from a preset."""
    d = dict(d)
    base = d.pop("preset", None)
    typed_config.check_keys(cls, d, "model config", extra=("preset",))
    if base:
      return dataclasses.replace(preset(base), **d)
    return cls(**d)

  def replace(self, **kw) -> LlamaConfig:
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Analytic parameter count (no LoRA adapters)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm == "head":
      attn += 2 * h
    elif self.qk_norm == "full":
      attn += h * (self.num_heads + self.num_kv_heads)
    block = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    pos = (self.max_position_embeddings * d
           if self.position_embedding == "learned" else 0)
    return self.vocab_size * d + pos + self.num_layers * block + d + head

  def flops_per_token(self, seq_len: int) -> float:
    """Training flops per token (forward + backward = 3x forward).

    6 * (matmul params) plus the attention score/value products
    (12 * L * T * N * H for causal attention counted in full, as in PaLM's
    MFU accounting).
    """
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    matmul = self.num_layers * (
        d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * d * f
    ) + d * self.vocab_size
    attn = 12 * self.num_layers * seq_len * self.num_heads * h
    return 6.0 * matmul + attn


_PRESETS: dict[str, LlamaConfig] = {
    "llama2_7b": LlamaConfig(),
    "llama2_13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40,
        num_heads=40, num_kv_heads=40),
    "llama2_70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8),
    # Bases whose pretraining optimizer is published (io/provenance.py),
    # shapes from their Hub config.json (tests/test_families.py inlines them).
    # meta-llama/Llama-3.1-8B.
    "llama3_1_8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192,
        bos_token_id=128000, eos_token_id=128001),
    # allenai/OLMo-2-1124-7B (no bos_token_id: EOS stands in; pad 100277).
    # Every field checked against huggingface.co/allenai/OLMo-2-1124-7B
    # config.json (model_type olmo2, transformers 4.47): 4096/11008/32
    # layers/32 heads = kv heads, vocab 100352, rms_norm_eps 1e-6, rope_theta
    # 500000, max_position_embeddings 4096, untied head.
    "olmo2_7b": LlamaConfig(
        vocab_size=100352, hidden_size=4096, intermediate_size=11008,
        num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6,
        rope_theta=500000.0, max_position_embeddings=4096, qk_norm="full",
        norm_placement="post", bos_token_id=100257, eos_token_id=100257),
    # Qwen/Qwen2.5-7B.
    "qwen2_5_7b": LlamaConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=131072, qkv_bias=True,
        bos_token_id=151643, eos_token_id=151643),
    # Qwen/Qwen3-8B-Base.
    "qwen3_8b": LlamaConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, qk_norm="head", bos_token_id=151643,
        eos_token_id=151643),
    # About 100M parameters: the benchmark size on CPU.
    "llama_100m": LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048,
        num_layers=8, num_heads=12, num_kv_heads=12,
        max_position_embeddings=1024),
    # Small models for tests and the CPU reproduction.
    "tiny_mha": LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=4, max_position_embeddings=128),
    "tiny_gqa": LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=3,
        num_heads=8, num_kv_heads=2, max_position_embeddings=128),
    "tiny_tied": LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, tie_embeddings=True,
        max_position_embeddings=128),
}


def preset(name: str) -> LlamaConfig:
  """Returns the named preset; unknown names list the valid ones."""
  try:
    return _PRESETS[name]
  except KeyError:
    raise ValueError(
        f"unknown model preset {name!r}; valid presets: {sorted(_PRESETS)}"
    ) from None


def preset_names() -> list[str]:
  return sorted(_PRESETS)
