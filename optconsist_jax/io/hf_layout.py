"""How a Hugging Face Llama checkpoint maps onto our model: config.json, tensor names.

Tensor names follow the Hugging Face Llama implementation (`modeling_llama.py`):
`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`,
`lm_head.weight`. Linear weights are stored [out, in] there and [in, out] here;
per-layer tensors are stacked on our leading layer axis. Hugging Face Llama
checkpoints already use the rotate-half rotary convention our model uses, so
q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from optconsist_jax.model import LlamaConfig

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
# Buffers some exporters store that are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Our per-layer parameter path -> (Hugging Face name inside
# `model.layers.{i}.`, stored transposed ([out, in]) in Hugging Face files).
LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "layers/attn/q_proj/kernel": ("self_attn.q_proj.weight", True),
    "layers/attn/k_proj/kernel": ("self_attn.k_proj.weight", True),
    "layers/attn/v_proj/kernel": ("self_attn.v_proj.weight", True),
    "layers/attn/o_proj/kernel": ("self_attn.o_proj.weight", True),
    "layers/mlp/gate_proj/kernel": ("mlp.gate_proj.weight", True),
    "layers/mlp/up_proj/kernel": ("mlp.up_proj.weight", True),
    "layers/mlp/down_proj/kernel": ("mlp.down_proj.weight", True),
    "layers/attn_norm/scale": ("input_layernorm.weight", False),
    "layers/mlp_norm/scale": ("post_attention_layernorm.weight", False),
}
# Our unstacked parameter path -> (Hugging Face name, transposed).
GLOBAL_TENSORS: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm/scale": ("model.norm.weight", False),
    "lm_head/kernel": ("lm_head.weight", True),
}

TORCH_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """Where one of our parameters lives in a Hugging Face checkpoint.

  Attributes:
    hf_names: one Hugging Face tensor name per layer for stacked params
      (`stacked`), else a single name.
    stacked: our param has a leading layer axis built from `hf_names`.
    transpose: the Hugging Face tensor is our (per-layer) tensor transposed.
  """

  hf_names: tuple[str, ...]
  stacked: bool
  transpose: bool


def tensor_sources(config: LlamaConfig) -> dict[str, TensorSource]:
  """Our parameter paths ('/'-joined) -> their Hugging Face tensors."""
  out = {}
  for path, (suffix, transpose) in LAYER_TENSORS.items():
    names = tuple(f"model.layers.{i}.{suffix}" for i in range(config.num_layers))
    out[path] = TensorSource(names, True, transpose)
  for path, (name, transpose) in GLOBAL_TENSORS.items():
    if path == "lm_head/kernel" and config.tie_embeddings:
      continue
    out[path] = TensorSource((name,), False, transpose)
  return out


# --------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict[str, Any], *,
                   source: str = "config.json") -> LlamaConfig:
  """Our config from a Hugging Face Llama `config.json` dict.

  Accepts both the transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
  (`rope_parameters`) spellings. Features our model does not implement (rope
  scaling, biases, another activation) are errors, not silent approximations.

  Args:
    hf: the parsed config.json.
    source: file name used in error messages.
  """
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  if model_type != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
    raise ValueError(
        f"{source}: not a Llama checkpoint (model_type={model_type!r},"
        f" architectures={archs!r}); expected model_type='llama' and"
        f" architectures ['{ARCHITECTURE}'].")

  def get(key, default=None, required=False):
    if required and key not in hf:
      raise ValueError(f"{source}: missing required key {key!r}.")
    return hf.get(key, default)

  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu'"
                     " is supported.")
  for key in ("attention_bias", "mlp_bias"):
    if get(key, False):
      raise ValueError(f"{source}: {key}=true is not supported.")

  rope = get("rope_parameters") or {}
  scaling = get("rope_scaling") or {}
  rope_type = (rope.get("rope_type") or scaling.get("rope_type")
               or scaling.get("type") or "default")
  if rope_type != "default":
    raise ValueError(f"{source}: rope type {rope_type!r} (rope_scaling /"
                     " rope_parameters) is not supported; only 'default'.")
  rope_theta = rope.get("rope_theta", get("rope_theta", 10000.0))

  heads = get("num_attention_heads", required=True)
  hidden = get("hidden_size", required=True)
  kw = dict(
      vocab_size=get("vocab_size", required=True),
      hidden_size=hidden,
      intermediate_size=get("intermediate_size", required=True),
      num_layers=get("num_hidden_layers", required=True),
      num_heads=heads,
      num_kv_heads=get("num_key_value_heads") or heads,
      head_dim=get("head_dim") or hidden // heads,
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope_theta),
      max_position_embeddings=get("max_position_embeddings", 2048),
      tie_embeddings=bool(get("tie_word_embeddings", False)),
      initializer_range=float(get("initializer_range", 0.02)),
  )
  for key in ("bos_token_id", "eos_token_id"):
    value = get(key)
    if isinstance(value, list):  # Some configs list several EOS ids.
      value = value[0] if value else None
    if value is not None:
      kw[key] = int(value)
  try:
    return LlamaConfig(**kw)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def config_to_hf(config: LlamaConfig,
                 torch_dtype: str | None = None) -> dict[str, Any]:
  """A Hugging Face `config.json` dict for our config.

  Args:
    config: our config.
    torch_dtype: the dtype the weights are saved in; default the config's
      param_dtype.
  """
  c = config
  dtype = torch_dtype or TORCH_DTYPE_NAMES[np.dtype(jnp.dtype(c.param_dtype))]
  return {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": c.max_position_embeddings,
      "initializer_range": c.initializer_range,
      "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta,
      "rope_scaling": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id,
      "use_cache": True,
      # transformers 4.x reads torch_dtype, 5.x reads dtype.
      "torch_dtype": dtype,
      "dtype": dtype,
  }
