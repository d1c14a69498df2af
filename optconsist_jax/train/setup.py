"""What a run does before its first step: checks, setup, initial state.

* The config boundary: `preflight` (checks that need no compile),
  `check_workdir` (a workdir holds one run: `run_identity`), `write_config`.
* `setup`: the mesh-bound model/optimizer pieces and the abstract sharded
  state (state.StateBuilder).
* `initial_state`: resume from W/checkpoints, else the weights of
  `config.init_from` (io.weights; with `init_from.optimizer_state` not
  "fresh", the base run's optimizer state too: base_optimizer_state.py),
  else random init; every array is created directly in its sharding.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from optconsist_jax import errors
from optconsist_jax import optim as optim_lib
from optconsist_jax import sharding
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import checkpointer
from optconsist_jax.io import hub
from optconsist_jax.io import weights
from optconsist_jax.train import base_optimizer_state
from optconsist_jax.train import state as state_lib
from optconsist_jax.train.config import ExperimentConfig

CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------
# Config boundary.


# Resolved-config keys that change how a run executes, not what it computes:
# they may differ between the segments of one run (a resume on another mesh,
# with other logging). Every other key is the run's identity.
RUNTIME_SECTIONS = frozenset({"mesh", "checkpoint", "profile"})
RUNTIME_KEYS = {
    "train": frozenset({"log_every", "stats_every", "progress_every_secs",
                        "stop_on_nonfinite", "parameter_overview",
                        "compilation_cache_dir"}),
    "data": frozenset({"num_workers", "worker_buffer_size", "read_threads",
                       "cache_dir", "num_epochs"}),
}


def run_identity(resolved: dict[str, Any],
                 ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
  """What makes a workdir one run: model, LoRA, optimizer, data, init, length.

  Args:
    resolved: a resolved config in its JSON form (W/config.json, or the
      `config` a checkpoint's meta records).
    ignore: more "section.key"s to leave out.
  """
  out = {}
  for section, value in resolved.items():
    if section in RUNTIME_SECTIONS:
      continue
    if isinstance(value, dict):
      skip = RUNTIME_KEYS.get(section, frozenset()) | {
          k.partition(".")[2] for k in ignore if k.startswith(section + ".")}
      value = {k: v for k, v in value.items() if k not in skip}
    out[section] = value
  return out


def check_workdir(resolved: dict[str, Any], workdir: epath.Path,
                  hint: str = "", ignore: frozenset[str] = frozenset()
                  ) -> None:
  """Refuses a workdir that holds another run, before anything is written.

  The run already there is the config recorded in its newest readable
  checkpoint, else its W/config.json (a run stopped before its first save).
  Any hyperparameter change is refused (a run has one set of settings, so
  every checkpoint's label is true); the runtime keys above may change.

  Args:
    resolved: the config asked for, resolved (`prepare`).
    workdir: the run's directory.
    hint: what the error tells the user to do (default: a training run's
      choices).
    ignore: "section.key"s not compared (`run_identity`).
  """
  found, where = None, None
  for info in reversed(ckpt_lib.list_checkpoints(workdir)):
    if info.complete:
      found = ckpt_lib.read_meta(info.path).get("config")
      where = f"checkpoint {info.path}"
      break
  config_file = workdir / CONFIG_FILE
  if found is None and config_file.exists():
    try:
      found = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
      raise errors.UserError(
          f"{config_file} is not readable JSON ({errors.short_cause(e)}):"
          " is this a training workdir? Use another --workdir") from None
    where = os.fspath(config_file)
  if found is None:
    return
  ckpt_lib.compare_models(
      run_identity(resolved, ignore), run_identity(found, ignore), where,
      what="run",
      hint=hint or f"A workdir holds one run: rerun with the settings it was"
      f" written with, or use a fresh --workdir (with"
      f" config.init_from.path={os.fspath(workdir)!r} to start from its"
      " weights). Nothing was written")


def _batch_shards(mesh, rules) -> int:
  spec = sharding.batch_sharding(mesh, rules).spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def preflight(config: ExperimentConfig, mesh) -> None:
  """Checks that need no compile: batch divisibility, init_from path, data."""
  b = config.data.global_batch_size
  shards = _batch_shards(mesh, config.mesh.rules)
  accum = config.train.grad_accum_steps
  if b % shards:
    raise ValueError(
        f"config.data.global_batch_size={b} is not divisible by the"
        f" data-parallel size {shards} (mesh {dict(mesh.shape)}, batch over"
        f" {sharding.batch_sharding(mesh, config.mesh.rules).spec[0]})")
  if b % (accum * shards):
    raise ValueError(
        f"config.data.global_batch_size={b} is not divisible by"
        f" config.train.grad_accum_steps={accum} x data-parallel size"
        f" {shards}: each micro-batch must split evenly over the batch shards")
  if b % jax.process_count():
    raise ValueError(f"config.data.global_batch_size={b} is not divisible by"
                     f" the {jax.process_count()} processes")
  if config.data.num_epochs is not None:
    raise ValueError("config.data.num_epochs is set; the trainer decides how"
                     " long to run: set config.train.num_epochs (or"
                     " config.train.num_steps) and leave data.num_epochs None")
  path = config.init_from.path
  if (path and not hub.is_hub_ref(path)
      and not epath.Path(path).exists()):
    raise FileNotFoundError(f"config.init_from.path={path!r} does not exist")
  base_optimizer_state.check(config)
  if config.data.seq_len > config.model.max_position_embeddings:
    if config.model.position_embedding == "learned":
      # A learned position table has no rows past its end (NaN lookups).
      raise ValueError(
          f"config.data.seq_len={config.data.seq_len} exceeds"
          f" config.model.max_position_embeddings="
          f"{config.model.max_position_embeddings} of a learned position"
          " table")
    logging.warning("data.seq_len=%d exceeds model.max_position_embeddings=%d",
                    config.data.seq_len, config.model.max_position_embeddings)


def prepare(config: ExperimentConfig, workdir: epath.Path, mesh, *,
            tokenizer: Any = None
            ) -> tuple[ExperimentConfig, Any, dict[str, Any], int]:
  """Everything checked before a run writes anything.

  Preflight, the data pipeline (its tokenizer must fit the model's
  vocabulary), the run length resolved into the optimizer schedules, and the
  workdir's identity (`check_workdir`).

  Returns:
    (config with total steps resolved, the data pipeline, the config's JSON
    form, total steps).
  """
  # deferred: grain (the data pipeline) loads only once a run is prepared.
  from optconsist_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
  preflight(config, mesh)
  pipe = data_lib.build_pipeline(config.data, tokenizer=tokenizer)
  if pipe.tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f"the tokenizer has {pipe.tokenizer.vocab_size} tokens but"
        f" config.model.vocab_size={config.model.vocab_size}")
  tc = config.train
  total_steps = tc.num_steps or tc.num_epochs * pipe.steps_per_epoch
  config = config.resolve_total_steps(total_steps)
  resolved = json.loads(config.to_json())
  check_workdir(resolved, workdir)
  return config, pipe, resolved, total_steps


def write_config(config: ExperimentConfig, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(config.to_json())


# ---------------------------------------------------------------------------
# Model, optimizer and the initial state.


@dataclasses.dataclass
class Setup:
  """The pieces the loop needs, built from the config."""

  mesh: Any
  rules: Any
  builder: state_lib.StateBuilder
  graphdef: Any
  tx: Any
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  param_groups: Any
  lr_fns: dict[str, Callable[[Any], Any]]
  schedule_offset: int = 0  # optim.build's (a carried optimizer state)


def setup(config: ExperimentConfig, mesh) -> Setup:
  """Mesh-bound model/optimizer pieces and the abstract sharded state."""
  rules = config.mesh.rules
  # Adapter init draws from its own stream, so the base init is unchanged.
  trainable, transform = state_lib.lora_pieces(config.lora,
                                               seed=config.train.seed + 1)
  builder = state_lib.StateBuilder(config.model, mesh, rules,
                                   trainable=trainable, transform=transform,
                                   seed=config.train.seed)
  offset = base_optimizer_state.schedule_offset(config)
  tx = optim_lib.build(config.optim, builder.abstract_params, mesh=mesh,
                       schedule_offset=offset)
  # {param path: group}; make_train_step reports update norm/RMS per group.
  param_groups = optim_lib.assign_groups(config.optim,
                                         builder.abstract_params)
  used = sorted(set(param_groups.values()))
  lr_fns = {g: optim_lib.make_schedule(config.optim.groups[g].schedule)
            for g in used}
  abstract_state, shardings = builder.abstract_state(tx)
  return Setup(mesh=mesh, rules=rules, builder=builder,
               graphdef=builder.graphdef, tx=tx,
               abstract_state=abstract_state, shardings=shardings,
               param_groups=param_groups, lr_fns=lr_fns,
               schedule_offset=offset)


def initial_state(config: ExperimentConfig, s: Setup,
                  ckpts: checkpointer.RunCheckpoints, data_iter):
  """Returns (state, epoch, how) following the init order of the docstring."""
  r = ckpts.restore_newest(
      abstract_params=state_lib.full_params(s.abstract_state),
      abstract_opt_state=s.abstract_state.opt_state, data_iter=data_iter,
      say=say)
  if r is not None:
    params, frozen = s.builder.split(r.params)
    step = jax.device_put(jnp.asarray(r.step, jnp.int32),
                          s.shardings.step)
    state = state_lib.TrainState(step=step, params=params, frozen=frozen,
                                 opt_state=r.opt_state)
    return state, r.epoch, f"resumed from {ckpts.directory / str(r.step)}"
  if config.init_from.path:
    base = weights.load_params(config.init_from, config.model, mesh=s.mesh,
                               rules=s.rules)
    how = f"initialized from {weights.describe(config.init_from)}"
    base_opt, adopt = None, None
    if config.init_from.optimizer_state != "fresh":
      base_opt, adopt = base_optimizer_state.load(config, s.builder, s.tx,
                                                  s.mesh)
      how += f" (optimizer state: {config.init_from.optimizer_state})"
    state = s.builder.init(s.tx, base, base_opt, adopt)
    return state, 0, how
  state = s.builder.init(s.tx)
  return state, 0, f"random init (seed {config.train.seed})"


def say(msg: str):
  """A line for the person running the job (stdout) and the log."""
  logging.warning("%s", msg)
  if jax.process_index() == 0:
    print(msg, flush=True)
