"""Llama in Flax NNX, its configuration presets and LoRA adapters."""

from optconsist_jax.model.config import LlamaConfig
from optconsist_jax.model.config import preset
from optconsist_jax.model.llama import KVCache
from optconsist_jax.model.llama import Llama
