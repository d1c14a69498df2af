"""How a Hugging Face `deepseek_v3` checkpoint maps onto model/deepseek_v3.py.

config.json keys and tensor names follow transformers' configuration_ and
modeling_deepseek_v3.py (5.x) and the DeepSeek-V3 / Moonlight-16B-A3B Hub
checkpoints, which store one tensor per expert
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`; transformers
5.x fuses them into `experts.gate_up_proj` / `experts.down_proj` in memory
and writes them back per expert). Per layer: `self_attn.q_proj` or
`self_attn.{q_a_proj, q_a_layernorm, q_b_proj}`, `self_attn.kv_a_proj_with_mqa`,
`self_attn.kv_a_layernorm`, `self_attn.kv_b_proj`, `self_attn.o_proj`,
`{input,post_attention}_layernorm`; the first `first_k_dense_replace` layers
`mlp.{gate,up,down}_proj`, the others `mlp.gate.weight`,
`mlp.gate.e_score_correction_bias`, the experts and
`mlp.shared_experts.{gate,up,down}_proj`. Linear weights are [out, in] there
and [in, out] here; experts are stacked [layer, expert, ...] here. Layers past
num_hidden_layers (DeepSeek-V3's multi-token-prediction module) are not part
of the model and are skipped, as transformers skips them.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from optconsist_jax.io.hf_layout import TensorSource
from optconsist_jax.io.hf_layout import TORCH_DTYPE_NAMES
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
# Kept float32 on save whatever the dtype (transformers'
# _keep_in_fp32_modules_strict; DeepSeek-V3's files store the bias so).
FLOAT32_PATHS = ("moe_layers/mlp/router", "moe_layers/mlp/router_bias")

_ATTN = {
    "attn/q_proj/kernel": ("self_attn.q_proj.weight", True),
    "attn/q_a_proj/kernel": ("self_attn.q_a_proj.weight", True),
    "attn/q_a_layernorm/scale": ("self_attn.q_a_layernorm.weight", False),
    "attn/q_b_proj/kernel": ("self_attn.q_b_proj.weight", True),
    "attn/kv_a_proj_with_mqa/kernel": ("self_attn.kv_a_proj_with_mqa.weight",
                                       True),
    "attn/kv_a_layernorm/scale": ("self_attn.kv_a_layernorm.weight", False),
    "attn/kv_b_proj/kernel": ("self_attn.kv_b_proj.weight", True),
    "attn/o_proj/kernel": ("self_attn.o_proj.weight", True),
    "attn_norm/scale": ("input_layernorm.weight", False),
    "mlp_norm/scale": ("post_attention_layernorm.weight", False),
}
_DENSE_MLP = {
    "mlp/gate_proj/kernel": ("mlp.gate_proj.weight", True),
    "mlp/up_proj/kernel": ("mlp.up_proj.weight", True),
    "mlp/down_proj/kernel": ("mlp.down_proj.weight", True),
}
_MOE = {
    "mlp/router": ("mlp.gate.weight", True),
    "mlp/router_bias": ("mlp.gate.e_score_correction_bias", False),
    "mlp/shared/gate_proj/kernel": ("mlp.shared_experts.gate_proj.weight",
                                    True),
    "mlp/shared/up_proj/kernel": ("mlp.shared_experts.up_proj.weight", True),
    "mlp/shared/down_proj/kernel": ("mlp.shared_experts.down_proj.weight",
                                    True),
}
# Our [layer, expert, in, out] experts -> `mlp.experts.{e}.` + name.
_EXPERTS = {
    "mlp/gate_proj": "gate_proj.weight",
    "mlp/up_proj": "up_proj.weight",
    "mlp/down_proj": "down_proj.weight",
}
_GLOBAL = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm/scale": ("model.norm.weight", False),
    "lm_head/kernel": ("lm_head.weight", True),
}
# transformers' DeepseekV3Config defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
    topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1, rope_interleave=True,
    tie_word_embeddings=False, initializer_range=0.02)


def _attn_paths(config: DeepseekV3Config) -> dict[str, tuple[str, bool]]:
  drop = (("attn/q_a_proj/kernel", "attn/q_a_layernorm/scale",
           "attn/q_b_proj/kernel") if config.q_lora_rank is None
          else ("attn/q_proj/kernel",))
  return {k: v for k, v in _ATTN.items() if k not in drop}


def _stacks(config: DeepseekV3Config):
  """(our stack name, its HF layer ids, is MoE) for the non-empty stacks."""
  k, n = config.first_k_dense_replace, config.num_layers
  return [(name, layers, moe) for name, layers, moe in (
      ("dense_layers", range(0, k), False),
      ("moe_layers", range(k, n), True)) if layers]


def tensor_sources(config: DeepseekV3Config) -> dict[str, TensorSource]:
  """Our parameter paths ('/'-joined) -> their Hugging Face tensors."""
  out = {}
  for stack, layers, moe in _stacks(config):
    per_layer = {**_attn_paths(config), **(_MOE if moe else _DENSE_MLP)}
    for path, (suffix, transpose) in per_layer.items():
      out[f"{stack}/{path}"] = TensorSource(
          tuple(f"model.layers.{i}.{suffix}" for i in layers), True, transpose)
    if moe:
      for path, suffix in _EXPERTS.items():
        out[f"{stack}/{path}"] = TensorSource(tuple(
            tuple(f"model.layers.{i}.mlp.experts.{e}.{suffix}"
                  for e in range(config.n_routed_experts)) for i in layers),
            True, True)
  for path, (name, transpose) in _GLOBAL.items():
    if not (path == "lm_head/kernel" and config.tie_embeddings):
      out[path] = TensorSource((name,), False, transpose)
  return out


def save_order(config: DeepseekV3Config) -> list[tuple[str, tuple[int, ...]]]:
  """(our path, index into its stacked axes), in transformers' file order:
  embeddings, layer by layer, final norm, head."""
  out = [("embed", ())]
  for stack, layers, moe in _stacks(config):
    per_layer = [*_attn_paths(config), *(_MOE if moe else _DENSE_MLP)]
    for j in range(len(layers)):
      out += [(f"{stack}/{p}", (j,)) for p in per_layer]
      if moe:
        out += [(f"{stack}/{p}", (j, e)) for e in range(config.n_routed_experts)
                for p in _EXPERTS]
  out.append(("final_norm/scale", ()))
  if not config.tie_embeddings:
    out.append(("lm_head/kernel", ()))
  return out


def is_unused(config: DeepseekV3Config, name: str) -> bool:
  """Tensors a checkpoint may hold that the model does not use."""
  if name.endswith("rotary_emb.inv_freq"):
    return True
  if config.tie_embeddings and name == _GLOBAL["lm_head/kernel"][0]:
    return True
  parts = name.split(".")
  return (len(parts) > 2 and parts[:2] == ["model", "layers"]
          and parts[2].isdigit() and int(parts[2]) >= config.num_layers)


def _rope_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
  params = {**(hf.get("rope_scaling") or {}),
            **(hf.get("rope_parameters") or {})}
  rope_type = params.get("rope_type") or params.get("type") or "default"
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if rope_type == "default":
    return dict(rope_theta=theta)
  if rope_type != "yarn":
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported for"
                     " deepseek_v3; only 'default' and 'yarn'.")
  max_positions = hf.get("max_position_embeddings",
                         _DEFAULTS["max_position_embeddings"])
  original = int(params.get("original_max_position_embeddings",
                            max_positions))
  factor = params.get("factor")
  attention_factor = params.get("attention_factor")
  return dict(
      rope_theta=theta, rope_type="yarn",
      rope_factor=float(max_positions / original if factor is None
                        else factor),
      rope_original_max_position=original,
      rope_beta_fast=float(params.get("beta_fast") or 32),
      rope_beta_slow=float(params.get("beta_slow") or 1),
      rope_mscale=float(params.get("mscale") or 0.0),
      rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
      rope_attention_factor=(None if attention_factor is None
                             else float(attention_factor)),
      rope_truncate=bool(params.get("truncate", True)))


def config_from_hf(hf: dict[str, Any], *,
                   source: str = "config.json") -> DeepseekV3Config:
  """Our config from a `deepseek_v3` config.json (4.x or 5.x spelling).

  Variants our model does not compute (another activation, attention biases,
  grouped kv heads, softmax routing of DeepSeek-V2, MoE every n-th layer) are
  errors naming the key.
  """
  archs = hf.get("architectures") or []
  if hf.get("model_type") != MODEL_TYPE or (archs and ARCHITECTURE
                                            not in archs):
    raise ValueError(f"{source}: not a {MODEL_TYPE} checkpoint (model_type="
                     f"{hf.get('model_type')!r}, architectures={archs!r}).")

  def get(key):
    return hf[key] if hf.get(key) is not None else _DEFAULTS[key]

  for key in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"{source}: missing required key {key!r}.")
  checks = (("hidden_act", "silu"), ("attention_bias", False),
            ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
            ("moe_layer_freq", 1))
  for key, want in checks:
    if key in hf and hf[key] != want:
      raise ValueError(f"{source}: {key}={hf[key]!r} is not supported; only"
                       f" {want!r}.")
  heads = hf["num_attention_heads"]
  if hf.get("num_key_value_heads") not in (None, heads):
    raise ValueError(f"{source}: num_key_value_heads="
                     f"{hf['num_key_value_heads']} != num_attention_heads="
                     f"{heads}; MLA expands every head from the latent.")
  eos = get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  kw = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      q_lora_rank=hf.get("q_lora_rank", _DEFAULTS["q_lora_rank"]),
      **{k: get(k) for k in (
          "moe_intermediate_size", "first_k_dense_replace", "kv_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
          "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
          "n_group", "topk_group", "norm_topk_prob", "max_position_embeddings",
          "rope_interleave")},
      routed_scaling_factor=float(get("routed_scaling_factor")),
      rms_norm_eps=float(get("rms_norm_eps")),
      initializer_range=float(get("initializer_range")),
      tie_embeddings=bool(get("tie_word_embeddings")),
      bos_token_id=int(get("bos_token_id")), eos_token_id=int(eos),
      **_rope_fields(hf, source))
  try:
    return DeepseekV3Config(**kw)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def config_to_hf(config: DeepseekV3Config,
                 torch_dtype: str | None = None) -> dict[str, Any]:
  """A `deepseek_v3` config.json dict (rope as rope_theta + rope_scaling)."""
  c = config
  dtype = torch_dtype or TORCH_DTYPE_NAMES[np.dtype(jnp.dtype(c.param_dtype))]
  rope_scaling = None
  if c.rope_type == "yarn":
    rope_scaling = {
        "rope_type": "yarn", "factor": c.rope_factor,
        "original_max_position_embeddings": c.rope_original_max_position,
        "beta_fast": c.rope_beta_fast, "beta_slow": c.rope_beta_slow,
        "mscale": c.rope_mscale, "mscale_all_dim": c.rope_mscale_all_dim,
        "truncate": c.rope_truncate}
    if c.rope_attention_factor is not None:
      rope_scaling["attention_factor"] = c.rope_attention_factor
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "moe_intermediate_size": c.moe_intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_heads,
      "first_k_dense_replace": c.first_k_dense_replace,
      "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
      "qk_nope_head_dim": c.qk_nope_head_dim,
      "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
      "n_routed_experts": c.n_routed_experts,
      "num_experts_per_tok": c.num_experts_per_tok,
      "n_shared_experts": c.n_shared_experts, "n_group": c.n_group,
      "topk_group": c.topk_group, "norm_topk_prob": c.norm_topk_prob,
      "routed_scaling_factor": c.routed_scaling_factor,
      "scoring_func": "sigmoid", "topk_method": "noaux_tc",
      "hidden_act": "silu", "attention_bias": False,
      "attention_dropout": 0.0,
      "max_position_embeddings": c.max_position_embeddings,
      "initializer_range": c.initializer_range,
      "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
      "rope_scaling": rope_scaling, "rope_interleave": c.rope_interleave,
      "num_nextn_predict_layers": 0,
      "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
      "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
  }
