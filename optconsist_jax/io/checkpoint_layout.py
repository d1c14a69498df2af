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
checkpoint aside and resumes from the newest readable full one. Saving and
resuming (CheckpointConfig, RunCheckpoints) are in io/checkpointer.py; this
module is the layout and how other jobs read it. `list_checkpoints(W)`
reports each step with its epoch (for epoch-end checkpoints; None otherwise),
its path and whether it is complete.

Model identity: each checkpoint stores a JSON dict describing the parameter tree
(`io.weights.identity`: the LlamaConfig fields plus LoRA settings). A
trainer resuming in W, or a job restoring params, that expects a different
identity is refused with a message naming the differing keys. Keys in
`RUNTIME_ONLY_KEYS` (compute dtype, scan vs loop, remat, attention kernel)
do not change the parameters and are ignored. A LlamaConfig key the
checkpoint does not record (written before that field existed) matches when
the config holds the field's default: a new field's default keeps the old
behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

from etils import epath
from flax import nnx
import jax
import orbax.checkpoint as ocp

from optconsist_jax import errors
from optconsist_jax import storage
from optconsist_jax import typed_config
from optconsist_jax.model.config import LlamaConfig

PARAMS = "params"
OPT_STATE = "opt_state"
DATA_ITER = "data_iter"
META = "meta"
CHECKPOINTS_DIR = "checkpoints"

# Model-config keys that do not change the parameter tree.
RUNTIME_ONLY_KEYS = frozenset(
    {"dtype", "scan_layers", "remat_policy", "attention_impl"})


# LlamaConfig field -> its default in JSON form, under the two sections that
# hold a model config: a model identity's "llama", a run identity's "model".
_MODEL_DEFAULTS = {
    f"{section}.{f.name}": typed_config.to_jsonable(f.default)
    for f in dataclasses.fields(LlamaConfig)
    if f.default is not dataclasses.MISSING for section in ("llama", "model")}
# Run-identity keys added later, with the default that keeps the old behaviour.
_MODEL_DEFAULTS["init_from.optimizer_state"] = "fresh"


class CheckpointMismatchError(errors.UserError):
  """A checkpoint was written for a different model (or run) than asked for."""


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
    if (k not in flat_f and k in _MODEL_DEFAULTS
        and flat_e.get(k) == _MODEL_DEFAULTS[k]):
      continue  # written before the field existed (module docstring)
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
  return storage.path(workdir) / CHECKPOINTS_DIR


def _resolve(path: str | os.PathLike, step: int | None) -> epath.Path:
  """W, W/checkpoints or W/checkpoints/<step> -> the step directory."""
  path = storage.path(path)
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
  f = storage.path(step_dir) / META / "metadata"
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
  root = storage.path(workdir)
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


def to_pure(tree: Any) -> Any:
  """nnx.State -> its plain nested dict (the on-disk form of params)."""
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def like_abstract(abstract: Any, restored: Any) -> Any:
  """Restored plain dict -> the container type of `abstract`."""
  if isinstance(abstract, nnx.State):
    out = jax.tree.map(lambda x: x, abstract)  # A copy to fill.
    nnx.replace_by_pure_dict(out, restored)
    return out
  return restored


def with_shardings(abstract: Any, shardings: Any | None) -> Any:
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
      `nnx.state(model.llama.abstract_model(...))`, returned as an
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
  target = to_pure(with_shardings(abstract_params, shardings))
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(step_dir / PARAMS,
                             args=ocp.args.PyTreeRestore(
                                 item=target,
                                 restore_args=ocp.checkpoint_utils
                                 .construct_restore_args(target)))
  return like_abstract(abstract_params, restored)




def step_of(workdir_or_ckpt_dir: str | os.PathLike, step: int | None) -> int:
  """The step of the checkpoint that W (or a step directory) and `step` name."""
  return int(read_meta(_resolve(workdir_or_ckpt_dir, step))["step"])


def restore_opt_state(workdir_or_ckpt_dir: str | os.PathLike, step: int | None,
                      abstract_opt_state: Any) -> tuple[Any, int]:
  """A run's saved optimizer state, laid out by the abstract tree's shardings.

  Args:
    workdir_or_ckpt_dir: W, W/checkpoints, or a step directory.
    step: the step to read; None = the newest complete one.
    abstract_opt_state: the optimizer-state tree of ShapeDtypeStructs (with
      shardings) the saved one must match (same optimizer, same routing).

  Returns:
    (the state, the step it was saved at).

  Raises:
    CheckpointMismatchError: the checkpoint holds no optimizer state (a
      params-only epoch checkpoint), or one of another structure.
  """
  step_dir = _resolve(workdir_or_ckpt_dir, step)
  meta = read_meta(step_dir)
  if not (step_dir / OPT_STATE).exists():
    raise CheckpointMismatchError(
        f"checkpoint {step_dir} holds no optimizer state (a params-only"
        " checkpoint); pick a complete one")
  target = with_shardings(abstract_opt_state, None)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(step_dir / OPT_STATE,
                               args=ocp.args.PyTreeRestore(
                                   item=target,
                                   restore_args=ocp.checkpoint_utils
                                   .construct_restore_args(target)))
  except ValueError as e:
    raise CheckpointMismatchError(
        f"checkpoint {step_dir}: its optimizer state does not match the"
        f" expected one ({errors.short_cause(e)})") from e
  return restored, int(meta["step"])
