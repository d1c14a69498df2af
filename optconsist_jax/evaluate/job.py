"""The eval job's pieces: the run being evaluated and the Evaluator.

`read_run` parses a run's W/config.json (train.py's resolved config) with the
training config parser (config_types.ExperimentConfig) into the `RunInfo` the
job needs: model, LoRA, labels, length. An `Evaluator` restores models onto
the eval mesh through io.weights (checkpoints with LoRA merged, the base
model of any weight source kind), runs the evals (evals.suite), with
`probes.enabled` the update probes of each checkpoint against the run's base
(evaluate/probes.py; the base, its singular vectors and its init are loaded
once per job), and writes the results: one object per checkpoint (W/eval/results/<name>.json, see
evaluate/results.py), its predictions (W/eval/predictions/<name>.jsonl) and
clu scalars, each written whole through optconsist_jax.storage (a local
folder or a bucket).
optconsist_jax.evaluate runs it over a workdir.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import json
import os
import time
from typing import Any

from etils import epath
from flax import nnx
import jax
import numpy as np

from optconsist_jax.train import config as config_types
from optconsist_jax import metric_writers
from optconsist_jax.evaluate import results
from optconsist_jax import sharding
from optconsist_jax import storage
from optconsist_jax import typed_config
from optconsist_jax.data import pipeline as data_lib
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.suite import EvalData
from optconsist_jax.evaluate.suite import eval_settings
from optconsist_jax.evaluate.suite import headline
from optconsist_jax.evaluate.suite import load_eval_data
from optconsist_jax.evaluate.suite import probe_base
from optconsist_jax.evaluate.suite import ProbeBase
from optconsist_jax.evaluate.suite import run_evals
from optconsist_jax.evaluate.suite import run_probes
from optconsist_jax.evaluate import probes as probes_lib
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import hub
from optconsist_jax.io import weights
from optconsist_jax.model import architecture

EVAL_DIR = "eval"
RUN_CONFIG_FILE = "config.json"
# The last base the probes prepared (key, ProbeBase): a study evaluates
# many runs of one base in one process, each with its own Evaluator; its
# base, init SVDs and held-out batches are the same (one base held at once).
_LAST_PROBE_BASE: list[tuple[str, ProbeBase]] = []


def _existing_source(source: weights.InitFromConfig
                     ) -> weights.InitFromConfig | None:
  """`source` with its kind resolved; None when it names no path."""
  if not source.path:
    return None
  if not hub.is_hub_ref(source.path) and not storage.exists(source.path):
    raise FileNotFoundError(f"base model {source.path} does not exist")
  return dataclasses.replace(
      source, kind=weights.kind_of(source.path, source.kind))


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What the eval job needs from a run's resolved config.

  Attributes:
    config: the run's config, parsed as train.py parses it.
    model: its model config (LlamaConfig or DeepseekV3Config).
    lora: its LoRA settings as a dict (None: a full finetune).
    identity: the model identity its checkpoints record (io.weights.identity).
    method: label: "lora", or the optimizer of the hidden matrices.
    lr: label: that group's peak learning rate.
    final_step: the run's last step (None: unknown).
    steps_per_epoch: for num_epochs runs.
    seed: the run's `train.seed` (results rows carry it; the report pairs
      methods by it).
  """

  config: config_types.ExperimentConfig
  model: architecture.ModelConfig
  lora: dict[str, Any] | None
  identity: dict[str, Any]
  method: str
  lr: float
  final_step: int | None
  steps_per_epoch: float | None
  seed: int = 0

  @property
  def data(self) -> data_lib.DataConfig:
    return self.config.data

  @property
  def init_from(self) -> weights.InitFromConfig:
    return self.config.init_from


def read_run(workdir: str | os.PathLike) -> RunInfo:
  """Parses W/config.json (train.py's resolved config)."""
  path = storage.path(workdir) / RUN_CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: is {workdir} a training workdir? (train.py writes"
        " it before the first step)")
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON: {e}") from None
  return run_info(d, os.fspath(path))


def run_info(d: Mapping[str, Any], path: str) -> RunInfo:
  """A RunInfo from a resolved train config (config.json or a checkpoint's).

  Args:
    d: the resolved config dict.
    path: where it was read, for messages.
  """
  for key in ("model", "train"):
    if key not in d:
      raise ValueError(f"{path}: missing section {key!r}")
  try:
    config = config_types.ExperimentConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None
  lora = typed_config.to_jsonable(config.lora) if config.lora else None
  optim = config.optim
  total = config.train.num_steps or max(
      (g.schedule.total_steps for g in optim.groups.values()), default=0)
  epochs = config.train.num_epochs
  spe = (total / epochs if total and epochs and not config.train.num_steps
         else None)
  return RunInfo(
      config=config, model=config.model, lora=lora,
      identity=weights.identity(config.model, lora),
      method="lora" if lora else optim.label(),
      lr=float(optim.groups[optim.label_group()].schedule.peak),
      final_step=total or None, steps_per_epoch=spe,
      seed=int(config.train.seed))


class Evaluator:
  """Restores models onto the eval mesh and runs the evals on them."""

  def __init__(self, workdir: str | os.PathLike, config: EvalConfig, *,
               run: RunInfo | None = None, tokenizer=None,
               data: EvalData | None = None):
    self.workdir = storage.path(workdir)
    self.config = config
    self.run = run or read_run(workdir)
    self.eval_dir = self.workdir / EVAL_DIR
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = config.mesh.rules
    self.tokenizer = tokenizer or self._tokenizer()
    if self.tokenizer.vocab_size > self.run.model.vocab_size:
      raise ValueError(
          f"the tokenizer has {self.tokenizer.vocab_size} tokens but the"
          f" model's vocab_size is {self.run.model.vocab_size}")
    self.data = data or load_eval_data(config, self.run.data,
                                       os.fspath(self.eval_dir / "data"))
    self._writer = None
    self._probe_base: ProbeBase | None = None
    self._probe_skip = ""  # why the probes are off for this job, once said

  def _tokenizer(self):
    """The config's tokenizer_path, else the run's (data.load_tokenizer)."""
    return data_lib.load_tokenizer(dataclasses.replace(
        self.run.data,
        tokenizer_path=self.config.tokenizer_path or self.run.data
        .tokenizer_path))

  def checkpoint_run(self, step_dir: str | os.PathLike) -> RunInfo:
    """The run that wrote a checkpoint: the config its meta records.

    W/config.json describes only the latest invocation of train.py; each
    checkpoint keeps the config it was written with (train.py), so labels
    and the model come from there. Checkpoints without one (older
    versions) fall back to W/config.json.
    """
    meta = ckpt_lib.read_meta(step_dir)
    if isinstance(meta.get("config"), dict):
      return run_info(meta["config"], f"{step_dir}/meta/metadata")
    return self.run

  def checkpoint_model(self, step_dir: str | os.PathLike,
                       run: RunInfo | None = None) -> nnx.Module:
    """The (merged) model of one step directory, on the eval mesh."""
    run = run or self.checkpoint_run(step_dir)
    return weights.restore_run_model(
        step_dir, run.model, lora=run.lora, mesh=self.mesh, rules=self.rules,
        model_identity=run.identity)

  def base_source(self) -> weights.InitFromConfig | None:
    """The base model's weight source (kind resolved), or None.

    `config.base_model` (its kind detected), else the run's init_from with
    its kind and step.
    """
    path = self.config.base_model
    if path.lower() == "none":
      return None
    return _existing_source(weights.InitFromConfig(path=path) if path
                            else self.run.init_from)

  def base_model(self, source: weights.InitFromConfig) -> nnx.Module:
    """The base model of `source` on the eval mesh."""
    return weights.load_model(source, self.run.model, mesh=self.mesh,
                              rules=self.rules)

  # -- probes --------------------------------------------------------------

  def probe_base_source(self) -> weights.InitFromConfig | None:
    """The probes' base: `config.base_model` when it names one, else the
    run's init_from (`base_model="none"` only skips scoring the base)."""
    path = self.config.base_model
    return _existing_source(weights.InitFromConfig(path=path)
                            if path and path.lower() != "none"
                            else self.run.init_from)

  def probe_init(self, source: weights.InitFromConfig) -> Any | None:
    """The base's init params when its checkpoint says how it began, or None.

    Only this project's own pretraining runs (an Orbax base whose recorded
    config has no init_from and no LoRA) record that: their init is
    `make_model(model, seed=train.seed)` (train/state.py), rebuilt
    here on the eval mesh. A Hugging Face or nanoGPT base does not say.
    """
    if source.kind != "orbax":
      return None
    step_dir = _step_dir(source.path, source.step)
    meta = ckpt_lib.read_meta(step_dir)
    if not isinstance(meta.get("config"), dict):
      return None
    base_run = run_info(meta["config"], f"{step_dir}/meta/metadata")
    if base_run.init_from.path or base_run.lora:
      return None
    return probes_lib.init_params(base_run.model, base_run.seed,
                                  mesh=self.mesh, rules=self.rules)

  def probes(self, model: nnx.Module,
             progress: Callable[[str], None] | None = None
             ) -> dict[str, float]:
    """The probes of `model` against the run's base, with their seconds.

    `probe_seconds` is this checkpoint's probe time; the first call also
    records `probe_setup_seconds` (loading the base and its init, their
    SVDs, the held-out batches). {} when the run has no base (a
    random-init run), said once.
    """
    c = self.config.probes
    first = self._probe_base is None
    note = ""
    if first and not self._probe_skip:
      t0 = time.perf_counter()
      source = self.probe_base_source()
      if source is None:
        self._probe_skip = ("probes: the run starts from a random init (no"
                            " base model); skipped")
        note = self._probe_skip
      else:
        key = repr((source, c, self.config.mesh, self.run.model,
                    self.tokenizer.vocab_size,
                    hash(tuple(self.data.documents))))
        if _LAST_PROBE_BASE and _LAST_PROBE_BASE[0][0] == key:
          self._probe_base = _LAST_PROBE_BASE[0][1]
          note = f"probes: base {source.path} (prepared before)"
        else:
          _LAST_PROBE_BASE.clear()  # Free the previous base first.
          init = self.probe_init(source) if c.pretrain_overlap else None
          self._probe_base = probe_base(
              self.base_model(source), source.path, self.tokenizer,
              self.data.documents, c, init=init, mesh=self.mesh,
              rules=self.rules)
          self._probe_base.seconds = time.perf_counter() - t0
          _LAST_PROBE_BASE.append((key, self._probe_base))
          note = (f"probes: base {source.path} prepared"
                  + ("" if self._probe_base.has_init else
                     " (its init is unknown: no pretraining-overlap probe)")
                  + f" ({self._probe_base.seconds:.1f} s)")
      if progress is not None:
        progress(f"  {note}")
    if self._probe_base is None:
      return {}
    t0 = time.perf_counter()
    out = run_probes(model, self._probe_base, c)
    out["probe_seconds"] = time.perf_counter() - t0
    if first and not note.endswith("(prepared before)"):
      out["probe_setup_seconds"] = self._probe_base.seconds
    if progress is not None:
      progress(f"  probes: {len(out)} numbers vs {self._probe_base.source}"
               f" ({out['probe_seconds']:.1f} s)")
    return out

  # -- results files -------------------------------------------------------

  def done(self) -> list[results.EvalRecord]:
    """Records already written (objects, and an old results.jsonl)."""
    return [r for r, _ in results.read_eval_dir(self.workdir)]

  def _write(self, record: results.EvalRecord, predictions: list[dict]):
    """Predictions, then the record (which marks the checkpoint done).

    Each is one whole-object write, never appended to or renamed (object
    stores have neither); two jobs that evaluate the same checkpoint write
    the same names.
    """
    if jax.process_index() != 0:
      return
    name = results.object_name(record.step, record.is_base, record.checkpoint)
    storage.write_text(
        self.eval_dir / "predictions" / f"{name}.jsonl",
        "".join(json.dumps(p, default=_json_default) + "\n"
                for p in predictions))
    results.write_record(self.workdir, record)
    if self._writer is None:
      self._writer = metric_writers.MetricWriter(self.eval_dir / "metrics")
    prefix = "base/" if record.is_base else ""
    self._writer.write_scalars(record.step, {
        prefix + k: v for k, v in {**record.metrics, "learning":
                                   record.learning, "retention":
                                   record.retention}.items()})
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  # -- one evaluation ------------------------------------------------------

  def evaluate_model(self, model: nnx.Module, *, step: int, epoch: float,
                     checkpoint: str, is_base: bool,
                     run: RunInfo | None = None,
                     progress: Callable[[str], None] | None = None
                     ) -> results.EvalRecord:
    """Runs the evals on `model` and writes its results object.

    `progress`: called with a line per finished eval (evals.suite.run_evals).
    """
    self.eval_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics, predictions = run_evals(model, self.tokenizer, self.data,
                                     self.config, mesh=self.mesh,
                                     progress=progress)
    metrics["eval_seconds"] = time.perf_counter() - t0
    if self.config.probes.enabled and not is_base:
      metrics.update(self.probes(model, progress))
    learning, lname, retention, rname = headline(metrics, self.config)
    c = self.config
    run = run or self.run
    record = results.EvalRecord(
        step=int(step), epoch=float(epoch),
        method="base" if is_base else (c.method or run.method),
        base=c.base, lr=0.0 if is_base else float(
            c.lr if c.lr is not None else run.lr),
        learning=float(learning), retention=float(retention),
        learning_metric=lname, retention_metric=rname,
        metrics={k: float(v) for k, v in metrics.items()},
        run=self.workdir.name, checkpoint=checkpoint, is_base=is_base,
        settings=eval_settings(c, self.tokenizer), seed=run.seed,
        items=results.item_scores(predictions),
        base_id=results.base_identity(
            checkpoint if is_base else run.init_from.path))
    self._write(record, predictions)
    return record

  def epoch_of(self, info: ckpt_lib.CheckpointInfo) -> float:
    """Epochs at a checkpoint: exact at epoch ends, else step / epoch length.

    The epoch length comes from the checkpoint's meta `steps_per_epoch` when
    the trainer stores it, else from the run's config (num_epochs runs);
    failing both, the completed epochs in meta.
    """
    if info.epoch is not None:
      return float(info.epoch)
    meta = ckpt_lib.read_meta(info.path)
    run = (run_info(meta["config"], os.fspath(info.path))
           if isinstance(meta.get("config"), dict) else self.run)
    spe = meta.get("steps_per_epoch") or run.steps_per_epoch
    if spe:
      return info.step / float(spe)
    return float(meta.get("epoch", 0))


def _step_dir(path: str, step: int | None) -> epath.Path:
  """W, W/checkpoints or a step directory -> the step directory (newest
  complete one unless `step`)."""
  p = storage.path(path)
  if (p / ckpt_lib.META).exists():
    return p
  done = [c for c in ckpt_lib.list_checkpoints(p) if c.complete
          and (step is None or c.step == step)]
  if not done:
    raise FileNotFoundError(f"no complete checkpoint"
                            f"{'' if step is None else f' of step {step}'}"
                            f" under {path}")
  return done[-1].path


def _json_default(x):
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  raise TypeError(f"not JSON-able: {type(x).__name__}")

