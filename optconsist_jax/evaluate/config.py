"""The eval job's config: which evals, on which data, labelled how.

The dataclasses' defaults are the eval job's defaults (the CPU reproduction:
small synthetic sets, the MetaMath answer format, held-out standard-library
text); `default_config()` is the same as an ml_collections.ConfigDict for
`--config.x.y=...` overrides (optconsist_jax.evaluate's default --config).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import typing
from typing import Any

import ml_collections

from optconsist_jax import sharding
from optconsist_jax import typed_config
from optconsist_jax.data import formats
from optconsist_jax.evaluate import math as math_lib

SYNTHETIC = "synthetic"
MC_BENCHMARKS = ("hellaswag", "arc_challenge", "winogrande")
# Which score of each benchmark enters mc/mean (Biderman et al. 2024).
MC_MEAN_SCORE = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm",
                 "winogrande": "acc"}
# Config keys holding local paths (made absolute at the command line).
PATH_KEYS = ("tokenizer_path", "base_model", "math.test", "math.train",
             "multiple_choice.hellaswag", "multiple_choice.arc_challenge",
             "multiple_choice.winogrande", "lm_loss.path")
# The eval mesh unless the config says otherwise.
MESH_PRESET = "fsdp"
# Path-key values that name a built-in source, not a file.
BUILT_IN_SOURCES = (SYNTHETIC, "stdlib", "none")


MATH_FORMATS = {"gsm8k": formats.read_gsm8k,
                "metamathqa": formats.read_metamathqa}


@dataclasses.dataclass(frozen=True)
class MathEvalConfig:
  """Learning: GSM8K-format accuracy.

  Attributes:
    protocols: subset of evaluate.math.PROTOCOLS; empty = no math eval.
    test: GSM8K-format test jsonl, "synthetic", or "" (no math eval).
    train: GSM8K-format train jsonl for the few shots, or "synthetic".
    num_shots: k of the few-shot protocol.
    shot_seed: which shots (evaluate.math.sample_shots).
    limit: first items of the test set (0 = all; also the synthetic size).
    batch_size: generation batch.
    max_new_tokens: 0 = the protocol's published budget (512 / 256).
    format: of the `test` file: "gsm8k" (jsonl question/answer) or
      "metamathqa" (MetaMathQA's records, responses in the training format).
    response_loss: also report math/response_loss, the teacher-forced NLL
      of the gold responses under the training prompt (evaluate.math
      .response_loss): a smooth learning measure for small models.
  """

  protocols: tuple[str, ...] = ("metamath",)
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

  hellaswag: str = SYNTHETIC
  arc_challenge: str = SYNTHETIC
  winogrande: str = SYNTHETIC
  limit: int = 100
  batch_size: int = 16
  add_bos: bool | None = None
  max_len: int = 1024


@dataclasses.dataclass(frozen=True)
class HarnessEvalConfig:
  """Tasks scored by lm-evaluation-harness itself (evaluate/harness.py).

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
    max_len: tokens per scored window (at most the model's context).
    batch_size: windows per forward (the multiple-choice scorer's default
      too: both run the same compiled programs).
  """

  path: str = "stdlib"
  limit: int = 50
  max_len: int = 512
  batch_size: int = 16


# The probes of evaluate/probes.py, as `probes.which` names them.
PROBE_KINDS = ("geometry", "second_order", "activations")


@dataclasses.dataclass(frozen=True)
class ProbesEvalConfig:
  """Mechanism: probes of each checkpoint's update against its base.

  Off by default (opt in with `probes.enabled=True`). The base is
  `base_model` when it names one, else the run's init_from (also when
  `base_model="none"` only skips scoring the base); a run from a random
  init has no base and is probed by nothing. Held-out text is the LM-loss
  eval's documents (`lm_loss.path`), packed into full rows.

  Attributes:
    enabled: compute the probes for every finetuned checkpoint.
    which: subset of PROBE_KINDS: "geometry" (update vs the base's singular
      subspaces, stable rank, spectral norm, overlap with the pretraining
      displacement), "second_order" (first/second-order predicted vs
      measured loss change, curvature ratio; one Hessian-vector product
      per batch), "activations" (residual-stream statistic drift).
    fractions: top-k subspace sizes as fractions of min(m, n).
    pretrain_overlap: with a base that is one of this project's Orbax
      pretraining runs (its checkpoint records its init seed), also the
      overlap with W_base - W_init.
    hvp_batches: held-out batches the second-order and activation probes
      average over.
    batch_size: rows per batch.
    seq_len: tokens per row (at most the model's context).
    layer_batch: layers decomposed at once (0: one per device of the mesh).
  """

  enabled: bool = False
  which: tuple[str, ...] = PROBE_KINDS
  fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
  pretrain_overlap: bool = True
  hvp_batches: int = 1
  batch_size: int = 8
  seq_len: int = 128
  layer_batch: int = 0

  def __post_init__(self):
    for key in ("which", "fractions"):
      value = getattr(self, key)
      if isinstance(value, (str, float, int)):
        value = (value,)
      object.__setattr__(self, key, tuple(value))
    object.__setattr__(self, "fractions",
                       tuple(float(f) for f in self.fractions))
    bad = sorted(set(self.which) - set(PROBE_KINDS))
    if bad:
      raise ValueError(f"eval config.probes.which: unknown {bad}; valid:"
                       f" {PROBE_KINDS}")
    if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
      raise ValueError(f"eval config.probes.fractions={self.fractions}: each"
                       " must be in (0, 1]")
    for key in ("hvp_batches", "batch_size", "seq_len"):
      if getattr(self, key) < 1:
        raise ValueError(f"eval config.probes.{key}={getattr(self, key)};"
                         " must be >= 1")
    if self.layer_batch < 0:
      raise ValueError(f"eval config.probes.layer_batch={self.layer_batch};"
                       " must be >= 0")


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
    probes: the mechanism probes (ProbesEvalConfig; off by default).
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

  mesh: sharding.MeshConfig = sharding.MeshConfig.preset(MESH_PRESET)
  tokenizer_path: str = ""
  math: MathEvalConfig = MathEvalConfig()
  multiple_choice: MultipleChoiceEvalConfig = MultipleChoiceEvalConfig()
  lm_loss: LMLossEvalConfig = LMLossEvalConfig()
  harness: HarnessEvalConfig = HarnessEvalConfig()
  probes: ProbesEvalConfig = ProbesEvalConfig()
  learning_metric: str = ""
  retention_metric: str = ""
  method: str = ""
  base: str = "unknown"
  lr: float | None = None
  base_model: str = ""
  watch: WatchConfig = WatchConfig()

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> EvalConfig:
    """From a config dict; unknown keys are named (`eval config.math: ...`)."""
    return typed_config.from_dict(cls, d, "eval config")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The eval job's default `--config`: `default_config()`."""
  del arg
  return default_config()


def default_config() -> ml_collections.ConfigDict:
  """`EvalConfig()` as a ConfigDict; None fields are typed placeholders.

  The mesh is `{"preset": MESH_PRESET}` (the default's preset).
  """
  return _config_dict(EvalConfig())


def _config_dict(x: Any) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  hints = typing.get_type_hints(type(x))
  for f in dataclasses.fields(x):
    value = getattr(x, f.name)
    if isinstance(value, sharding.MeshConfig):
      # Overridable as --config.mesh.preset=dp (MeshConfig.from_dict).
      setattr(c, f.name, ml_collections.ConfigDict({"preset": MESH_PRESET}))
    elif dataclasses.is_dataclass(value):
      setattr(c, f.name, _config_dict(value))
    elif value is None:
      kind = next(t for t in typing.get_args(hints[f.name])
                  if t is not type(None))
      setattr(c, f.name, ml_collections.config_dict.placeholder(kind))
    else:
      setattr(c, f.name, value)
  return c
