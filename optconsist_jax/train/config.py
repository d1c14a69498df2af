"""The typed experiment config that an ml_collections config converts to.

Config files in configs/ are plain Python (`get_config(arg)` returning an
`ml_collections.ConfigDict`, big_vision style) so that `--config.x.y=...`
overrides work on the command line. The trainer converts the result once, at
the boundary, to `ExperimentConfig`; from there on each module receives the typed
slice it needs. An unknown key anywhere is an error naming it (`config.train.
foo`), raised before anything is compiled.

Sections (each converted by the module that owns its type):

  model       LlamaConfig (optconsist_jax.model), `preset` key allowed, or
              a DeepseekV3Config (its keys; model/architecture.py);
              preset "from_init" takes the architecture of init_from
  mesh        MeshConfig (optconsist_jax.sharding), `preset` key allowed
  optim       OptimConfig (optconsist_jax.optim); a schedule with
              `total_steps: 0` decays over the run's length, filled in by
              `ExperimentConfig.resolve_total_steps` once the data (and so the
              steps per epoch) is known
  lora        LoRA adapter settings (optconsist_jax.model.lora); absent or
              empty = full finetuning
  data        DataConfig (optconsist_jax.data)
  train       TrainConfig (below)
  checkpoint  CheckpointConfig (optconsist_jax.io.checkpoint_layout)
  init_from   InitFromConfig (optconsist_jax.io.weights)
  profile     ProfileConfig (below); absent = no trace
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import re
from typing import Any

from absl import logging

from optconsist_jax import optim as optim_lib
from optconsist_jax import typed_config
from optconsist_jax.io import weights
from optconsist_jax.io.checkpointer import CheckpointConfig
from optconsist_jax.io.weights import InitFromConfig
from optconsist_jax.model import architecture
from optconsist_jax.model import LlamaConfig
from optconsist_jax.model import lora as lora_lib
from optconsist_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: how long, how often to log, what to measure.

  Attributes:
    num_epochs: passes over the training set (the paper: 11); used when
      num_steps is 0.
    num_steps: optimizer steps to run (0: derive from num_epochs).
    grad_accum_steps: micro-batches per optimizer step.
    seed: model init seed.
    dropout_seed: seed of adapter dropout randomness (None: deterministic).
    log_every: write train metrics every this many steps.
    stats_every: residual-stream statistics every this many steps (0: never).
    progress_every_secs: how often progress (steps/s, ETA) is logged.
    stop_on_nonfinite: stop when loss or grad norm is NaN/Inf.
    parameter_overview: log a table of the params at start.
    compilation_cache_dir: JAX's persistent compilation cache, so a restart
      loads the compiled step instead of compiling it again
      (`platforms.enable_compilation_cache`): "auto" (default) =
      W/compilation_cache on TPU (in a gs:// workdir every host reads it and
      it outlives the VM), off on CPU and GPU unless JAX's own
      `--jax_compilation_cache_dir` is given; "" = off; any other value =
      that directory (local or gs://).
  """

  num_epochs: int = 1
  num_steps: int = 0
  grad_accum_steps: int = 1
  seed: int = 0
  dropout_seed: int | None = None
  log_every: int = 10
  stats_every: int = 100
  progress_every_secs: float = 30.0
  stop_on_nonfinite: bool = True
  parameter_overview: bool = True
  compilation_cache_dir: str = "auto"

  def __post_init__(self):
    if self.num_steps < 0 or self.num_epochs < 0:
      raise ValueError("config.train: num_steps and num_epochs must be >= 0")
    if not self.num_steps and not self.num_epochs:
      raise ValueError("config.train: set num_steps or num_epochs")
    if self.grad_accum_steps < 1:
      raise ValueError(
          f"config.train.grad_accum_steps={self.grad_accum_steps} must be >= 1")
    if self.log_every < 1:
      raise ValueError(f"config.train.log_every={self.log_every} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  """A `jax.profiler` trace of some steps, written to W/profile.

  Process 0 traces (its devices and host threads); TensorBoard's profile
  plugin or xprof opens W/profile (plugins/profile/<run>/<host>.xplane.pb).

  Attributes:
    steps: "START:END" traces steps START through END (inclusive, numbered as
      in the metrics: the first step is 1); "" (default) traces nothing.
  """

  steps: str = ""

  def __post_init__(self):
    self.window()  # Refuses a malformed window before anything runs.

  def window(self) -> tuple[int, int] | None:
    """(START, END), or None when no trace is asked for."""
    if not self.steps:
      return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.steps))
    if m is None or not 1 <= int(m[1]) <= int(m[2]):
      raise ValueError(
          f"config.profile.steps={self.steps!r}: expected START:END with"
          " 1 <= START <= END (the steps traced, inclusive; the first step"
          " is 1), e.g. '2:4'; '' traces nothing")
    return int(m[1]), int(m[2])


def typed_section(cls, d: Mapping[str, Any] | None, section: str):
  """cls(**d) with unknown keys reported as `config.<section>: ...`."""
  return typed_config.from_dict(cls, d, f"config.{section}")


def _owned(section: str, d: Mapping[str, Any] | None, from_dict):
  try:
    return from_dict(dict(d or {}))
  except (TypeError, ValueError) as e:
    msg = str(e)
    if not msg.startswith(f"config.{section}"):
      msg = f"config.{section}: {msg}"
    raise ValueError(msg) from e


SECTIONS = ("model", "mesh", "optim", "lora", "data", "train", "checkpoint",
            "init_from", "profile")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One training run, typed."""

  model: architecture.ModelConfig
  mesh: MeshConfig
  optim: Any
  lora: Any | None
  data: Any
  train: TrainConfig
  checkpoint: CheckpointConfig
  init_from: InitFromConfig
  profile: ProfileConfig = ProfileConfig()

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
    """From `ConfigDict.to_dict()`; every key must be known.

    Schedules with total_steps 0 (the run's length) stay 0; call
    `resolve_total_steps` before building the optimizer.
    """
    # deferred: grain (the data pipeline's config) loads only when parsing.
    from optconsist_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
    d = dict(d)
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
      raise ValueError(f"config: unknown sections {unknown}; valid sections:"
                       f" {list(SECTIONS)}")
    lora = None
    if d.get("lora"):
      lora = _owned("lora", d["lora"], _lora_from_dict(lora_lib))
    init_from = typed_section(InitFromConfig, d.get("init_from"), "init_from")
    return cls(
        model=_owned("model", d.get("model"),
                     lambda m: _model_config(m, init_from)),
        mesh=_owned("mesh", d.get("mesh"), MeshConfig.from_dict),
        optim=_owned("optim", d.get("optim"), _optim_from_dict),
        lora=lora,
        data=_owned("data", d.get("data"), data_lib.DataConfig.from_dict),
        train=typed_section(TrainConfig, d.get("train"), "train"),
        checkpoint=typed_section(CheckpointConfig, d.get("checkpoint"),
                                 "checkpoint"),
        init_from=init_from,
        profile=typed_section(ProfileConfig, d.get("profile"), "profile"),
    )

  def resolve_total_steps(self, total_steps: int) -> ExperimentConfig:
    """Fills schedules' `total_steps: 0` with the run's length."""
    return dataclasses.replace(
        self, optim=self.optim.resolve_total_steps(total_steps))

  def to_json(self) -> str:
    """The resolved config (presets expanded), for W/config.json."""
    return json.dumps(typed_config.to_jsonable(self), indent=2,
                      sort_keys=True)


def _optim_from_dict(d: Mapping[str, Any]):
  return optim_lib.OptimConfig.from_dict(d)


FROM_INIT = "from_init"
# LlamaConfig keys that change how a model runs, not its parameters.
NUMERICS_KEYS = ("param_dtype", "dtype", "scan_layers", "remat_policy",
                 "attention_impl")


def _model_config(d: Mapping[str, Any], init_from: InitFromConfig
                  ) -> architecture.ModelConfig:
  """LlamaConfig from config.model; preset "from_init" reads init_from's.

  With `preset: "from_init"` the architecture comes from the init_from source
  (so a Hugging Face folder, a nanoGPT ckpt.pt or an Orbax run can be
  finetuned with any config file without copying its shapes). The section's
  execution keys (NUMERICS_KEYS) still apply; its other keys, typically the
  config file's own architecture, are ignored with a warning naming them.
  """
  d = dict(d)
  if d.get("preset") != FROM_INIT:
    return architecture.config_from_dict(d)
  del d["preset"]
  if not init_from.path:
    raise ValueError("config.model.preset='from_init' needs"
                     " config.init_from.path")
  typed_config.check_keys(LlamaConfig, d, "model config")
  ignored = sorted(k for k in d if k not in NUMERICS_KEYS)
  if ignored:
    logging.warning("config.model.preset=from_init: the architecture comes"
                    " from %s; ignoring config.model keys %s",
                    init_from.path, ignored)
  return dataclasses.replace(
      weights.model_config_of(init_from.path, init_from.kind),
      **{k: v for k, v in d.items() if k in NUMERICS_KEYS})


def _lora_from_dict(lora_lib):
  cls = lora_lib.LoRAConfig
  if hasattr(cls, "from_dict"):
    return cls.from_dict
  return lambda d: typed_section(cls, d, "lora")
