"""configs/tiny_metamath.py as a typed config, with dotted-key overrides (tests)."""

import importlib.util
import pathlib

from optconsist_jax.train.config import ExperimentConfig

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / (
    "tiny_metamath.py")


def load(arg: str = "adamw", overrides: dict | None = None) -> ExperimentConfig:
  """get_config(arg) of the tiny config with `{"train.num_steps": 6, ...}` set."""
  spec = importlib.util.spec_from_file_location("tiny_metamath", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return ExperimentConfig.from_dict(c.to_dict())
