r"""The training loop: finetuning (or pretraining) a Llama from a config file.

  python -m optconsist_jax.train --config configs/tiny_metamath.py \
      --workdir /tmp/tiny [--config.train.num_steps=100 ...]

Reads top to bottom (big_vision style):

1. Config: the ml_collections config (with `--config.x.y=...` overrides) is
   converted once to a typed `ExperimentConfig` (config_types.py) and written,
   resolved, to W/config.json. Bad input (unknown keys, a global batch the
   data-parallel axes do not divide, a missing init_from path) fails here,
   before anything is compiled.
2. Mesh and model: the (data, fsdp, tensor) mesh from `config.mesh`; the model,
   optionally wrapped with LoRA adapters (`config.lora`); the optimizer from
   `config.optim` over the trainable params.
3. Initial state, first found wins:
     a. a checkpoint in W/checkpoints (resume: params, optimizer state, data
        iterator position, step; refused if written for another model);
     b. `config.init_from`: a Hugging Face folder or Hub repo id
        (optconsist_jax.io.hf.load, optconsist_jax.io.hub), a nanoGPT ckpt.pt or
        an Orbax run/checkpoint of a full model, possibly saved under another
        mesh (params only; fresh optimizer state);
     c. random init (`config.train.seed`).
   Every array is created directly in its sharding.
4. Loop over steps (`train.num_steps`, or `train.num_epochs` x steps per
   epoch): global batch from the grain pipeline -> jitted step (explicit
   shardings, donated state, gradient accumulation, remat per
   `model.remat_policy`) -> metrics of the *previous* step fetched (no device
   stall) and written every `log_every` steps; residual-stream statistics
   every `stats_every` steps; checkpoints every `checkpoint.every_steps`, at
   each epoch end and at the end (async).
5. Stops: normally (exit 0); on SIGTERM (preemption) after saving the
   current step (exit 75); on a NaN/Inf loss or gradient norm with a message
   naming the step and the last good checkpoint, nothing saved from the bad
   state (exit 3); at the first step after a save that did not commit, naming
   the step directory, the cause and the last good checkpoint (exit 74).
   Refused input exits 2 (optconsist_jax.errors). A workdir holds one run:
   its identity (`run_identity`) is checked against the newest checkpoint's
   recorded config before anything is written; a resume meeting an
   unreadable checkpoint sets it aside (`<step>.corrupt`) and resumes from
   the newest readable one.

Outputs in W: config.json, checkpoints/<step>/ (io/checkpoints.py documents the
layout), metrics/ (TensorBoard event files).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from optconsist_jax.io import checkpoints as ckpt_lib
from optconsist_jax import config_types
from optconsist_jax import errors
from optconsist_jax.io import hub
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import paths
from optconsist_jax import platforms
from optconsist_jax import sharding
from optconsist_jax import train_step as step_lib
from optconsist_jax.config_types import ExperimentConfig
from optconsist_jax.model import Llama
from optconsist_jax.model import LlamaConfig

CONFIG_FILE = "config.json"
# Config keys holding local paths (made absolute at the command line).
PATH_KEYS = ("data.path", "data.tokenizer_path", "data.cache_dir",
             "init_from.path")


class NonFiniteError(errors.CommandError, FloatingPointError):
  """The loss or gradient norm became NaN/Inf."""

  exit_code = errors.NONFINITE


@dataclasses.dataclass
class TrainResult:
  """What a run did (returned by `train`, for tests and drivers).

  Attributes:
    step: optimizer steps completed (== the final checkpoint's step).
    losses: step -> training loss of that step (1-based steps of this
      process's run; steps restored from a checkpoint are absent).
    stopped: "done" | "preempted".
    workdir: W.
    last_checkpoint: path of the newest complete checkpoint.
    perf: steady-state throughput over this run's steps after the first
      (which includes compilation): steps_timed, step_time_s, tokens_per_s
      (all B x T slots), target_tokens_per_s, mfu (None off a known device).
  """

  step: int
  losses: dict[int, float]
  stopped: str
  workdir: str
  last_checkpoint: str | None
  perf: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Config boundary.


def model_identity(config: ExperimentConfig) -> dict[str, Any]:
  """What a checkpoint's param tree depends on (checkpoints.compare_models)."""
  return {"llama": config_types.to_jsonable(config.model),
          "lora": config_types.to_jsonable(config.lora)}


# Resolved-config keys that change how a run executes, not what it computes:
# they may differ between the segments of one run (a resume on another mesh,
# with other logging). Every other key is the run's identity.
RUNTIME_SECTIONS = frozenset({"mesh", "checkpoint"})
RUNTIME_KEYS = {
    "train": frozenset({"log_every", "stats_every", "progress_every_secs",
                        "stop_on_nonfinite", "parameter_overview"}),
    "data": frozenset({"num_workers", "worker_buffer_size", "read_threads",
                       "cache_dir", "num_epochs"}),
}


def run_identity(resolved: dict[str, Any]) -> dict[str, Any]:
  """What makes a workdir one run: model, LoRA, optimizer, data, init, length.

  Args:
    resolved: a resolved config in its JSON form (W/config.json, or the
      `config` a checkpoint's meta records).
  """
  out = {}
  for section, value in resolved.items():
    if section in RUNTIME_SECTIONS:
      continue
    if isinstance(value, dict):
      skip = RUNTIME_KEYS.get(section, frozenset())
      value = {k: v for k, v in value.items() if k not in skip}
    out[section] = value
  return out


def check_workdir(resolved: dict[str, Any], workdir: epath.Path) -> None:
  """Refuses a workdir that holds another run, before anything is written.

  The run already there is the config recorded in its newest readable
  checkpoint, else its W/config.json (a run stopped before its first save).
  Any hyperparameter change is refused (a run has one set of settings, so
  every checkpoint's label is true); the runtime keys above may change.
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
      run_identity(resolved), run_identity(found), where, what="run",
      hint=f"A workdir holds one run: rerun with the settings it was"
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
  graphdef: Any
  tx: Any
  trainable: Any
  model_transform: Callable[[Llama], Any] | None
  abstract_state: step_lib.TrainState
  shardings: step_lib.TrainState
  param_groups: Any
  lr_fns: dict[str, Callable[[Any], Any]]


def _build_model(config: LlamaConfig, constrain, seed: int, transform,
                 base_params=None) -> nnx.Module:
  model = Llama(config, rngs=nnx.Rngs(seed), constrain=constrain)
  if base_params is not None:
    nnx.update(model, base_params)
  if transform is not None:
    out = transform(model)
    model = model if out is None else out
  return model


def setup(config: ExperimentConfig, mesh) -> Setup:
  """Mesh-bound model/optimizer pieces and the abstract sharded state."""
  from optconsist_jax import optim as optim_lib  # pylint: disable=g-import-not-at-top
  rules = config.mesh.rules
  # Adapter init draws from its own stream, so the base init is unchanged.
  trainable, transform = step_lib.lora_pieces(config.lora,
                                              seed=config.train.seed + 1)
  abstract_params = step_lib.abstract_params(
      config.model, mesh, rules, trainable=trainable,
      model_transform=transform, seed=config.train.seed)
  tx = optim_lib.build(config.optim, abstract_params, mesh=mesh)
  # {param path: group}; make_train_step reports update norm/RMS per group.
  param_groups = optim_lib.assign_groups(config.optim, abstract_params)
  used = sorted(set(param_groups.values()))
  lr_fns = {g: optim_lib.make_schedule(config.optim.groups[g].schedule)
            for g in used}
  graphdef, abstract_state, shardings = step_lib.create_train_state(
      config.model, tx, mesh, rules, trainable=trainable,
      model_transform=transform, seed=config.train.seed, abstract=True)
  return Setup(mesh=mesh, rules=rules, graphdef=graphdef, tx=tx,
               trainable=trainable, model_transform=transform,
               abstract_state=abstract_state, shardings=shardings,
               param_groups=param_groups, lr_fns=lr_fns)


def _base_params_from_init(config: ExperimentConfig, s: Setup):
  """Full-model params from config.init_from, in this mesh's shardings."""
  src = config.init_from
  path = epath.Path(src.path)
  kind = config_types.init_kind(src.path, src.kind)
  constrain = sharding.LogicalConstraint(s.mesh, s.rules)
  abstract_base = nnx.eval_shape(lambda: Llama(
      config.model, rngs=nnx.Rngs(0), constrain=constrain))
  abstract_params = nnx.state(abstract_base, nnx.Param)
  base_shardings = sharding.state_shardings(abstract_params, s.mesh, s.rules)
  if kind == "hf":
    from optconsist_jax.io import hf  # pylint: disable=g-import-not-at-top
    m = config.model
    hf_config, model = hf.load(
        src.path, dtype=m.param_dtype, mesh=s.mesh, rules=s.rules,
        compute_dtype=m.dtype, scan_layers=m.scan_layers,
        remat_policy=m.remat_policy, attention_impl=m.attention_impl)
    ckpt_lib.compare_models(
        {"llama": config_types.to_jsonable(config.model)},
        {"llama": config_types.to_jsonable(hf_config)},
        f"config.init_from {path} (config.json)",
        hint="Set config.model to the folder's config.json values.")
    return nnx.state(model, nnx.Param), (
        f"Hugging Face {'repo' if hub.is_hub_ref(src.path) else 'folder'}"
        f" {src.path}")
  if kind == "nanogpt":
    from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
    return nanogpt.load_params_into(
        os.fspath(path), abstract_params, base_shardings,
        model_config=config.model), f"nanoGPT checkpoint {path}"
  if kind != "orbax":
    raise ValueError(f"config.init_from.kind={kind!r}")
  # A full model's params; the writer's identity must match ours without LoRA.
  params = ckpt_lib.restore_params(
      path, src.step, abstract_params, base_shardings,
      model={"llama": config_types.to_jsonable(config.model), "lora": None})
  return params, f"Orbax checkpoint {path}" + (
      f" step {src.step}" if src.step is not None else "")


def initial_state(config: ExperimentConfig, s: Setup,
                  ckpts: ckpt_lib.RunCheckpoints, data_iter):
  """Returns (state, epoch, how) following the init order of the docstring."""
  full_abs = nnx.merge_state(s.abstract_state.params, s.abstract_state.frozen)
  r = ckpts.restore_newest(
      abstract_params=full_abs, abstract_opt_state=s.abstract_state.opt_state,
      data_iter=data_iter, say=_say)
  if r is not None:
    params, frozen = _split_full(s, r.params)
    step = jax.device_put(jnp.asarray(r.step, jnp.int32),
                          s.shardings.step)
    state = step_lib.TrainState(step=step, params=params, frozen=frozen,
                                opt_state=r.opt_state)
    return state, r.epoch, f"resumed from {ckpts.directory / str(r.step)}"
  if config.init_from.path:
    base, how = _base_params_from_init(config, s)
    constrain = sharding.LogicalConstraint(s.mesh, s.rules)

    def init(base):
      model = _build_model(config.model, constrain, config.train.seed,
                           s.model_transform, base_params=base)
      _, params, frozen = nnx.split(model, s.trainable, ...)
      return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 frozen=frozen, opt_state=s.tx.init(params))
    state = jax.jit(init, out_shardings=s.shardings)(base)
    return state, 0, f"initialized from {how}"
  _, state, _ = step_lib.create_train_state(
      config.model, s.tx, s.mesh, s.rules, trainable=s.trainable,
      model_transform=s.model_transform, seed=config.train.seed)
  return state, 0, f"random init (seed {config.train.seed})"


def _say(msg: str):
  """A line for the person running the job (stdout) and the log."""
  logging.warning("%s", msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def _split_full(s: Setup, full):
  model = nnx.merge(s.graphdef, full)
  _, params, frozen = nnx.split(model, s.trainable, ...)
  return params, frozen


def full_params(state: step_lib.TrainState):
  """Every model variable (trainable and frozen): what checkpoints hold."""
  return nnx.merge_state(state.params, state.frozen)


# ---------------------------------------------------------------------------
# The loop.


class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      logging.warning("signal %d: saving a checkpoint and stopping", signum)
      self.requested = True
    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      # All hosts must agree on the step to stop at.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:
        pass
    return self.requested


def check_finite(step: int, m: dict[str, Any], ckpts: ckpt_lib.RunCheckpoints,
                 workdir: epath.Path):
  """Raises NonFiniteError (naming the last good checkpoint) on NaN/Inf."""
  # The update norms catch a step whose own loss was finite but whose update
  # (and so the state it leaves behind) is not.
  keys = ["loss", "grad_norm", *sorted(k for k in m if k.startswith(
      "update_norm/"))]
  bad = {k: float(m[k]) for k in keys if k in m and not np.isfinite(m[k])}
  if not bad:
    return
  ckpts.wait()
  good = [c for c in ckpt_lib.list_checkpoints(workdir)
          if c.complete and c.step < step]
  last = (f"{good[-1].path} (step {good[-1].step})" if good
          else "none (no checkpoint was saved before this step)")
  raise NonFiniteError(
      f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step"
      f" {step}; stopping without saving. Last good checkpoint: {last}")


def train(config: ExperimentConfig, workdir: str | os.PathLike,
          *, stop_after: int | None = None) -> TrainResult:
  """Runs (or resumes) training in `workdir`.

  Args:
    config: the typed experiment config.
    workdir: W (created if missing).
    stop_after: stop (with a checkpoint, as on SIGTERM) once this many steps
      are done; for tests and time-sliced jobs.
  """
  workdir = epath.Path(workdir)
  step_lib.maybe_initialize_distributed()
  # Everything read from the user is checked before anything is written.
  with errors.user_input():
    mesh = sharding.make_mesh(config.mesh)
    preflight(config, mesh)

    from optconsist_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
    pipe = data_lib.build_pipeline(config.data)
    if pipe.tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(
          f"the tokenizer has {pipe.tokenizer.vocab_size} tokens but"
          f" config.model.vocab_size={config.model.vocab_size}")
    tc = config.train
    total_steps = tc.num_steps or tc.num_epochs * pipe.steps_per_epoch
    config = config.resolve_total_steps(total_steps)
    resolved = json.loads(config.to_json())
    check_workdir(resolved, workdir)
    s = setup(config, mesh)
  write_config(config, workdir)
  ckpts = ckpt_lib.RunCheckpoints(workdir, config.checkpoint,
                                  model_identity(config), run_config=resolved)
  data_iter = pipe.iterator()
  state, epoch, how = initial_state(config, s, ckpts, data_iter)
  start = int(jax.device_get(state.step))
  logging.info("%s at step %d of %d (%d steps/epoch, %d devices, mesh %s)",
               how, start, total_steps, pipe.steps_per_epoch,
               jax.device_count(), dict(mesh.shape))

  writer = metrics_lib.Writer(os.fspath(workdir), num_train_steps=total_steps,
                              progress_every_secs=tc.progress_every_secs)
  if tc.parameter_overview and start == 0:
    writer.parameter_overview(state.params, "trainable params")
  dropout_seed = tc.dropout_seed
  if dropout_seed is None and config.lora is not None and config.lora.dropout:
    dropout_seed = tc.seed  # LoRA dropout needs randomness.
  train_fn = step_lib.make_train_step(
      s.graphdef, s.tx, mesh=mesh, rules=s.rules,
      state_shardings=s.shardings, grad_accum_steps=tc.grad_accum_steps,
      param_groups=s.param_groups, dropout_seed=dropout_seed)
  stats_fn = jax.jit(step_lib.stats_fn(s.graphdef))
  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  flops_per_token = config.model.flops_per_token(config.data.seq_len)
  peak = metrics_lib.peak_flops()
  rng = jax.random.key(dropout_seed if dropout_seed is not None else tc.seed)

  losses: dict[int, float] = {}
  pending = metrics_lib.DeferredFetch()
  timer = {"t": None, "step": start, "tokens": 0.0}
  perf = {"t0": None, "s0": 0, "t": None, "s": 0, "tokens": 0.0}
  stopped = "done"

  def save(step: int, *, epoch_end: bool):
    ckpts.save(step, params=full_params(state), opt_state=state.opt_state,
               data_iter=data_iter, rng=rng, epoch=step // pipe.steps_per_epoch,
               epoch_end=epoch_end)

  def report(fetched):
    """Writes one fetched step's metrics; NaN guard."""
    if fetched is None:
      return
    step, m, _ = fetched
    losses[step] = float(m["loss"])
    now = time.perf_counter()
    if perf["t0"] is None:
      perf.update(t0=now, s0=step)
    else:
      perf.update(t=now, s=step, tokens=perf["tokens"] + float(
          m.get("num_tokens", 0.0)))
    timer["tokens"] += float(m.get("num_tokens", 0.0))
    if tc.stop_on_nonfinite:
      check_finite(step, m, ckpts, workdir)
    if timer["t"] is None:  # First step: includes compilation.
      timer.update(t=time.perf_counter(), step=step, tokens=0.0)
      writer.scalars(step, {"loss": m["loss"], "grad_norm": m["grad_norm"]})
      return
    if step % tc.log_every and step != total_steps:
      return
    dt = time.perf_counter() - timer["t"]
    n = step - timer["step"]
    out = {k: v for k, v in m.items() if np.ndim(v) == 0}
    if n > 0 and dt > 0:
      out["step_time_s"] = dt / n
      out["tokens_per_s"] = n * tokens_per_step / dt
      out["target_tokens_per_s"] = timer["tokens"] / dt
      out["mfu"] = metrics_lib.mfu(flops_per_token, out["tokens_per_s"],
                                   jax.device_count(), peak)
    for g, fn in s.lr_fns.items():
      out[f"lr/{g}"] = float(fn(step - 1))
    out["epoch"] = (step - 1) / pipe.steps_per_epoch
    writer.scalars(step, out)
    timer.update(t=time.perf_counter(), step=step, tokens=0.0)

  try:
    with Preemption() as preemption:
      step = start
      while step < total_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          local = next(data_iter)
          batch = step_lib.global_batch(local, mesh, s.rules)
          if tc.stats_every and (step + 1) % tc.stats_every == 0:
            stats = stats_fn(state.params, state.frozen, batch)
          else:
            stats = None
          state, m = train_fn(state, batch)
          step += 1
        ckpts.check()  # A background save that failed stops the run here.
        report(pending.push(step, m))
        if stats is not None:
          writer.scalars(step, metrics_lib.layer_stats_scalars(
              jax.device_get(stats)))
        writer.progress(step)
        epoch_end = step % pipe.steps_per_epoch == 0
        stop = preemption.reached(step) or (
            stop_after is not None and step >= stop_after)
        if (step == total_steps or stop
            or (epoch_end and config.checkpoint.save_epoch_ends)
            or ckpts.is_due(step)):
          report(pending.pop())  # Never checkpoint a non-finite state.
          save(step, epoch_end=epoch_end)
        if stop and step < total_steps:
          stopped = "preempted"
          break
      report(pending.pop())
  finally:
    try:
      ckpts.close()  # Raises SaveFailedError if the last save did not commit.
    finally:
      writer.close()
  done = [c for c in ckpt_lib.list_checkpoints(workdir) if c.complete]
  last = os.fspath(done[-1].path) if done else None
  summary = {}
  if perf["t"] is not None and perf["s"] > perf["s0"]:
    n, dt = perf["s"] - perf["s0"], perf["t"] - perf["t0"]
    summary = {"steps_timed": n, "step_time_s": dt / n,
               "tokens_per_s": n * tokens_per_step / dt,
               "target_tokens_per_s": perf["tokens"] / dt,
               "mfu": metrics_lib.mfu(flops_per_token,
                                      n * tokens_per_step / dt,
                                      jax.device_count(), peak)}
  return TrainResult(step=step, losses=losses, stopped=stopped,
                     workdir=os.fspath(workdir), last_checkpoint=last,
                     perf=summary)


# ---------------------------------------------------------------------------
# Command line.

def _define_flags():
  """Flags of the command line (only when run as a program, so other mains
  such as optconsist_jax.experiments.reproduce can import this module)."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/*.py[:arg]).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory W.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  metrics_lib.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.parse_flags_with_absl()
  platforms.select_default()
  with errors.user_input():
    config = ExperimentConfig.from_dict(
        paths.resolve_keys(flags.FLAGS.config.to_dict(), PATH_KEYS))
  result = train(config, paths.resolve(flags.FLAGS.workdir))
  w = result.workdir
  final = result.losses.get(result.step)
  what = (f"preempted (exit code {errors.PREEMPTED}): stopped by SIGTERM"
          " after saving; rerun the same command to resume"
          if result.stopped == "preempted" else "done")
  print(f"{what}: step {result.step}"
        + (f", loss {final:.4f}" if final is not None else "")
        + f". Outputs in {w}: {CONFIG_FILE}, checkpoints/ (last:"
        f" {result.last_checkpoint}), metrics/ (tensorboard --logdir"
        f" {os.path.join(w, metrics_lib.METRICS_DIR)})", flush=True)
  if result.stopped == "preempted":
    sys.exit(errors.PREEMPTED)


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
