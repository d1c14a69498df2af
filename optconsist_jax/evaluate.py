r"""The eval job: learning and retention of every checkpoint of a run.

  python -m optconsist_jax.evaluate --workdir W [--watch] \
      [--config path/to/eval_config.py[:arg]] [--config.math.limit=50 ...]

Runs beside training (another process, its own mesh) or after it:

1. Reads W/config.json (written by train.py): the model, LoRA settings, the
   tokenizer, the optimizer (for the plot's labels) and the run's length.
2. Loads the eval data once (fails fast on a missing file): GSM8K-format math
   items (and few-shot examples), multiple-choice retention sets, held-out text.
   "synthetic" sources are generated (optconsist_jax.data.synthetic, disjoint
   from the run's synthetic training set) and written to W/eval/data/.
3. Evaluates the base model first (a Hugging Face folder or an Orbax
   checkpoint: `config.base_model`, default the run's `init_from`), so every
   plot has its starting point.
4. For every complete checkpoint in W/checkpoints not yet in
   W/eval/results.jsonl: restores params only (checkpoints.restore_params,
   resharded onto the eval mesh), merges LoRA adapters into the base weights
   (model.lora.merge), runs the evals, writes the per-item predictions to
   W/eval/predictions/step_<N>.jsonl and then appends one line (the
   `report.EvalRecord` schema) to W/eval/results.jsonl, plus clu scalars
   (W/eval/metrics, keyed by the training step). A crash loses at most the
   checkpoint being evaluated: rerunning skips those already in results.jsonl.
5. Half-written checkpoints (Orbax temporary directories) are never read. A
   finalized checkpoint that cannot be read (missing or truncated
   meta/metadata, a corrupt array, another model) is reported on one line
   with its step and cause (errors.short_cause, not TensorStore's spec dump)
   and the rest are evaluated; with --watch it is tried again on the next
   `watch.retries` passes, then given up. Without --watch the job evaluates
   what is there and exits (saying so when there is nothing); with --watch it
   polls every `watch.poll_secs` until the run's final step is evaluated or
   given up, or nothing new arrived for `watch.idle_timeout_secs` (0: keep
   waiting).
6. Labels (method, LR) and the model/LoRA shapes of each checkpoint come
   from the config recorded in its meta (train.py writes it), so a later
   train.py invocation rewriting W/config.json cannot mislabel it.

Metric names: math/<protocol>/acc, mc/<benchmark>/acc, acc_norm and acc_bytes,
mc/mean (the retention average of Biderman et al. 2024: acc_norm for HellaSwag
and ARC, acc for WinoGrande), lm_loss/loss and lm_loss/perplexity, and for
tasks scored by lm-evaluation-harness itself (`harness.tasks`, needs the
`harness` extra) harness/<task>/<metric>[/<filter>] as the harness reports
them. The headline learning score defaults to the first math protocol's
accuracy; the headline retention score to mc/mean, else minus the LM loss
(any metric can be named instead). Each results row states its BOS settings
and the harness version in `settings`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import jax
import ml_collections
import numpy as np

from optconsist_jax.io import checkpoints as ckpt_lib
from optconsist_jax import config_types
from optconsist_jax import errors
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import paths
from optconsist_jax import platforms
from optconsist_jax import report
from optconsist_jax import sharding
from optconsist_jax import typed_config
from optconsist_jax.data import formats
from optconsist_jax.data.records import MathExample
from optconsist_jax.data.records import MultipleChoice
from optconsist_jax.evals import lm_loss as lm_loss_lib
from optconsist_jax.evals import math as math_lib
from optconsist_jax.evals import multiple_choice as mc_lib
from optconsist_jax.generate import GenerationConfig
from optconsist_jax.model import LlamaConfig

EVAL_DIR = "eval"
RUN_CONFIG_FILE = "config.json"
MC_BENCHMARKS = ("hellaswag", "arc_challenge", "winogrande")
# Which score of each benchmark enters mc/mean (Biderman et al. 2024).
MC_MEAN_SCORE = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm",
                 "winogrande": "acc"}
SYNTHETIC = "synthetic"
# Config keys holding local paths (made absolute at the command line).
PATH_KEYS = ("tokenizer_path", "base_model", "math.test", "math.train",
             "multiple_choice.hellaswag", "multiple_choice.arc_challenge",
             "multiple_choice.winogrande", "lm_loss.path")


# ---------------------------------------------------------------------------
# Config.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default eval config (small, synthetic data: the CPU reproduction)."""
  del arg
  c = ml_collections.ConfigDict()
  c.mesh = dict(preset="fsdp")
  c.tokenizer_path = ""
  # The tiny runs learn the MetaMath format; add "gsm8k_fewshot" for
  # pretrained bases (its 5-shot prompt needs a long context).
  c.math = dict(protocols=("metamath",), test=SYNTHETIC,
                train=SYNTHETIC, num_shots=5, shot_seed=1234, limit=100,
                batch_size=16, max_new_tokens=0)
  c.multiple_choice = dict(hellaswag=SYNTHETIC, arc_challenge=SYNTHETIC,
                           winogrande=SYNTHETIC, limit=100, batch_size=16,
                           add_bos=ml_collections.config_dict.placeholder(bool),
                           max_len=1024)
  # Tasks scored by lm-evaluation-harness itself (pip install '.[harness]').
  c.harness = dict(tasks=(), include_path=(), include_defaults=True,
                   num_fewshot=ml_collections.config_dict.placeholder(int),
                   limit=0, batch_size=16, gen_batch_size=8, max_len=2048,
                   max_gen_toks=256,
                   add_bos=ml_collections.config_dict.placeholder(bool),
                   fewshot_seed=1234)
  c.lm_loss = dict(path="stdlib", limit=50, max_len=512, batch_size=8)
  c.learning_metric = ""
  c.retention_metric = ""
  c.method = ""
  c.base = "unknown"
  c.lr = ml_collections.config_dict.placeholder(float)
  c.base_model = ""
  c.watch = dict(poll_secs=60.0, idle_timeout_secs=0.0, retries=2)
  return c


def _typed(cls, d: Mapping[str, Any] | None, section: str):
  return typed_config.from_dict(cls, d, f"eval config.{section}")


MATH_FORMATS = {"gsm8k": formats.read_gsm8k,
                "metamathqa": formats.read_metamathqa}


@dataclasses.dataclass(frozen=True)
class MathEvalConfig:
  """Learning: GSM8K-format accuracy.

  Attributes:
    protocols: subset of evals.math.PROTOCOLS; empty = no math eval.
    test: GSM8K-format test jsonl, "synthetic", or "" (no math eval).
    train: GSM8K-format train jsonl for the few shots, or "synthetic".
    num_shots: k of the few-shot protocol.
    shot_seed: which shots (evals.math.sample_shots).
    limit: first items of the test set (0 = all; also the synthetic size).
    batch_size: generation batch.
    max_new_tokens: 0 = the protocol's published budget (512 / 256).
    format: of the `test` file: "gsm8k" (jsonl question/answer) or
      "metamathqa" (MetaMathQA's records, responses in the training format).
    response_loss: also report math/response_loss, the teacher-forced NLL
      of the gold responses under the training prompt (evals.math
      .response_loss): a smooth learning measure for small models.
  """

  protocols: tuple[str, ...] = ("gsm8k_fewshot",)
  test: str = SYNTHETIC
  train: str = SYNTHETIC
  num_shots: int = 5
  shot_seed: int = 1234
  limit: int = 100
  batch_size: int = 16
  max_new_tokens: int = 0
  format: str = "gsm8k"
  response_loss: bool = False

  def __post_init__(self):
    object.__setattr__(self, "protocols", tuple(self.protocols))
    if self.format not in MATH_FORMATS:
      raise ValueError(f"eval config.math.format={self.format!r}; valid:"
                       f" {list(MATH_FORMATS)}")
    bad = sorted(set(self.protocols) - set(math_lib.PROTOCOLS))
    if bad:
      raise ValueError(f"eval config.math.protocols: unknown {bad}; valid:"
                       f" {math_lib.PROTOCOLS}")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceEvalConfig:
  """Retention: log-likelihood multiple choice ("" skips a benchmark).

  Attributes:
    hellaswag: HellaSwag jsonl, "synthetic" or "".
    arc_challenge: ARC jsonl, "synthetic" or "".
    winogrande: WinoGrande jsonl, "synthetic" or "".
    limit: first items of each set (0 = all; also the synthetic size).
    batch_size: rows per forward.
    add_bos: BOS before each context; None = lm-evaluation-harness's default
      for the tokenizer (since v0.4.9.2 the tokenizer's own: BOS for Llama's,
      none for GPT-2's).
    max_len: longest scored sequence.
  """

  hellaswag: str = ""
  arc_challenge: str = ""
  winogrande: str = ""
  limit: int = 0
  batch_size: int = 16
  add_bos: bool | None = None
  max_len: int = 1024


@dataclasses.dataclass(frozen=True)
class HarnessEvalConfig:
  """Tasks scored by lm-evaluation-harness itself (evals/harness.py).

  Attributes:
    tasks: task or group names the harness knows ("hellaswag",
      "arc_challenge", "winogrande", "gsm8k", ...) or defines in
      `include_path`; empty = none.
    include_path: directories of task YAML files (e.g. a harness task with
      `dataset_path: json` and local `data_files`).
    include_defaults: also index the harness's built-in tasks (tens of
      seconds once per job; False when every task is in `include_path`).
    num_fewshot: overrides the tasks' few-shot count (None = the task's).
    limit: first items of each task (0 = all).
    batch_size: rows per scoring forward.
    gen_batch_size: prompts decoded together.
    max_len: context length (the harness's `max_length`).
    max_gen_toks: generated tokens when a task does not say.
    add_bos: BOS first; None = the harness's default for the tokenizer.
    fewshot_seed: the harness's `fewshot_random_seed`.
  """

  tasks: tuple[str, ...] = ()
  include_path: tuple[str, ...] = ()
  include_defaults: bool = True
  num_fewshot: int | None = None
  limit: int = 0
  batch_size: int = 16
  gen_batch_size: int = 8
  max_len: int = 2048
  max_gen_toks: int = 256
  add_bos: bool | None = None
  fewshot_seed: int = 1234

  def __post_init__(self):
    for key in ("tasks", "include_path"):
      value = getattr(self, key)
      if isinstance(value, str):
        value = (value,) if value else ()
      object.__setattr__(self, key, tuple(value))


@dataclasses.dataclass(frozen=True)
class LMLossEvalConfig:
  """Retention: held-out LM loss.

  Attributes:
    path: a text file (.txt: blank-line-separated documents, .jsonl with
      `text`; formats.read_text), "stdlib" (held-out Python standard-library
      docstrings, data.corpus) or "" (skip).
    limit: first documents (0 = all).
    max_len: tokens per scored window.
    batch_size: windows per forward.
  """

  path: str = ""
  limit: int = 0
  max_len: int = 1024
  batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class WatchConfig:
  """Polling with --watch.

  Attributes:
    poll_secs: seconds between looks at W/checkpoints.
    idle_timeout_secs: stop when nothing new arrived for this long (0: wait
      until the run's final step is evaluated or given up).
    retries: an unreadable checkpoint is tried again on this many later
      passes before it is given up (reported each time).
  """

  poll_secs: float = 60.0
  idle_timeout_secs: float = 0.0
  retries: int = 2


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Everything the eval job is told (besides the run's own config.json).

  Attributes:
    mesh: the eval mesh (independent of the training mesh).
    tokenizer_path: SentencePiece model or Hub model repo; "" = the run's
      data.tokenizer_path
      (itself "" = the shipped tiny tokenizer).
    math, multiple_choice, lm_loss, harness: the evals (see their types).
    learning_metric: the headline learning metric name ("" = auto).
    retention_metric: the headline retention metric ("" = auto; a name
      starting with "-" means minus that metric, e.g. "-lm_loss/loss").
    method: label of the finetuning method ("" = from the run: "lora", or
      the optimizer of the hidden matrices).
    base: label of the base model's pretraining optimizer.
    lr: label of the peak learning rate (None = from the run's optimizer).
    base_model: base model to evaluate as the starting point: a Hugging Face
      folder or an Orbax run/step directory; "" = the run's init_from;
      "none" = skip.
    watch: polling with --watch.
  """

  mesh: sharding.MeshConfig
  tokenizer_path: str = ""
  math: MathEvalConfig = MathEvalConfig()
  multiple_choice: MultipleChoiceEvalConfig = MultipleChoiceEvalConfig()
  lm_loss: LMLossEvalConfig = LMLossEvalConfig()
  harness: HarnessEvalConfig = HarnessEvalConfig()
  learning_metric: str = ""
  retention_metric: str = ""
  method: str = ""
  base: str = "unknown"
  lr: float | None = None
  base_model: str = ""
  watch: WatchConfig = WatchConfig()

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> EvalConfig:
    d = dict(d)
    nested = {"mesh", "math", "multiple_choice", "lm_loss", "harness",
              "watch"}
    typed_config.check_keys(cls, d, "eval config")
    flat = {k: v for k, v in d.items() if k not in nested}
    return cls(
        mesh=sharding.MeshConfig.from_dict(d.get("mesh") or
                                           {"preset": "fsdp"}),
        math=_typed(MathEvalConfig, d.get("math"), "math"),
        multiple_choice=_typed(MultipleChoiceEvalConfig,
                               d.get("multiple_choice"), "multiple_choice"),
        lm_loss=_typed(LMLossEvalConfig, d.get("lm_loss"), "lm_loss"),
        harness=_typed(HarnessEvalConfig, d.get("harness"), "harness"),
        watch=_typed(WatchConfig, d.get("watch"), "watch"),
        **flat)


# ---------------------------------------------------------------------------
# The run being evaluated.


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What the eval job needs from W/config.json."""

  model: LlamaConfig
  lora: dict[str, Any] | None
  identity: dict[str, Any]
  data: dict[str, Any]
  init_from: dict[str, Any]
  method: str
  lr: float
  final_step: int | None
  steps_per_epoch: float | None
  seed: int = 0


def _optim_labels(optim: Mapping[str, Any]) -> tuple[str, float]:
  """(optimizer of the hidden matrices, its peak LR) from an optim section."""
  groups = optim.get("groups") or {}
  routes = [tuple(r) for r in optim.get("routes") or []]
  name = next((g for sel, g in routes if sel == "hidden_matrix"), None)
  if name is None and routes:
    name = routes[0][1]
  if name is None and groups:
    name = sorted(groups)[0]
  group = groups.get(name, {}) if name else {}
  peak = (group.get("schedule") or {}).get("peak", 0.0)
  return str(group.get("optimizer", name or "unknown")), float(peak or 0.0)


def read_run(workdir: str | os.PathLike) -> RunInfo:
  """Parses W/config.json (train.py's resolved config)."""
  path = epath.Path(workdir) / RUN_CONFIG_FILE
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
    model = LlamaConfig.from_dict(d["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: model: {e}") from None
  lora = d.get("lora") or None
  method, lr = _optim_labels(d.get("optim") or {})
  if lora:
    method = "lora"
  train = d["train"]
  total = int(train.get("num_steps") or 0)
  if not total:
    totals = [int((g.get("schedule") or {}).get("total_steps") or 0)
              for g in (d.get("optim") or {}).get("groups", {}).values()]
    total = max(totals, default=0)
  epochs = int(train.get("num_epochs") or 0)
  spe = total / epochs if total and epochs and not train.get("num_steps") \
      else None
  return RunInfo(model=model, lora=lora,
                 identity={"llama": d["model"], "lora": lora},
                 data=dict(d.get("data") or {}),
                 init_from=dict(d.get("init_from") or {}), method=method,
                 lr=lr, final_step=total or None, steps_per_epoch=spe,
                 seed=int(train.get("seed") or 0))


# ---------------------------------------------------------------------------
# Eval data.


@dataclasses.dataclass
class EvalData:
  math_test: list[MathExample]
  math_shots: list[MathExample]
  mc_items: list[MultipleChoice]
  documents: list[str]


def _limit(xs: list, n: int) -> list:
  return xs[:n] if n else xs


def load_eval_data(config: EvalConfig, run: RunInfo,
                   data_dir: str) -> EvalData:
  """Reads (or generates) every eval set once."""
  from optconsist_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  seed = int(run.data.get("seed", 0) or 0)

  def synthetic_file(name: str, records: list[dict]) -> str:
    path = os.path.join(data_dir, name)
    synthetic._write_jsonl(path, records)  # pylint: disable=protected-access
    return path

  m = config.math
  math_test, shots = [], []
  if m.test and m.protocols:
    if m.test == SYNTHETIC or m.train == SYNTHETIC:
      # Disjoint from the run's synthetic training problems (same generator
      # call as data.pipeline's synthetic format).
      n_train = int(run.data.get("synthetic_examples", 20000) or 20000)
      train_p, test_p = synthetic.make_splits(n_train, m.limit or 200, seed)
    test_path = (synthetic_file("gsm8k_test.jsonl",
                                [synthetic.render_gsm8k(p) for p in test_p])
                 if m.test == SYNTHETIC else m.test)
    math_test = _limit(MATH_FORMATS[m.format if m.test != SYNTHETIC
                                    else "gsm8k"](test_path), m.limit)
    if "gsm8k_fewshot" in m.protocols:
      train_path = (synthetic_file(
          "gsm8k_train.jsonl",
          [synthetic.render_gsm8k(p) for p in train_p[:1000]])
                    if m.train == SYNTHETIC else m.train)
      shots = math_lib.sample_shots(formats.read_gsm8k(train_path),
                                    m.num_shots, m.shot_seed)
  c = config.multiple_choice
  readers = {"hellaswag": (formats.read_hellaswag, synthetic.hellaswag_records),
             "arc_challenge": (formats.read_arc, synthetic.arc_records),
             "winogrande": (formats.read_winogrande,
                            synthetic.winogrande_records)}
  items = []
  for k, bench in enumerate(MC_BENCHMARKS):
    src = getattr(c, bench)
    if not src:
      continue
    read, make = readers[bench]
    path = (synthetic_file(f"{bench}.jsonl", make(c.limit or 100, seed + 1 + k))
            if src == SYNTHETIC else src)
    for item in _limit(read(path), c.limit):
      # Readers name ARC "arc"; our metric names say which ARC.
      items.append(dataclasses.replace(item, benchmark=bench))
  docs = []
  if config.lm_loss.path == "stdlib":
    from optconsist_jax.data import corpus  # pylint: disable=g-import-not-at-top
    docs = corpus.python_stdlib_text("heldout")
  elif config.lm_loss.path:
    docs = formats.read_text(config.lm_loss.path)
  docs = _limit(docs, config.lm_loss.limit)
  return EvalData(math_test, shots, items, docs)


# ---------------------------------------------------------------------------
# Running the evals on one model.


def run_evals(model: nnx.Module, tokenizer, data: EvalData,
              config: EvalConfig, *, mesh: jax.sharding.Mesh | None = None
              ) -> tuple[dict[str, float], list[dict]]:
  """All configured evals of one model: (metrics, per-item predictions).

  `mesh`: the eval mesh, over whose batch axes the harness tasks shard their
  batches (None: jit places them).
  """
  metrics: dict[str, float] = {}
  predictions: list[dict[str, Any]] = []
  m = config.math
  for protocol in m.protocols if data.math_test else ():
    gen_config = math_lib.default_generation(protocol)
    gen_config = dataclasses.replace(
        gen_config, batch_size=m.batch_size,
        max_new_tokens=m.max_new_tokens or gen_config.max_new_tokens)
    r = math_lib.accuracy(model, tokenizer, data.math_test, protocol,
                          shots=data.math_shots, generation=gen_config)
    metrics[f"math/{protocol}/acc"] = r.accuracy
    metrics[f"math/{protocol}/tokens_per_second"] = r.tokens_per_second
    predictions += [{"eval": f"math/{protocol}", **p} for p in r.predictions]
  if m.response_loss and data.math_test:
    metrics["math/response_loss"] = math_lib.response_loss(
        model, tokenizer, data.math_test, batch_size=m.batch_size).loss
  if data.mc_items:
    c = config.multiple_choice
    r = mc_lib.evaluate(model, tokenizer, data.mc_items, add_bos=c.add_bos,
                        batch_size=c.batch_size, max_len=c.max_len)
    for bench, s in r.scores.items():
      metrics[f"mc/{bench}/acc"] = s["acc"]
      metrics[f"mc/{bench}/acc_norm"] = s["acc_norm"]
      metrics[f"mc/{bench}/acc_bytes"] = s["acc_bytes"]
    metrics["mc/mean"] = float(np.mean(
        [r.scores[b][MC_MEAN_SCORE[b]] for b in r.scores]))
    predictions += [{"eval": f"mc/{p['benchmark']}", **p}
                    for p in r.predictions]
  if config.harness.tasks:
    harness_lib = _harness_lib()
    r = harness_lib.evaluate_tasks(model, tokenizer, config.harness,
                                   mesh=mesh, rules=config.mesh.rules)
    metrics.update(r.metrics)
    predictions += r.predictions
  if data.documents:
    c = config.lm_loss
    r = lm_loss_lib.evaluate(model, tokenizer, data.documents,
                             max_len=c.max_len, batch_size=c.batch_size)
    metrics["lm_loss/loss"] = r.loss
    metrics["lm_loss/perplexity"] = r.perplexity
    metrics["lm_loss/tokens"] = float(r.tokens)
  return metrics, predictions


def _harness_lib():
  try:
    from optconsist_jax.evals import harness  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"eval config.harness.tasks is set but {e}") from None
  return harness


def eval_settings(config: EvalConfig, tokenizer) -> dict[str, Any]:
  """How the scores were made, stated in every results row."""
  out: dict[str, Any] = {}
  c = config.multiple_choice
  if any(getattr(c, b) for b in MC_BENCHMARKS):
    out["mc_add_bos"] = (mc_lib.harness_add_bos(tokenizer)
                         if c.add_bos is None else c.add_bos)
  h = config.harness
  if h.tasks:
    import lm_eval  # pylint: disable=g-import-not-at-top
    out["harness"] = {
        "version": lm_eval.__version__, "tasks": list(h.tasks),
        "add_bos": (mc_lib.harness_add_bos(tokenizer) if h.add_bos is None
                    else h.add_bos),
        "num_fewshot": h.num_fewshot, "limit": h.limit, "max_len": h.max_len}
  return out


def _metric(metrics: Mapping[str, float], name: str, what: str) -> float:
  sign, key = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
  if key not in metrics:
    raise ValueError(f"eval config.{what}={name!r}: no such metric; have"
                     f" {sorted(metrics)}")
  return sign * float(metrics[key])


def headline(metrics: Mapping[str, float], config: EvalConfig
             ) -> tuple[float, str, float, str]:
  """(learning, its name, retention, its name), both higher-is-better."""
  lname = config.learning_metric or next(
      (f"math/{p}/acc" for p in config.math.protocols
       if f"math/{p}/acc" in metrics), "")
  rname = config.retention_metric or (
      "mc/mean" if "mc/mean" in metrics else
      "-lm_loss/loss" if "lm_loss/loss" in metrics else "")
  learning = _metric(metrics, lname, "learning_metric") if lname else 0.0
  retention = _metric(metrics, rname, "retention_metric") if rname else 0.0
  return learning, lname or "none", retention, rname or "none"


# ---------------------------------------------------------------------------
# Models from checkpoints and base folders.


class Evaluator:
  """Restores models onto the eval mesh and runs the evals on them."""

  def __init__(self, workdir: str | os.PathLike, config: EvalConfig, *,
               run: RunInfo | None = None, tokenizer=None,
               data: EvalData | None = None):
    self.workdir = epath.Path(workdir)
    self.config = config
    self.run = run or read_run(workdir)
    self.eval_dir = self.workdir / EVAL_DIR
    self.results_path = self.eval_dir / "results.jsonl"
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = config.mesh.rules
    self.tokenizer = tokenizer or self._tokenizer()
    if self.tokenizer.vocab_size > self.run.model.vocab_size:
      raise ValueError(
          f"the tokenizer has {self.tokenizer.vocab_size} tokens but the"
          f" model's vocab_size is {self.run.model.vocab_size}")
    self.data = data or load_eval_data(config, self.run,
                                       os.fspath(self.eval_dir / "data"))
    self._writer = None

  def _tokenizer(self):
    from optconsist_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    from optconsist_jax.io import hub  # pylint: disable=g-import-not-at-top
    path = self.config.tokenizer_path or self.run.data.get(
        "tokenizer_path", "")
    return Tokenizer.load(hub.tokenizer_file(path)) if path else Tokenizer.tiny()

  def _restore(self, path: str | os.PathLike, step: int | None,
               lora: Mapping[str, Any] | None, identity: dict[str, Any]
               ) -> nnx.Module:
    return ckpt_lib.restore_model(path, self.run.model, step=step, lora=lora,
                                  mesh=self.mesh, rules=self.rules,
                                  identity=identity)

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
    return ckpt_lib.restore_model(step_dir, run.model, lora=run.lora,
                                  mesh=self.mesh, rules=self.rules,
                                  identity=run.identity)

  def base_source(self) -> tuple[str, str, int | None] | None:
    """(kind, path, step) of the base model, or None."""
    path = self.config.base_model
    step = None
    if path.lower() == "none":
      return None
    if not path:
      path = self.run.init_from.get("path") or ""
      step = self.run.init_from.get("step")
      if not path:
        return None
    from optconsist_jax.io import hub  # pylint: disable=g-import-not-at-top
    if not hub.is_hub_ref(path) and not epath.Path(path).exists():
      raise FileNotFoundError(f"base model {path} does not exist")
    kind = config_types.init_kind(path)
    return kind, path, (step if kind == "orbax" else None)

  def base_model(self, kind: str, path: str, step: int | None) -> nnx.Module:
    m = self.run.model
    if kind == "hf":
      from optconsist_jax.io import hf  # pylint: disable=g-import-not-at-top
      _, model = hf.load(path, dtype=m.param_dtype, mesh=self.mesh,
                         rules=self.rules, compute_dtype=m.dtype,
                         scan_layers=m.scan_layers,
                         remat_policy=m.remat_policy,
                         attention_impl=m.attention_impl)
      return model
    if kind == "nanogpt":
      from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
      from optconsist_jax.model import Llama  # pylint: disable=g-import-not-at-top
      constrain = sharding.LogicalConstraint(self.mesh, self.rules)
      graphdef, abstract_params = nnx.split(nnx.eval_shape(
          lambda: Llama(m, rngs=nnx.Rngs(0), constrain=constrain)))
      params = nanogpt.load_params_into(
          path, abstract_params,
          sharding.state_shardings(abstract_params, self.mesh, self.rules),
          model_config=m)
      return nnx.merge(graphdef, params)
    return self._restore(path, step, None,
                         {"llama": self.run.identity["llama"], "lora": None})

  # -- results files -------------------------------------------------------

  def done(self) -> list[report.EvalRecord]:
    """Records already written (a torn last line from a crash is dropped)."""
    if not self.results_path.exists():
      return []
    text = self.results_path.read_text()
    if text and not text.endswith("\n"):
      keep = text[:text.rfind("\n") + 1]
      logging.warning("%s: dropping a half-written last line (crash during"
                      " a write)", self.results_path)
      if jax.process_index() == 0:
        self.results_path.write_text(keep)
    return report.read_results(os.fspath(self.results_path))

  def _append(self, record: report.EvalRecord, predictions: list[dict],
              name: str):
    if jax.process_index() != 0:
      return
    pred_dir = self.eval_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    tmp = pred_dir / f"{name}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(p, default=_json_default) + "\n"
                           for p in predictions))
    os.replace(os.fspath(tmp), os.fspath(pred_dir / f"{name}.jsonl"))
    # One write of a whole line: results.jsonl marks the checkpoint as done.
    with open(self.results_path, "a") as f:
      f.write(record.to_json() + "\n")
      f.flush()
      os.fsync(f.fileno())
    if self._writer is None:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.create_default_writer(
          os.fspath(self.eval_dir / "metrics"), just_logging=False)
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
                     checkpoint: str, is_base: bool, name: str,
                     run: RunInfo | None = None) -> report.EvalRecord:
    self.eval_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics, predictions = run_evals(model, self.tokenizer, self.data,
                                     self.config, mesh=self.mesh)
    metrics["eval_seconds"] = time.perf_counter() - t0
    learning, lname, retention, rname = headline(metrics, self.config)
    c = self.config
    run = run or self.run
    record = report.EvalRecord(
        step=int(step), epoch=float(epoch),
        method="base" if is_base else (c.method or run.method),
        base=c.base, lr=0.0 if is_base else float(
            c.lr if c.lr is not None else run.lr),
        learning=float(learning), retention=float(retention),
        learning_metric=lname, retention_metric=rname,
        metrics={k: float(v) for k, v in metrics.items()},
        run=self.workdir.name, checkpoint=checkpoint, is_base=is_base,
        settings=eval_settings(c, self.tokenizer), seed=run.seed)
    self._append(record, predictions, name)
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


def _json_default(x):
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  raise TypeError(f"not JSON-able: {type(x).__name__}")


# ---------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class JobResult:
  evaluated: list[int]
  failed: list[int]
  base_evaluated: bool


def evaluate_workdir(workdir: str | os.PathLike, config: EvalConfig, *,
                     watch: bool = False, evaluator: Evaluator | None = None,
                     sleep=time.sleep, clock=time.monotonic,
                     out=sys.stdout) -> JobResult:
  """Evaluates the base model and every new complete checkpoint of W."""
  ev = evaluator or Evaluator(workdir, config)
  records = ev.done()
  done_steps = {r.step for r in records if not r.is_base}
  result = JobResult([], [], False)
  say = lambda msg: print(msg, file=out, flush=True)  # noqa: E731

  base = ev.base_source()
  if base is not None and not any(
      r.is_base and r.checkpoint == base[1] for r in records):
    say(f"evaluating base model {base[1]} ({base[0]})")
    model = ev.base_model(*base)
    r = ev.evaluate_model(model, step=0, epoch=0.0, checkpoint=base[1],
                          is_base=True, name="base")
    say(f"base: learning {r.learning:.4f} ({r.learning_metric}), retention"
        f" {r.retention:.4f} ({r.retention_metric})")
    result.base_evaluated = True

  attempts: dict[int, int] = {}  # step -> failed reads so far
  given_up: set[int] = set()
  retries = config.watch.retries
  last_new = clock()
  said_waiting = False
  while True:
    infos = ckpt_lib.list_checkpoints(workdir)
    # Finalized but unreadable (meta missing or truncated), or complete.
    todo = [info for info in infos
            if (info.complete or info.error is not None)
            and info.step not in done_steps and info.step not in given_up]
    for info in todo:
      say(f"evaluating step {info.step} ({info.path})")
      try:
        if info.error is not None:
          raise ValueError(info.error)
        run = ev.checkpoint_run(info.path)
        model = ev.checkpoint_model(info.path, run)
      except Exception as e:  # pylint: disable=broad-except
        # Corrupt, truncated, or written for another model: report, go on.
        n = attempts[info.step] = attempts.get(info.step, 0) + 1
        cause = (info.error if info.error is not None
                 else errors.one_line(str(e)) if isinstance(
                     e, errors.UserError) else errors.short_cause(e))
        if n > retries or not watch:
          given_up.add(info.step)
          result.failed.append(info.step)
          then = "given up" if watch else "skipped (rerun to retry)"
        else:
          then = f"will retry on the next pass ({n} of {retries + 1} tries)"
        msg = (f"checkpoint step {info.step} ({info.path}) is unreadable:"
               f" {cause}; {then}")
        logging.error("%s", msg)
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
        continue
      r = ev.evaluate_model(model, step=info.step, epoch=ev.epoch_of(info),
                            checkpoint=os.fspath(info.path), is_base=False,
                            name=f"step_{info.step:08d}", run=run)
      done_steps.add(info.step)
      result.evaluated.append(info.step)
      last_new = clock()
      say(f"step {info.step}: learning {r.learning:.4f}"
          f" ({r.learning_metric}), retention {r.retention:.4f}"
          f" ({r.retention_metric})")
    if not watch:
      if not infos:
        say(f"no checkpoints in {ckpt_lib.checkpoint_dir(workdir)} (yet);"
            " rerun with --watch to wait for them")
      elif not todo:
        say("nothing new to evaluate")
      break
    final = ev.run.final_step
    if final is not None and final in done_steps:
      say(f"final step {final} evaluated; done")
      break
    if final is not None and final in given_up:
      say(f"final step {final} is unreadable (reported above); done")
      break
    idle = config.watch.idle_timeout_secs
    if idle and clock() - last_new >= idle:
      say(f"no new checkpoint for {idle:g} s; stopping")
      break
    if not said_waiting or todo:
      say(f"waiting for new checkpoints in {ckpt_lib.checkpoint_dir(workdir)}"
          f" (polling every {config.watch.poll_secs:g} s)")
      said_waiting = True
    sleep(config.watch.poll_secs)
  ev.close()
  return result


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", os.path.abspath(__file__),
      "Eval config file with get_config() (default: this module's).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory W.")
  flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  metrics_lib.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.parse_flags_with_absl()
  platforms.select_default()
  from optconsist_jax import train_step  # pylint: disable=g-import-not-at-top
  # A multi-host eval slice: every process restores its shards together.
  train_step.maybe_initialize_distributed()
  f = flags.FLAGS
  workdir = paths.resolve(f.workdir)
  with errors.user_input():
    config = EvalConfig.from_dict(paths.resolve_keys(
        f.config.to_dict(), PATH_KEYS, keep=(SYNTHETIC, "stdlib", "none")))
    try:
      ev = Evaluator(workdir, config)
    except report.EvalFileError as e:
      raise errors.UserError(str(e)) from e
  try:
    r = evaluate_workdir(workdir, config, watch=f.watch, evaluator=ev)
  except (report.EvalFileError, FileNotFoundError) as e:
    # results.jsonl that is not ours, a base model that is not there.
    raise errors.UserError(str(e)) from e
  print(f"evaluated {len(r.evaluated)} checkpoints"
        + (" and the base model" if r.base_evaluated else "")
        + (f"; {len(r.failed)} failed to restore: {r.failed}" if r.failed
           else "")
        + f". Results in {os.path.join(workdir, EVAL_DIR, 'results.jsonl')}",
        flush=True)


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
