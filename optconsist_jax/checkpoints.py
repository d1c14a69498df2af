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
                                  model (the model identity dict, see below)
      _CHECKPOINT_METADATA        Orbax's own step metadata
  W/checkpoints/<step>.orbax-checkpoint-tmp-<t>/   a save still being written
                                  (or killed): never read, removed on resume
  W/metrics/                    clu metric writers (TensorBoard events)
  W/eval/                       the eval job's outputs

Saves are asynchronous: `save` returns once the arrays are copied off the
devices (so the train step may donate them afterwards) and Orbax writes and
renames the step directory in a background thread; a step directory without the
temporary suffix (or with `commit_success.txt` on GCS) is complete.

Retention: the newest `keep` checkpoints, plus every epoch-end checkpoint when
`keep_epochs` is set (the eval job draws one learning/forgetting point per
epoch). `list_checkpoints(W)` reports each step with its epoch (for epoch-end
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

from etils import epath
from flax import nnx
import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

PARAMS = "params"
OPT_STATE = "opt_state"
DATA_ITER = "data_iter"
META = "meta"
CHECKPOINTS_DIR = "checkpoints"

# Model-config keys that do not change the parameter tree.
RUNTIME_ONLY_KEYS = frozenset(
    {"dtype", "scan_layers", "remat_policy", "attention_impl"})


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for a different model than the one asked for."""


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
  """

  every_steps: int = 1000
  keep: int | None = 3
  keep_epochs: bool = True
  save_epoch_ends: bool = True
  async_save: bool = True

  def __post_init__(self):
    if self.every_steps < 0:
      raise ValueError(
          f"checkpoint.every_steps={self.every_steps} must be >= 0")
    if self.keep is not None and self.keep < 1:
      raise ValueError(f"checkpoint.keep={self.keep} must be >= 1 or None")


class CheckpointInfo(NamedTuple):
  step: int
  epoch: int | None  # epochs completed, for epoch-end checkpoints only
  path: epath.Path
  complete: bool


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
                   " model config to match."):
  """Raises CheckpointMismatchError if two model identities differ."""
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
        f"{where} was written for a different model:\n  " + "\n  ".join(diffs)
        + "\n" + hint)


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
      continue
    complete = (p.name.isdigit()
                and ocp.path.step.is_checkpoint_finalized(p)
                and (p / META / "metadata").exists())
    epoch = None
    if complete:
      try:
        meta = read_meta(p)
      except (OSError, json.JSONDecodeError):
        complete = False
      else:
        epoch = meta.get("epoch") if meta.get("epoch_end") else None
    out.append(CheckpointInfo(step, epoch, p, complete))
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
  different model identity.
  """

  def __init__(self, workdir: str | os.PathLike, config: CheckpointConfig,
               model: dict[str, Any]):
    self.config = config
    self.model = model
    self.directory = checkpoint_dir(workdir)
    existing = [c for c in list_checkpoints(self.directory) if c.complete]
    if existing:
      compare_models(model, read_meta(existing[-1].path).get("model", {}),
                     f"checkpoint {existing[-1].path}")
    self._epoch_steps = {c.step for c in existing if c.epoch is not None}
    policies = [pp.LatestN(config.keep)]
    if config.keep_epochs:
      policies.append(_KeepSteps(self._epoch_steps))
    options = ocp.CheckpointManagerOptions(
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=config.async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies),
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
    if step in self._manager.all_steps():
      return False
    meta = {"step": int(step), "epoch": int(epoch),
            "epoch_end": bool(epoch_end), "rng": _rng_to_json(rng),
            "model": self.model, **(extra or {})}
    items = {PARAMS: ocp.args.PyTreeSave(_pure(params)),
             OPT_STATE: ocp.args.PyTreeSave(opt_state),
             META: ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(
          _IterState(_iter_state_text(data_iter)))
    if epoch_end:
      self._epoch_steps.add(int(step))
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              force=True)

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
      raise ValueError(
          f"checkpoint {step_dir}: the saved params or optimizer state do not"
          " match this run's (was config.optim or config.lora changed since"
          " it was written? Resume with the same optimizer, or start a new"
          f" workdir with init_from={str(self.directory.parent)!r}).\n{e}"
      ) from e
    if data_iter is not None:
      _set_iter_state(data_iter, snapshot.text)
    return Restored(step=int(meta["step"]), epoch=int(meta["epoch"]),
                    params=_like(abstract_params, out[PARAMS]),
                    opt_state=out[OPT_STATE],
                    rng=_rng_from_json(meta.get("rng")), meta=meta)

  def wait(self):
    """Blocks until the save in flight (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

