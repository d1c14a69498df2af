"""Saving and resuming a training run's checkpoints (the writer side).

`RunCheckpoints` saves a run's state every `CheckpointConfig.every_steps`, at
epoch ends and at the end (asynchronously, Orbax), keeps what the retention
settings say, and restores the newest readable checkpoint on resume (setting
an unreadable one aside). io/checkpoint_layout.py documents the layout on disk and
reads it back for other jobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import logging as std_logging

from absl import logging
from etils import epath
import grain
import grain.checkpoint
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from optconsist_jax import errors
from optconsist_jax.io import checkpoint_layout as ckpt


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


class _LoggedErrors(std_logging.Handler):
  """The last ERROR logged through absl while a save is in flight.

  Orbax's background threads log a failed write (e.g. ENOSPC) and do not
  always hand it to `check_for_errors()`; the message then names it.
  """

  def __init__(self):
    super().__init__(level=std_logging.ERROR)
    self.last: str | None = None

  def emit(self, record: std_logging.LogRecord):
    self.last = record.getMessage()


class SaveFailedError(errors.CommandError, OSError):
  """A checkpoint did not commit (disk full, no permission, ...)."""

  exit_code = errors.SAVE_FAILED


class Restored(NamedTuple):
  step: int
  epoch: int
  params: Any
  opt_state: Any
  rng: jax.Array | None
  meta: dict[str, Any]


@dataclasses.dataclass
class _KeepSteps(ocp_managers.PreservationPolicy):
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


def _iter_state_of_other_count(step_dir: epath.Path) -> str | None:
  """The iterator state to resume with when another process count saved it.

  grain's handler writes one `process_<i>-of-<n>.json` per process and
  reads back this process's own name, so a job restarted on another number
  of hosts (a slice recreated at another size) finds none. Our pipelines'
  state is the index of the next global batch (data/pipeline.py: each process
  maps it to its own rows), the same in every file: then that state serves
  any process count. Returns None when this process's own file is there (the
  usual restore), raises CheckpointMismatchError when the saved states
  differ (grain worker processes hold per-process state: resume with the
  process count that saved it).
  """
  folder = step_dir / ckpt.DATA_ITER
  mine = "process_{}-of-{}.json".format(*(
      (jax.process_index(), jax.process_count())))
  if (folder / mine).exists():
    return None
  saved = sorted(folder.glob("process_*-of-*.json"))
  states = {f.read_text() for f in saved}
  if len(states) != 1:
    raise ckpt.CheckpointMismatchError(
        f"checkpoint {step_dir}: its data-iterator state was saved by"
        f" {len(saved)} processes ({[f.name for f in saved]}) with different"
        f" states, and this job has {jax.process_count()}; resume with the"
        " process count that saved it")
  return states.pop()


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
    self.directory = ckpt.checkpoint_dir(workdir)
    infos = ckpt.list_checkpoints(self.directory)
    existing = [c for c in infos if c.complete]
    if existing:
      ckpt.compare_models(model, ckpt.read_meta(existing[-1].path).get("model", {}),
                     f"checkpoint {existing[-1].path}")
    self._epoch_steps = {c.step for c in existing if c.epoch is not None}
    # Epoch-end steps whose optimizer state goes once a newer save commits.
    self._to_strip = ({c.step for c in existing if c.epoch is not None
                       and not c.params_only}
                      if config.epoch_params_only else set())
    self._pending: int | None = None  # A save started, not yet verified.
    self._logged = _LoggedErrors()
    policies = [ocp_managers.LatestN(config.keep)]
    if config.keep_epochs:
      policies.append(_KeepSteps(self._epoch_steps))
    options = ocp.CheckpointManagerOptions(
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=config.async_save,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        # The step directory is made in `save` itself, so an unwritable
        # directory fails there (Orbax's background creation would make the
        # trainer wait for its 300 s timeout instead).
        async_options=ocp.AsyncOptions(
            create_directories_asynchronously=False),
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(ckpt.PARAMS, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler())
    registry.add(ckpt.PARAMS, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    registry.add(ckpt.OPT_STATE, ocp.args.PyTreeSave,
                 ocp.PyTreeCheckpointHandler())
    registry.add(ckpt.OPT_STATE, ocp.args.PyTreeRestore,
                 ocp.PyTreeCheckpointHandler())
    registry.add(ckpt.META, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add(ckpt.META, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    registry.add(ckpt.DATA_ITER, grain.checkpoint.CheckpointSave,
                 grain.checkpoint.CheckpointHandler())
    registry.add(ckpt.DATA_ITER, grain.checkpoint.CheckpointRestore,
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
    items = {ckpt.PARAMS: ocp.args.PyTreeSave(ckpt.to_pure(params)),
             ckpt.OPT_STATE: ocp.args.PyTreeSave(opt_state),
             ckpt.META: ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items[ckpt.DATA_ITER] = grain.checkpoint.CheckpointSave(
          _IterState(_iter_state_text(data_iter)))
    if epoch_end:
      self._epoch_steps.add(int(step))
    self._pending = int(step)
    self._logged.last = None
    std_logging.getLogger("absl").addHandler(self._logged)
    try:
      return self._manager.save(step, args=ocp.args.Composite(**items),
                                force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)

  def last_good(self) -> str:
    """The newest complete checkpoint, for messages."""
    done = [c for c in ckpt.list_checkpoints(self.directory)
            if c.complete and c.step != self._pending]
    return (f"{done[-1].path} (step {done[-1].step})" if done
            else "none")

  def _settled(self):
    """No save in flight any more."""
    self._pending = None
    std_logging.getLogger("absl").removeHandler(self._logged)

  def _failed(self, step: int, e: BaseException | None):
    """Removes what a failed save left and raises SaveFailedError."""
    logged = self._logged.last
    self._settled()
    step_dir = self.directory / str(step)
    for p in (self.directory.glob(f"{step}.orbax-checkpoint-tmp*")
              if self.directory.exists() else []):
      try:
        p.rmtree()
      except OSError:
        pass
    if e is not None:
      cause = errors.short_cause(e)
    elif logged:
      cause = ("the save did not commit; Orbax logged "
               + errors.short_cause(RuntimeError(logged)).partition(": ")[2])
    else:
      cause = "the save did not commit (see the log for Orbax's error)"
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
        step_dir) and (step_dir / ckpt.META / "metadata").exists()):
      self._failed(step, None)
    self._settled()
    self._strip_epochs(step)

  def _strip_epochs(self, newest: int):
    """Drops optimizer and iterator state of epoch ends older than `newest`."""
    if jax.process_index() != 0:
      return
    for step in sorted(s for s in self._to_strip if s < newest):
      step_dir = self.directory / str(step)
      for item in (ckpt.OPT_STATE, ckpt.DATA_ITER):
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
    meta = ckpt.read_meta(step_dir)
    ckpt.compare_models(self.model, meta.get("model", {}), f"checkpoint {step_dir}")
    params_t = ckpt.to_pure(ckpt.with_shardings(abstract_params, None))
    opt_t = ckpt.with_shardings(abstract_opt_state, None)
    items = {
        ckpt.PARAMS: ocp.args.PyTreeRestore(
            item=params_t,
            restore_args=ocp.checkpoint_utils.construct_restore_args(params_t)),
        ckpt.OPT_STATE: ocp.args.PyTreeRestore(
            item=opt_t,
            restore_args=ocp.checkpoint_utils.construct_restore_args(opt_t)),
    }
    snapshot = None
    if data_iter is not None:
      if not (step_dir / ckpt.DATA_ITER).exists():
        raise FileNotFoundError(
            f"checkpoint {step_dir} holds no data-iterator state")
      snapshot = _IterState(_iter_state_of_other_count(step_dir))
      if snapshot.text is None:
        items[ckpt.DATA_ITER] = grain.checkpoint.CheckpointRestore(snapshot)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if "structures do not match" not in str(e):
        raise
      raise ckpt.CheckpointMismatchError(
          f"checkpoint {step_dir}: the saved params or optimizer state do not"
          " match this run's (was config.optim or config.lora changed since"
          " it was written? Resume with the same optimizer, or start a new"
          f" workdir with init_from={str(self.directory.parent)!r})"
      ) from e
    if data_iter is not None:
      _set_iter_state(data_iter, snapshot.text)
    return Restored(step=int(meta["step"]), epoch=int(meta["epoch"]),
                    params=ckpt.like_abstract(abstract_params, out[ckpt.PARAMS]),
                    opt_state=out[ckpt.OPT_STATE],
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
    for info in reversed(ckpt.list_checkpoints(self.directory)):
      if info.params_only or (not info.complete and info.error is None):
        continue
      try:
        if info.error is not None:
          raise ValueError(info.error)
        return self.restore(info.step, abstract_params=abstract_params,
                            abstract_opt_state=abstract_opt_state,
                            data_iter=data_iter)
      except ckpt.CheckpointMismatchError:
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
