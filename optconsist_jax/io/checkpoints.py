"""Orbax checkpoints of a training run, and how other jobs find and read them.

Workdir layout (one run = one directory W):

  W/config.json                 resolved experiment config (train.py writes it)
  W/checkpoints/<step>/         one Orbax step directory per saved step:
      params/                     every model variable as a plain nested dict
                                  ({"embed": x, "layers": {"attn": {"q_proj":
                                  {"kernel": x}}}, ...}, nnx `to_pure_dict`
                                  form; under LoRA the frozen base weights and
                                  the adapters). Orbax PyTree, OCDBT;
                                  restorable onto any mesh
      opt_state/                  optimizer state (same format)
      data_iter/                  grain iterator state, one
                                  `process_<i>-of-<n>.json` per host
      meta/metadata               JSON: step, epoch (epochs completed so far),
                                  epoch_end (bool), rng (key data + impl),
                                  model (the model identity dict, see below),
                                  config (the resolved config of the run
                                  that wrote it: the eval job's labels)
      _CHECKPOINT_METADATA        Orbax's own step metadata
  W/checkpoints/<step>.orbax-checkpoint-tmp-<t>/   a save still being written
                                  (or killed): never read, removed on resume
  W/checkpoints/<step>.corrupt/   an unreadable checkpoint a resume set aside
  W/metrics/                    clu metric writers (TensorBoard events)
  W/eval/                       the eval job's outputs

Saves are asynchronous: `save` returns once the arrays are copied off the
devices (so the train step may donate them afterwards) and Orbax writes and
renames the step directory in a background thread; a step directory without the
temporary suffix (or with `commit_success.txt` on GCS) is complete.

Retention: the newest `keep` checkpoints, plus every epoch-end checkpoint when
`keep_epochs` is set (the eval job draws one learning/forgetting point per
epoch). With `epoch_params_only`, an epoch-end checkpoint loses opt_state/ and
data_iter/ once a newer save has committed (params-only: evaluable, not
resumable); the newest checkpoint is always complete.

Faults: a save that does not commit raises SaveFailedError (errors.
SAVE_FAILED) at the trainer's next step; `restore_newest` sets an unreadable
checkpoint aside and resumes from the newest readable full one. `list_checkpoints(W)` reports each step with its epoch (for epoch-end
checkpoints; None otherwise), its path and whether it is complete.

Model identity: each checkpoint stores a JSON dict describing the parameter tree
(the LlamaConfig fields plus LoRA settings, whatever the trainer passes). A
trainer resuming in W, or a job restoring params, that expects a different
identity is refused with a message naming the differing keys. Keys in
`RUNTIME_ONLY_KEYS` (compute dtype, scan vs loop, remat, attention kernel)
do not change the parameters and are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

from absl import logging
from etils import epath
from flax import nnx
import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

from optconsist_jax import errors

PARAMS = "params"
OPT_STATE = "opt_state"
DATA_ITER = "data_iter"
META = "meta"
CHECKPOINTS_DIR = "checkpoints"

# Model-config keys that do not change the parameter tree.
RUNTIME_ONLY_KEYS = frozenset(
    {"dtype", "scan_layers", "remat_policy", "attention_impl"})


class CheckpointMismatchError(errors.UserError):
  """A checkpoint was written for a different model (or run) than asked for."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and what to keep.

  Attributes:
    every_steps: save every this many optimizer steps (0: never on a period;
      epoch ends and the end of training still save).
    keep: how many of the newest checkpoints to keep (None = all).
    keep_epochs: also keep every epoch-end checkpoint.
    save_epoch_ends: save at the end of each epoch.
    async_save: write in a background thread.
    epoch_params_only: an epoch-end checkpoint keeps only params and meta
      once a newer full checkpoint has committed (its optimizer state and
      data-iterator state are deleted): the eval job needs only the params,
      and with AdamW a 7B model's optimizer state is twice its params. The
      newest checkpoint always keeps the full state for resume.
  """

  every_steps: int = 1000
  keep: int | None = 3
  keep_epochs: bool = True
  save_epoch_ends: bool = True
  async_save: bool = True
  epoch_params_only: bool = False

  def __post_init__(self):
    if self.every_steps < 0:
      raise ValueError(
          f"checkpoint.every_steps={self.every_steps} must be >= 0")
    if self.keep is not None and self.keep < 1:
      raise ValueError(f"checkpoint.keep={self.keep} must be >= 1 or None")


class SaveFailedError(errors.CommandError, OSError):
  """A checkpoint did not commit (disk full, no permission, ...)."""

  exit_code = errors.SAVE_FAILED


class CheckpointInfo(NamedTuple):
  """One step directory.

  Attributes:
    step: its step.
    epoch: epochs completed, for epoch-end checkpoints only.
    path: the step directory.
    complete: finalized by Orbax and its meta readable.
    error: why a finalized directory is unreadable (missing or truncated
      meta/metadata), else None; an in-flight save has complete=False and
      error=None.
    params_only: holds params and meta but no optimizer state (an epoch-end
      checkpoint under `epoch_params_only`): evaluable, not resumable.
  """

  step: int
  epoch: int | None
  path: epath.Path
  complete: bool
  error: str | None = None
  params_only: bool = False


class Restored(NamedTuple):
  step: int
  epoch: int
  params: Any
  opt_state: Any
  rng: jax.Array | None
  meta: dict[str, Any]


@dataclasses.dataclass
class _KeepSteps(pp.PreservationPolicy):
  """Keeps the steps in a set that grows as epoch-end checkpoints are saved."""

  steps: set[int]

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


class _IterState:
  """A snapshot of an iterator's state in the shape grain's handler wants.

  grain's Orbax handler calls `get_state()` when it writes (possibly after the
  trainer has moved on) and `set_state()` + `start_prefetch()` when it reads, so
  the trainer hands it this frozen copy and applies the restored state itself.
  """

  def __init__(self, text: str | None = None):
    self.text = text

  def get_state(self) -> bytes:
    return self.text.encode()

  def set_state(self, state: bytes):
    self.text = state.decode()

  def start_prefetch(self):
    pass


def _iter_state_text(iterator) -> str:
  state = iterator.get_state()
  if isinstance(state, bytes):
    return state.decode()
  return json.dumps(state)


def _set_iter_state(iterator, text: str):
  if isinstance(iterator, grain.DatasetIterator):
    iterator.set_state(json.loads(text))
  else:
    iterator.set_state(text.encode())


def _rng_to_json(rng: jax.Array | None) -> dict[str, Any] | None:
  if rng is None:
    return None
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(rng))
    data = np.asarray(jax.random.key_data(rng))
    return {"typed": True, "impl": impl, "data": data.tolist()}
  return {"typed": False, "data": np.asarray(rng).tolist()}


def _rng_from_json(d: dict[str, Any] | None) -> jax.Array | None:
  if d is None:
    return None
  data = np.asarray(d["data"], np.uint32)
  if d["typed"]:
    return jax.random.wrap_key_data(data, impl=d["impl"])
  return jax.numpy.asarray(data)


def compare_models(expected: dict[str, Any], found: dict[str, Any],
                   where: str, hint: str = "Use a fresh --workdir, or set the"
                   " model config to match.", what: str = "model"):
  """Raises CheckpointMismatchError if two model (or run) identities differ.

  The message is one line: every differing key with both values, and `hint`.
  """
  flat_e, flat_f = _flatten(expected), _flatten(found)
  diffs = []
  for k in sorted(set(flat_e) | set(flat_f)):
    if k.split(".")[-1] in RUNTIME_ONLY_KEYS:
      continue
    if flat_e.get(k, "<absent>") != flat_f.get(k, "<absent>"):
      diffs.append(f"{k}: checkpoint has {flat_f.get(k, '<absent>')!r},"
                   f" config has {flat_e.get(k, '<absent>')!r}")
  if diffs:
    raise CheckpointMismatchError(
        f"{where} was written for a different {what}: " + "; ".join(diffs)
        + ". " + hint)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINTS_DIR


def _resolve(path: str | os.PathLike, step: int | None) -> epath.Path:
  """W, W/checkpoints or W/checkpoints/<step> -> the step directory."""
  path = epath.Path(path)
  if (path / META).exists() or (path / PARAMS).exists():
    return path
  if (path / CHECKPOINTS_DIR).is_dir():
    path = path / CHECKPOINTS_DIR
  if step is None:
    done = [c for c in list_checkpoints(path) if c.complete]
    if not done:
      raise FileNotFoundError(f"no complete checkpoint under {path}")
    return done[-1].path
  step_dir = path / str(step)
  if not step_dir.exists():
    have = [c.step for c in list_checkpoints(path) if c.complete]
    raise FileNotFoundError(
        f"no checkpoint for step {step} under {path}; complete steps: {have}")
  return step_dir


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
  """The meta JSON of one step directory."""
  f = epath.Path(step_dir) / META / "metadata"
  try:
    return json.loads(f.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{step_dir} is not a checkpoint of this project (no {META}/metadata)"
    ) from None


def list_checkpoints(workdir: str | os.PathLike) -> list[CheckpointInfo]:
  """Every checkpoint step under W (or W/checkpoints), oldest first.

  Incomplete ones (an async save in flight, or a killed one) are listed with
  complete=False so a watcher can skip them and look again later.
  """
  root = epath.Path(workdir)
  if (root / CHECKPOINTS_DIR).is_dir():
    root = root / CHECKPOINTS_DIR
  if not root.is_dir():
    return []
  out = []
  for p in root.iterdir():
    try:
      step = ocp.path.step.step_from_checkpoint_name(p.name)
    except ValueError:
      continue  # Not a step (e.g. "<step>.corrupt", set aside on resume).
    finalized = p.name.isdigit() and ocp.path.step.is_checkpoint_finalized(p)
    epoch, error, complete = None, None, False
    if finalized:
      try:
        meta = read_meta(p)
      except FileNotFoundError:
        error = f"{META}/metadata is missing"
      except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError.
        error = f"{META}/metadata is unreadable ({errors.short_cause(e)})"
      else:
        if isinstance(meta, dict) and "step" in meta:
          complete = True
          epoch = meta.get("epoch") if meta.get("epoch_end") else None
        else:
          error = f"{META}/metadata has no step"
    out.append(CheckpointInfo(step, epoch, p, complete, error,
                              complete and not (p / OPT_STATE).exists()))
  return sorted(out, key=lambda c: (c.step, c.complete))


def _pure(tree: Any) -> Any:
  """nnx.State -> its plain nested dict (the on-disk form of params)."""
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _like(abstract: Any, restored: Any) -> Any:
  """Restored plain dict -> the container type of `abstract`."""
  if isinstance(abstract, nnx.State):
    out = jax.tree.map(lambda x: x, abstract)  # A copy to fill.
    nnx.replace_by_pure_dict(out, restored)
    return out
  return restored


def _with_shardings(abstract: Any, shardings: Any | None) -> Any:
  """ShapeDtypeStructs carrying the target shardings (Orbax reshards)."""
  def one(a, s=None):
    sharding = s if s is not None else getattr(a, "sharding", None)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  if shardings is None:
    return jax.tree.map(one, abstract)
  return jax.tree.map(one, abstract, shardings)


def restore_params(workdir_or_ckpt_dir: str | os.PathLike, step: int | None,
                   abstract_params: Any, shardings: Any | None = None, *,
                   model: dict[str, Any] | None = None) -> Any:
  """Params only, laid out by `shardings` (any mesh), from one checkpoint.

  Args:
    workdir_or_ckpt_dir: W, W/checkpoints, or a step directory.
    step: the step to read; None = the newest complete one (ignored when a
      step directory is given).
    abstract_params: the param tree of ShapeDtypeStructs: an nnx.State (e.g.
      `nnx.state(nnx.eval_shape(lambda: Llama(...)))`, returned as an
      nnx.State) or its plain-dict form; dtypes are cast to these. It must
      name the same variables as the checkpoint (a LoRA run's checkpoint holds
      the adapters too).
    shardings: a matching tree of `jax.sharding.Sharding`; None = those on
      `abstract_params`, or the first device.
    model: the model identity the caller expects; refused if it differs.

  Returns:
    The param tree with the structure of `abstract_params`.
  """
  step_dir = _resolve(workdir_or_ckpt_dir, step)
  meta = read_meta(step_dir)
  if model is not None:
    compare_models(model, meta.get("model", {}), f"checkpoint {step_dir}")
  target = _pure(_with_shardings(abstract_params, shardings))
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(step_dir / PARAMS,
                             args=ocp.args.PyTreeRestore(
                                 item=target,
                                 restore_args=ocp.checkpoint_utils
                                 .construct_restore_args(target)))
  return _like(abstract_params, restored)


def restore_model(path: str | os.PathLike, model_config: Any, *,
                  step: int | None = None,
                  lora: dict[str, Any] | None = None, mesh: Any = None,
                  rules: Any = None,
                  identity: dict[str, Any] | None = None) -> nnx.Module:
  """A Llama from one checkpoint (params only), LoRA adapters merged.

  Args:
    path: W, W/checkpoints, or a step directory.
    model_config: the LlamaConfig the checkpoint was written for (numerics
      such as dtype or scan_layers may differ).
    step: the step to read (None: newest complete, or the step directory's).
    lora: the run's LoRA config dict, if it trained adapters; they are
      restored and folded into the base weights (model.lora.merge).
    mesh, rules: lay the params out on this mesh (sharding.state_shardings);
      None = one device.
    identity: the model identity to insist on; default the one train.py
      writes for `model_config` and `lora`.
  """
  from optconsist_jax import config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model.llama import Llama, no_constraint  # pylint: disable=g-import-not-at-top
  constrain = (sharding.LogicalConstraint(mesh, rules) if mesh is not None
               else no_constraint)

  def build():
    model = Llama(model_config, rngs=nnx.Rngs(0), constrain=constrain)
    if lora:
      lora_lib.apply_lora(model, lora_lib.LoRAConfig.from_dict(lora),
                          rngs=nnx.Rngs(1))
    return model

  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  shardings = (sharding.state_shardings(abstract_state, mesh, rules)
               if mesh is not None else None)
  if identity is None:
    identity = {"llama": config_types.to_jsonable(model_config),
                "lora": config_types.to_jsonable(lora) if lora else None}
  state = restore_params(path, step, abstract_state, shardings, model=identity)
  model = nnx.merge(graphdef, state)
  return lora_lib.merge(model) if lora else model


class RunCheckpoints:
  """Saves and restores the checkpoints of one run (W/checkpoints).

  Construction refuses a workdir whose newest checkpoint was written for a
  different model identity. Each save records `run_config` (the resolved
  config of the run that wrote it) in meta["config"]: the eval job labels a
  checkpoint from it.

  A save that fails (in `save`, or later in Orbax's background thread) raises
  `SaveFailedError` from the next `save`, `check`, `wait` or `close`, naming
  the step directory, the cause and the last good checkpoint; its temporary
  directory is removed.
  """

  def __init__(self, workdir: str | os.PathLike, config: CheckpointConfig,
               model: dict[str, Any], run_config: dict[str, Any] | None = None):
    self.config = config
    self.model = model
    self.run_config = run_config
    self.directory = checkpoint_dir(workdir)
    infos = list_checkpoints(self.directory)
    existing = [c for c in infos if c.complete]
    if existing:
      compare_models(model, read_meta(existing[-1].path).get("model", {}),
                     f"checkpoint {existing[-1].path}")
    self._epoch_steps = {c.step for c in existing if c.epoch is not None}
    # Epoch-end steps whose optimizer state goes once a newer save commits.
    self._to_strip = ({c.step for c in existing if c.epoch is not None
                       and not c.params_only}
                      if config.epoch_params_only else set())
    self._pending: int | None = None  # A save started, not yet verified.
    policies = [pp.LatestN(config.keep)]
    if config.keep_epochs:
      policies.append(_KeepSteps(self._epoch_steps))
    options = ocp.CheckpointManagerOptions(
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=config.async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        # The step directory is made in `save` itself, so an unwritable
        # directory fails there (Orbax's background creation would make the
        # trainer wait for its 300 s timeout instead).
        async_options=ocp.AsyncOptions(
            create_directories_asynchronously=False),
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(PARAMS, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler())
    registry.add(PARAMS, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    registry.add(OPT_STATE, ocp.args.PyTreeSave,
                 ocp.PyTreeCheckpointHandler())
    registry.add(OPT_STATE, ocp.args.PyTreeRestore,
                 ocp.PyTreeCheckpointHandler())
    registry.add(META, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add(META, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    registry.add(DATA_ITER, grain.checkpoint.CheckpointSave,
                 grain.checkpoint.CheckpointHandler())
    registry.add(DATA_ITER, grain.checkpoint.CheckpointRestore,
                 grain.checkpoint.CheckpointHandler())
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def is_due(self, step: int) -> bool:
    """Whether the periodic schedule asks for a save at `step`."""
    e = self.config.every_steps
    return e > 0 and step % e == 0

  def save(self, step: int, *, params: Any, opt_state: Any,
           data_iter: Any | None = None, rng: jax.Array | None = None,
           epoch: int = 0, epoch_end: bool = False,
           extra: dict[str, Any] | None = None) -> bool:
    """Starts an (async) save of one step; returns once arrays are on host.

    Args:
      step: optimizer steps taken.
      params: param tree (jax arrays, any sharding).
      opt_state: optimizer state tree.
      data_iter: a grain iterator (anything with get_state()); its state is
        captured now, before the trainer advances it.
      rng: the trainer's PRNG key (typed or raw uint32).
      epoch: epochs completed so far.
      epoch_end: this checkpoint closes epoch `epoch`; kept when keep_epochs.
      extra: more JSON-able facts to store in meta.

    Returns:
      False if `step` was already saved (nothing written), else True.
    """
    self.wait()  # The previous save has committed (or raises).
    if step in self._manager.all_steps():
      return False
    meta = {"step": int(step), "epoch": int(epoch),
            "epoch_end": bool(epoch_end), "rng": _rng_to_json(rng),
            "model": self.model, **(extra or {})}
    if self.run_config is not None:
      meta["config"] = self.run_config
    items = {PARAMS: ocp.args.PyTreeSave(_pure(params)),
             OPT_STATE: ocp.args.PyTreeSave(opt_state),
             META: ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(
          _IterState(_iter_state_text(data_iter)))
    if epoch_end:
      self._epoch_steps.add(int(step))
    self._pending = int(step)
    try:
      return self._manager.save(step, args=ocp.args.Composite(**items),
                                force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)

  def last_good(self) -> str:
    """The newest complete checkpoint, for messages."""
    done = [c for c in list_checkpoints(self.directory)
            if c.complete and c.step != self._pending]
    return (f"{done[-1].path} (step {done[-1].step})" if done
            else "none")

  def _failed(self, step: int, e: BaseException | None):
    """Removes what a failed save left and raises SaveFailedError."""
    self._pending = None
    step_dir = self.directory / str(step)
    for p in (self.directory.glob(f"{step}.orbax-checkpoint-tmp*")
              if self.directory.exists() else []):
      try:
        p.rmtree()
      except OSError:
        pass
    cause = errors.short_cause(e) if e is not None else (
        "the save did not commit (see the log for Orbax's error)")
    raise SaveFailedError(
        f"could not save checkpoint {step_dir}: {cause}. Training stopped;"
        f" last good checkpoint: {self.last_good()}. Fix the storage (free"
        " space, permissions) and rerun the same command to resume from it"
    ) from e

  def check(self):
    """Raises SaveFailedError if a finished background save failed.

    Cheap (no waiting); the trainer calls it after every step.
    """
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    self._verify()

  def _verify(self):
    step = self._pending
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    step_dir = self.directory / str(step)
    if not (step_dir.exists() and ocp.path.step.is_checkpoint_finalized(
        step_dir) and (step_dir / META / "metadata").exists()):
      self._failed(step, None)
    self._pending = None
    self._strip_epochs(step)

  def _strip_epochs(self, newest: int):
    """Drops optimizer and iterator state of epoch ends older than `newest`."""
    if jax.process_index() != 0:
      return
    for step in sorted(s for s in self._to_strip if s < newest):
      step_dir = self.directory / str(step)
      for item in (OPT_STATE, DATA_ITER):
        if (step_dir / item).exists():
          # Renamed first: a kill mid-delete never leaves a half state.
          doomed = step_dir / f"{item}.deleting"
          (step_dir / item).rename(doomed)
          doomed.rmtree()
      self._to_strip.discard(step)
    if self.config.epoch_params_only and newest in self._epoch_steps:
      self._to_strip.add(newest)

  def restore(self, step: int | None, *, abstract_params: Any,
              abstract_opt_state: Any, data_iter: Any | None = None,
              ) -> Restored:
    """Restores a full training state; `data_iter` is set to its saved state.

    The abstract trees carry the shardings to restore into (this run's mesh,
    which may differ from the writer's).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    step_dir = self.directory / str(step)
    meta = read_meta(step_dir)
    compare_models(self.model, meta.get("model", {}), f"checkpoint {step_dir}")
    params_t = _pure(_with_shardings(abstract_params, None))
    opt_t = _with_shardings(abstract_opt_state, None)
    items = {
        PARAMS: ocp.args.PyTreeRestore(
            item=params_t,
            restore_args=ocp.checkpoint_utils.construct_restore_args(params_t)),
        OPT_STATE: ocp.args.PyTreeRestore(
            item=opt_t,
            restore_args=ocp.checkpoint_utils.construct_restore_args(opt_t)),
    }
    snapshot = None
    if data_iter is not None:
      if not (step_dir / DATA_ITER).exists():
        raise FileNotFoundError(
            f"checkpoint {step_dir} holds no data-iterator state")
      snapshot = _IterState()
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(snapshot)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if "structures do not match" not in str(e):
        raise
      raise CheckpointMismatchError(
          f"checkpoint {step_dir}: the saved params or optimizer state do not"
          " match this run's (was config.optim or config.lora changed since"
          " it was written? Resume with the same optimizer, or start a new"
          f" workdir with init_from={str(self.directory.parent)!r})"
      ) from e
    if data_iter is not None:
      _set_iter_state(data_iter, snapshot.text)
    return Restored(step=int(meta["step"]), epoch=int(meta["epoch"]),
                    params=_like(abstract_params, out[PARAMS]),
                    opt_state=out[OPT_STATE],
                    rng=_rng_from_json(meta.get("rng")), meta=meta)

  def wait(self):
    """Blocks until the save in flight (if any) is on disk; raises if not."""
    if self._pending is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self._pending, e)
    self._verify()

  def set_aside(self, step: int, cause: str) -> epath.Path:
    """Renames an unreadable step directory to `<step>.corrupt[.k]`."""
    step_dir = self.directory / str(step)
    dest = self.directory / f"{step}.corrupt"
    k = 1
    while dest.exists():
      dest, k = self.directory / f"{step}.corrupt.{k}", k + 1
    if jax.process_index() == 0:
      step_dir.rename(dest)
      logging.warning("checkpoint %s is unreadable (%s); moved to %s",
                      step_dir, cause, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    self._to_strip.discard(step)
    self._epoch_steps.discard(step)
    return dest

  def restore_newest(self, *, abstract_params: Any, abstract_opt_state: Any,
                     data_iter: Any | None = None, say=print
                     ) -> Restored | None:
    """The newest checkpoint that restores; unreadable ones are set aside.

    Params-only checkpoints are passed over (they cannot resume). A
    checkpoint of another model or optimizer is refused (not set aside).
    Returns None when no checkpoint restores.
    """
    for info in reversed(list_checkpoints(self.directory)):
      if info.params_only or (not info.complete and info.error is None):
        continue
      try:
        if info.error is not None:
          raise ValueError(info.error)
        return self.restore(info.step, abstract_params=abstract_params,
                            abstract_opt_state=abstract_opt_state,
                            data_iter=data_iter)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if "do not match this run" in str(e):
          raise
        cause = info.error or errors.short_cause(e)
        dest = self.set_aside(info.step, cause)
        say(f"checkpoint {info.path} is unreadable ({cause}); moved it to"
            f" {dest} and resuming from the newest readable one")
    return None

  def close(self):
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        logging.exception("closing the checkpoint manager")

