"""How a Hugging Face Llama-family checkpoint maps onto our model.

config.json and tensor names, for the `model_type`s our one model covers by
its config switches (model/config.py): llama (Llama-2, and Llama-3.x with
`rope_type: llama3` scaling), qwen2 (Qwen2/Qwen2.5: q/k/v biases), qwen3
(per-head q/k RMSNorm) and olmo2 (q/k RMSNorm over the whole projection, norms
after each sublayer).

Tensor names follow transformers' modeling files (`modeling_llama.py`,
`modeling_qwen2.py`, `modeling_qwen3.py`, `modeling_olmo2.py`):
`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`
(qwen2 also `.{q,k,v}_proj.bias`; qwen3/olmo2 also `.self_attn.{q,k}_norm.weight`),
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`, the block norms
(`{input,post_attention}_layernorm.weight`; olmo2:
`post_{attention,feedforward}_layernorm.weight`), `model.norm.weight`,
`lm_head.weight`. Linear weights are stored [out, in] there and [in, out] here;
per-layer tensors are stacked on our leading layer axis. These checkpoints use
the rotate-half rotary convention our model uses, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from optconsist_jax.model import LlamaConfig

# model_type -> the architecture transformers writes for it.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
# The config switches each model_type sets (model/config.py).
FAMILY_SWITCHES = {
    "llama": dict(qkv_bias=False, qk_norm="none", norm_placement="pre"),
    "qwen2": dict(qkv_bias=True, qk_norm="none", norm_placement="pre"),
    "qwen3": dict(qkv_bias=False, qk_norm="head", norm_placement="pre"),
    "olmo2": dict(qkv_bias=False, qk_norm="full", norm_placement="post"),
}
# config.json defaults where a key is absent: the transformers config classes'
# (configuration_{llama,qwen2,qwen3,olmo2}.py). qwen3's head_dim is 128
# whatever the width; the others derive it as hidden_size // heads.
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, head_dim=None),
    "qwen2": dict(rms_norm_eps=1e-6, head_dim=None),
    "qwen3": dict(rms_norm_eps=1e-6, head_dim=128),
    "olmo2": dict(rms_norm_eps=1e-5, head_dim=None),
}
# Buffers some exporters store that are recomputed from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Our per-layer parameter path -> (Hugging Face name inside
# `model.layers.{i}.`, stored transposed ([out, in]) in Hugging Face files):
# Llama's; `layer_tensors` adds and renames per model_type.
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
_QKV_BIAS_TENSORS: dict[str, tuple[str, bool]] = {
    "layers/attn/q_bias/bias": ("self_attn.q_proj.bias", False),
    "layers/attn/k_bias/bias": ("self_attn.k_proj.bias", False),
    "layers/attn/v_bias/bias": ("self_attn.v_proj.bias", False),
}
_QK_NORM_TENSORS: dict[str, tuple[str, bool]] = {
    "layers/attn/q_norm/scale": ("self_attn.q_norm.weight", False),
    "layers/attn/k_norm/scale": ("self_attn.k_norm.weight", False),
}
# OLMo-2 normalises each sublayer's output: our attn_norm / mlp_norm.
_POST_NORM_TENSORS: dict[str, tuple[str, bool]] = {
    "layers/attn_norm/scale": ("post_attention_layernorm.weight", False),
    "layers/mlp_norm/scale": ("post_feedforward_layernorm.weight", False),
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
      (`stacked`), else a single name. Params stacked on two axes (DeepSeek-V3's
      [layer, expert] experts, io/hf_deepseek.py) nest: one tuple per layer.
    stacked: our param has a leading layer axis built from `hf_names`.
    transpose: the Hugging Face tensor is our (per-layer) tensor transposed.
  """

  hf_names: tuple[str, ...]
  stacked: bool
  transpose: bool


def model_type(config: LlamaConfig) -> str:
  """The Hugging Face model_type whose architecture `config` is.

  Raises:
    ValueError: no supported model_type has this combination of switches,
      or the model is not a rotary RMSNorm decoder.
  """
  if config.position_embedding != "rope" or config.norm_type != "rms":
    raise ValueError(
        f"position_embedding={config.position_embedding!r},"
        f" norm_type={config.norm_type!r} is not a Hugging Face Llama-family"
        " model (needs 'rope' and 'rms').")
  switches = dict(qkv_bias=config.qkv_bias, qk_norm=config.qk_norm,
                  norm_placement=config.norm_placement)
  for name, family in FAMILY_SWITCHES.items():
    if family == switches:
      return name
  raise ValueError(
      f"no Hugging Face model_type has the switches {switches}; supported:"
      f" {FAMILY_SWITCHES}.")


def layer_tensors(config: LlamaConfig) -> dict[str, tuple[str, bool]]:
  """Our per-layer param path -> (HF name in `model.layers.{i}.`, transposed),
  in the order transformers lists them."""
  family = model_type(config)
  out = dict(LAYER_TENSORS)
  if family == "olmo2":
    del out["layers/attn_norm/scale"], out["layers/mlp_norm/scale"]
    out.update(_POST_NORM_TENSORS)
  if config.qkv_bias:
    out.update(_QKV_BIAS_TENSORS)
  if config.qk_norm != "none":
    out.update(_QK_NORM_TENSORS)
  return out


def tensor_sources(config: LlamaConfig) -> dict[str, TensorSource]:
  """Our parameter paths ('/'-joined) -> their Hugging Face tensors."""
  out = {}
  for path, (suffix, transpose) in layer_tensors(config).items():
    names = tuple(f"model.layers.{i}.{suffix}" for i in range(config.num_layers))
    out[path] = TensorSource(names, True, transpose)
  for path, (name, transpose) in GLOBAL_TENSORS.items():
    if path == "lm_head/kernel" and config.tie_embeddings:
      continue
    out[path] = TensorSource((name,), False, transpose)
  return out


# --------------------------------------------------------------------------
# config.json


def _rope_fields(get, source: str, max_positions: int) -> dict[str, Any]:
  """LlamaConfig rope fields from `rope_parameters` (transformers 5.x) or
  `rope_theta` + `rope_scaling` (4.x; Llama-3.1's config.json)."""
  params = {**(get("rope_scaling") or {}), **(get("rope_parameters") or {})}
  rope_type = params.get("rope_type") or params.get("type") or "default"
  out = dict(rope_theta=float(params.get("rope_theta",
                                         get("rope_theta", 10000.0))))
  if rope_type == "default":
    return out
  if rope_type != "llama3":
    raise ValueError(f"{source}: rope type {rope_type!r} (rope_scaling /"
                     " rope_parameters) is not supported; only 'default' and"
                     " 'llama3'.")
  for key in ("factor", "low_freq_factor", "high_freq_factor"):
    if key not in params:
      raise ValueError(f"{source}: rope type 'llama3' needs {key!r} in"
                       " rope_scaling / rope_parameters.")
  # As transformers' standardize_rope_params: a top-level value wins, else the
  # rope dict's, else max_position_embeddings.
  original = get("original_max_position_embeddings") or params.get(
      "original_max_position_embeddings", max_positions)
  return dict(out, rope_type="llama3", rope_factor=float(params["factor"]),
              rope_low_freq_factor=float(params["low_freq_factor"]),
              rope_high_freq_factor=float(params["high_freq_factor"]),
              rope_original_max_position=int(original))


def config_from_hf(hf: dict[str, Any], *,
                   source: str = "config.json") -> LlamaConfig:
  """Our config from a Hugging Face `config.json` dict of a supported family.

  Accepts both the transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
  (`rope_parameters`) spellings. Features our model does not implement
  (another rope scaling, an output-projection bias, sliding-window layers,
  another activation) are errors, not silent approximations.

  Args:
    hf: the parsed config.json.
    source: file name used in error messages.
  """
  archs = hf.get("architectures") or []
  family = hf.get("model_type")
  if family not in ARCHITECTURES or (archs and ARCHITECTURES[family]
                                     not in archs):
    raise ValueError(
        f"{source}: not a Llama-family checkpoint (model_type={family!r},"
        f" architectures={archs!r}); expected one of the model_types"
        f" {sorted(ARCHITECTURES)} with its architecture"
        f" {sorted(ARCHITECTURES.values())}.")

  def get(key, default=None, required=False):
    if required and key not in hf:
      raise ValueError(f"{source}: missing required key {key!r}.")
    return hf.get(key, default)

  if get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu'"
                     " is supported.")
  # qwen2 always has q/k/v biases and no attention_bias key; elsewhere
  # attention_bias also puts a bias on o_proj, which our model lacks.
  for key in ("attention_bias", "mlp_bias"):
    if get(key, False):
      raise ValueError(f"{source}: {key}=true is not supported for"
                       f" model_type={family!r}.")
  if get("use_sliding_window", False):
    raise ValueError(f"{source}: use_sliding_window=true (sliding-window"
                     " attention layers) is not supported.")

  defaults = _DEFAULTS[family]
  heads = get("num_attention_heads", required=True)
  hidden = get("hidden_size", required=True)
  max_positions = get("max_position_embeddings", 2048)
  kw = dict(
      vocab_size=get("vocab_size", required=True),
      hidden_size=hidden,
      intermediate_size=get("intermediate_size", required=True),
      num_layers=get("num_hidden_layers", required=True),
      num_heads=heads,
      num_kv_heads=get("num_key_value_heads") or heads,
      head_dim=(get("head_dim") or defaults["head_dim"] or hidden // heads),
      rms_norm_eps=float(get("rms_norm_eps", defaults["rms_norm_eps"])),
      max_position_embeddings=max_positions,
      tie_embeddings=bool(get("tie_word_embeddings", False)),
      initializer_range=float(get("initializer_range", 0.02)),
      **_rope_fields(get, source, max_positions),
      **FAMILY_SWITCHES[family],
  )
  for key in ("bos_token_id", "eos_token_id"):
    value = get(key)
    if isinstance(value, list):  # Some configs list several EOS ids.
      value = value[0] if value else None
    if value is not None:
      kw[key] = int(value)
  if "bos_token_id" not in kw and "eos_token_id" in kw:
    # No BOS token (OLMo-2's config.json): EOS stands in, as the tokenizer's
    # (data/hf_tokenizer.py).
    kw["bos_token_id"] = kw["eos_token_id"]
  try:
    return LlamaConfig(**kw)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def config_to_hf(config: LlamaConfig,
                 torch_dtype: str | None = None) -> dict[str, Any]:
  """A Hugging Face `config.json` dict for our config.

  The model_type follows the config's switches (`model_type`). Rope scaling
  is written as Llama-3.1's own config.json has it (`rope_theta` +
  `rope_scaling`), which transformers 4.x and 5.x both read.

  Args:
    config: our config.
    torch_dtype: the dtype the weights are saved in; default the config's
      param_dtype.
  """
  c = config
  family = model_type(c)
  dtype = torch_dtype or TORCH_DTYPE_NAMES[np.dtype(jnp.dtype(c.param_dtype))]
  rope_scaling = None
  if c.rope_type == "llama3":
    rope_scaling = {
        "rope_type": "llama3", "factor": c.rope_factor,
        "low_freq_factor": c.rope_low_freq_factor,
        "high_freq_factor": c.rope_high_freq_factor,
        "original_max_position_embeddings": c.rope_original_max_position}
  out = {
      "architectures": [ARCHITECTURES[family]],
      "model_type": family,
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
      "rope_scaling": rope_scaling,
      "attention_dropout": 0.0,
      "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id,
      "use_cache": True,
      # transformers 4.x reads torch_dtype, 5.x reads dtype.
      "torch_dtype": dtype,
      "dtype": dtype,
  }
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  elif family in ("qwen3", "olmo2"):
    out.update(attention_bias=False)
  if family in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=c.num_layers)
  return out
