"""The tiny DeepSeek-V3 config the model and LoRA tests share (tests)."""

from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config


def config(**kw) -> DeepseekV3Config:
  """3 layers (1 dense), q and kv latents, 8 routed experts in 4 groups,
  top-3; `kw` overrides any field."""
  base = dict(vocab_size=32, hidden_size=32, intermediate_size=48,
              moe_intermediate_size=16, num_layers=3, num_heads=2,
              first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
              n_group=4, topk_group=2, max_position_embeddings=32,
              initializer_range=0.3)
  return DeepseekV3Config(**{**base, **kw})
