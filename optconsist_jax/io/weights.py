"""Weight sources: a Hugging Face folder / Hub id, a nanoGPT `ckpt.pt`, an Orbax run.

The one place that turns "where the weights are" into a model:

  kind_of(path, kind)          hf, nanogpt or orbax ("auto" decides)
  model_config_of(path, kind)  the architecture stored with the source
  run_config_of(path)          an Orbax run's training config (its optimizer)
  identity(model, lora)        the model-identity dict checkpoints record
                               (io.checkpoints.compare_models)
  load_params(source, ...)     a full model's params, created in a mesh's
                               shardings (the trainer's init_from)
  load_model(source, ...)      the same as a model (the eval job's base model)
Each takes a LlamaConfig or a DeepseekV3Config (a `deepseek_v3` Hugging Face
folder or a run trained from one); model/architecture.py picks the model.
  restore_run_model(path, ...) one checkpoint of a training run, LoRA
                               adapters merged (the eval job, memorization,
                               reproduce)

`InitFromConfig` is the `init_from` section of an experiment config (and the
eval job's base model): path, kind and, for an Orbax run, the step.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

from flax import nnx

from optconsist_jax import sharding
from optconsist_jax import storage
from optconsist_jax import typed_config
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import hf
from optconsist_jax.io import hf_deepseek
from optconsist_jax.io import hf_layout
from optconsist_jax.io import hub
from optconsist_jax.io import nanogpt
from optconsist_jax.model import architecture
from optconsist_jax.model import lora as lora_lib
from optconsist_jax.model import Llama
from optconsist_jax.model import LlamaConfig
from optconsist_jax.model.architecture import abstract_model
from optconsist_jax.model.architecture import ModelConfig
from optconsist_jax.model.llama import no_constraint

KINDS = ("auto", "hf", "orbax", "nanogpt")
# Where a finetuning run's optimizer state starts (InitFromConfig).
OPTIMIZER_STATES = ("fresh", "carried", "frozen_second_moment")
# Written by the trainer (optconsist_jax.train) beside a run's checkpoints.
RUN_CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
  """Where initial weights come from when the workdir has no checkpoint.

  Attributes:
    path: a Hugging Face Llama folder (config.json + *.safetensors) or Hub
      repo (`org/name[@revision]`, see optconsist_jax.io.hub), an
      Orbax run (its workdir, W/checkpoints, or one step directory), or a
      nanoGPT `ckpt.pt` (the paper's GPT-2-small bases; config.model must
      then be `nanogpt.read_config(path)`). Empty: random init.
    kind: hf, orbax, nanogpt, or auto (hf if path holds config.json with
      safetensors or is a Hub repo id, nanogpt for a .pt file, else orbax).
    step: for an Orbax run, the step to read (None: the newest complete one).
    optimizer_state: where the optimizer state starts. "fresh" (default):
      the optimizer's init. "carried": the base run's saved optimizer state
      (moments, momentum and counts; same optimizer family and routing),
      with the learning-rate schedules starting at this run's step 0.
      "frozen_second_moment": an AdamW whose second moment is the base's,
      held fixed (optimizer `adamw_frozen_nu`, optim/frozen_second_moment.py).
      Both need an Orbax run: a Hugging Face base carries no optimizer state,
      and the nanoGPT ckpt.pt's (a torch optimizer's) is not read.
  """

  path: str = ""
  kind: str = "auto"
  step: int | None = None
  optimizer_state: str = "fresh"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"config.init_from.kind={self.kind!r}; expected one of"
                       f" {KINDS}")
    if self.optimizer_state not in OPTIMIZER_STATES:
      raise ValueError(
          f"config.init_from.optimizer_state={self.optimizer_state!r};"
          f" expected one of {OPTIMIZER_STATES}")


def kind_of(path: str, kind: str = "auto") -> str:
  """hf, nanogpt or orbax for a weight source (kind "auto" decides)."""
  if kind != "auto":
    return kind
  if hub.is_hub_ref(path):
    return "hf"
  p = storage.path(path)
  if p.is_file() and p.suffix == ".pt":
    return "nanogpt"
  if (p / "config.json").exists() and list(p.glob("*.safetensors")):
    return "hf"
  return "orbax"


def model_config_of(path: str, kind: str = "auto") -> ModelConfig:
  """The architecture stored with a weight source.

  A Hugging Face folder's config.json, a nanoGPT ckpt.pt's model_args, or
  the config.json the trainer wrote beside an Orbax run (W, W/checkpoints or a
  step directory).
  """
  kind = kind_of(path, kind)
  if kind == "hf":
    folder = hub.model_dir(path, patterns=("config.json",))  # a Hub repo's
    config_file = storage.path(folder) / "config.json"
    hf_config = json.loads(config_file.read_text())
    family = (hf_deepseek if hf_config.get("model_type") ==
              hf_deepseek.MODEL_TYPE else hf_layout)
    return family.config_from_hf(hf_config, source=str(config_file))
  if kind == "nanogpt":
    return nanogpt.read_config(storage.local_copy(path))
  return architecture.config_from_dict(run_config_of(path)["model"])


def run_config_of(path: str) -> dict[str, Any]:
  """The resolved config (JSON form) the trainer wrote beside an Orbax run.

  Args:
    path: the run's workdir W, W/checkpoints or a step directory.
  """
  p = storage.path(path)
  for run_dir in (p, p.parent, p.parent.parent):
    if (run_dir / RUN_CONFIG_FILE).exists():
      return json.loads((run_dir / RUN_CONFIG_FILE).read_text())
  raise FileNotFoundError(f"config.init_from.path={path!r}: no config.json of"
                          " a training run found in it or its parents")


def identity(model_config: LlamaConfig | Mapping[str, Any],
             lora: Any | None = None) -> dict[str, Any]:
  """What a checkpoint's param tree depends on: the Llama config and LoRA.

  Args:
    model_config: a LlamaConfig or its JSON form.
    lora: a LoRAConfig, its JSON form, or None (a full model).
  """
  return {"llama": typed_config.to_jsonable(model_config),
          "lora": typed_config.to_jsonable(lora) if lora else None}


def _constraint(mesh, rules):
  return (sharding.LogicalConstraint(mesh, rules) if mesh is not None
          else no_constraint)


def describe(source: InitFromConfig) -> str:
  """"Hugging Face folder X", "nanoGPT checkpoint X", "Orbax checkpoint X"."""
  kind = kind_of(source.path, source.kind)
  if kind == "hf":
    what = "repo" if hub.is_hub_ref(source.path) else "folder"
    return f"Hugging Face {what} {source.path}"
  if kind == "nanogpt":
    return f"nanoGPT checkpoint {source.path}"
  return f"Orbax checkpoint {source.path}" + (
      f" step {source.step}" if source.step is not None else "")


def load_params(source: InitFromConfig, model_config: ModelConfig, *,
                mesh: Any = None, rules: Any = None) -> nnx.State:
  """A full model's params from a weight source, in the mesh's shardings.

  Args:
    source: path, kind (auto: kind_of) and, for Orbax, the step.
    model_config: the model to fill; its architecture must match the
      source's (a mismatch is refused, naming the keys). Its numerics
      (param_dtype, dtype, scan_layers, ...) decide how the params are made.
    mesh, rules: lay the params out on this mesh
      (sharding.state_shardings); None = one device.

  Returns:
    The nnx.State of the model's weights (architecture.weights: its Params,
    and a DeepSeek-V3's experts' selection bias).
  """
  kind = kind_of(source.path, source.kind)
  if kind not in KINDS[1:]:
    raise ValueError(f"config.init_from.kind={kind!r}; expected one of {KINDS}")
  m = model_config
  if kind == "hf":
    hf_config, model = hf.load(
        source.path, dtype=m.param_dtype, mesh=mesh, rules=rules,
        compute_dtype=m.dtype, scan_layers=m.scan_layers,
        remat_policy=m.remat_policy, attention_impl=m.attention_impl)
    ckpt_lib.compare_models(
        {"llama": typed_config.to_jsonable(m)},
        {"llama": typed_config.to_jsonable(hf_config)},
        f"config.init_from {source.path} (config.json)",
        hint="Set config.model to the folder's config.json values.")
    return nnx.state(model, architecture.weights(m))
  abstract = nnx.state(abstract_model(m, constrain=_constraint(mesh, rules)),
                       architecture.weights(m))
  shardings = (sharding.state_shardings(abstract, mesh, rules)
               if mesh is not None else None)
  if kind == "nanogpt":
    return nanogpt.load_params_into(storage.local_copy(source.path), abstract,
                                    shardings, model_config=m)
  # A full model's params; the writer's identity must match ours without LoRA.
  return ckpt_lib.restore_params(source.path, source.step, abstract,
                                 shardings, model=identity(m))


def load_model(source: InitFromConfig, model_config: ModelConfig, *,
               mesh: Any = None, rules: Any = None) -> Llama:
  """`load_params` as a model (e.g. the base model the eval job scores)."""
  graphdef, _ = nnx.split(
      abstract_model(model_config, constrain=_constraint(mesh, rules)))
  return nnx.merge(graphdef, load_params(source, model_config, mesh=mesh,
                                         rules=rules))


def restore_run_model(path: str | os.PathLike, model_config: ModelConfig, *,
                      step: int | None = None,
                      lora: Mapping[str, Any] | None = None, mesh: Any = None,
                      rules: Any = None,
                      model_identity: dict[str, Any] | None = None) -> Llama:
  """A Llama from one checkpoint of a run (params only), LoRA adapters merged.

  Args:
    path: W, W/checkpoints, or a step directory.
    model_config: the LlamaConfig the checkpoint was written for (numerics
      such as dtype or scan_layers may differ).
    step: the step to read (None: newest complete, or the step directory's).
    lora: the run's LoRA config dict, if it trained adapters; they are
      restored and folded into the base weights (model.lora.merge).
    mesh, rules: lay the params out on this mesh (sharding.state_shardings);
      None = one device.
    model_identity: the identity to insist on; default
      `identity(model_config, lora)`, what the trainer records.
  """
  transform = None
  if lora:
    def transform(model):
      return lora_lib.apply_lora(model, lora_lib.LoRAConfig.from_dict(lora),
                                 rngs=nnx.Rngs(1))
  graphdef, abstract_state = nnx.split(abstract_model(
      model_config, constrain=_constraint(mesh, rules), transform=transform))
  shardings = (sharding.state_shardings(abstract_state, mesh, rules)
               if mesh is not None else None)
  state = ckpt_lib.restore_params(
      path, step, abstract_state, shardings,
      model=model_identity or identity(model_config, lora))
  model = nnx.merge(graphdef, state)
  return lora_lib.merge(model) if lora else model
