"""Which model a config builds: the one dispatch on the config's type.

  LlamaConfig       -> model/llama.py        (the Llama family, GPT-2)
  DeepseekV3Config  -> model/deepseek_v3.py  (MLA + MoE; Moonlight)

Both modules have the same constructors (`make_model`, `abstract_model`) and
models with the same `forward` protocol, so the train state builder
(train/state.py) and the weight loaders (io/weights.py) call these and stay
one code path.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import types
from typing import Any

from flax import nnx

from optconsist_jax.model import config as model_config
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model import deepseek_v3_config
from optconsist_jax.model import moe
from optconsist_jax.model import llama
from optconsist_jax.model.config import LlamaConfig
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config

ModelConfig = LlamaConfig | DeepseekV3Config
# Fields only a DeepseekV3Config has: how its JSON form is told apart.
_DEEPSEEK_ONLY = frozenset(
    f.name for f in dataclasses.fields(DeepseekV3Config)) - frozenset(
        f.name for f in dataclasses.fields(LlamaConfig))


def module_of(config: ModelConfig) -> types.ModuleType:
  """model/llama.py or model/deepseek_v3.py, by the config's type."""
  if isinstance(config, DeepseekV3Config):
    return deepseek_v3
  if isinstance(config, LlamaConfig):
    return llama
  raise TypeError(f"config.model: {type(config).__name__} is neither a"
                  " LlamaConfig nor a DeepseekV3Config")


def make_model(config: ModelConfig, **kwargs) -> nnx.Module:
  """The model module's `make_model` (constrain, seed, transform)."""
  return module_of(config).make_model(config, **kwargs)


def abstract_model(config: ModelConfig, **kwargs) -> nnx.Module:
  """The model module's `abstract_model` (ShapeDtypeStructs, no memory)."""
  return module_of(config).abstract_model(config, **kwargs)


def weights(config: ModelConfig) -> Any:
  """nnx filter of the variables a base model's weights are.

  nnx.Param, and for DeepSeek-V3 the experts' selection bias (a RoutingBias:
  loaded with the weights, never trained).
  """
  if isinstance(config, DeepseekV3Config):
    return (nnx.Param, moe.RoutingBias)
  return nnx.Param


def preset(name: str) -> ModelConfig:
  """The named preset of either family (model/config.py's _PRESETS or
  deepseek_v3_config.PRESETS); unknown names list both."""
  if name in deepseek_v3_config.PRESETS:
    return deepseek_v3_config.PRESETS[name]
  if name in model_config.preset_names():
    return model_config.preset(name)
  raise ValueError(f"unknown model preset {name!r}; valid presets:"
                   f" {preset_names()}")


def preset_names() -> list[str]:
  return sorted(model_config.preset_names()
                + list(deepseek_v3_config.PRESETS))


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
  """A LlamaConfig, or a DeepseekV3Config when `d` has its own keys
  (kv_lora_rank, n_routed_experts, ...) or names one of its presets: what
  W/config.json's `model` holds."""
  if (_DEEPSEEK_ONLY & set(d)
      or d.get("preset") in deepseek_v3_config.PRESETS):
    return DeepseekV3Config.from_dict(dict(d))
  return LlamaConfig.from_dict(d)
