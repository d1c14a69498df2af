"""The small reproduction's study: its typed config and the runs it implies.

`ReproConfig` is the typed form of configs/small_consistency.py; from it come
the bases (pretrained here or external), every finetuning run's train config
(one per base x method x learning rate x seed) and the populations that train
them together. optconsist_jax.experiments.reproduce runs the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
from typing import Any


from optconsist_jax import errors
from optconsist_jax.experiments import external_bases
from optconsist_jax.experiments import finetune_methods
from optconsist_jax.report import brackets
from optconsist_jax.report import tables as report
from optconsist_jax import typed_config


# What one retention document is (EvalSettings.retention_unit).
RETENTION_UNITS = ("file", "paragraph")


# ---------------------------------------------------------------------------
# Typed config.


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """How the bases are pretrained.

  Attributes:
    optimizers: one base per optimizer (a preset or any optimizer name).
    steps, seq_len, global_batch_size: the run's length and batch.
    lr: peak learning rate, unless `lrs` names the optimizer.
    lrs: optimizer -> peak learning rate (families differ in scale).
    seeds: pretraining seeds per optimizer.
  """

  optimizers: tuple[str, ...] = ("adamw", "muon")
  steps: int = 200
  seq_len: int = 256
  global_batch_size: int = 16
  lr: float = 3e-3
  lrs: Mapping[str, float] = dataclasses.field(default_factory=dict)
  seeds: int = 1

  def peak_lr(self, optimizer: str) -> float:
    return float(self.lrs.get(optimizer, self.lr))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """How every base is finetuned (`lrs`: method -> its learning-rate grid).

  epoch_budgets: () = one run of `epochs` epochs per (LR, seed) with a
    checkpoint per epoch (an epoch-1 point is then mid-schedule, not cooled
    down); else one run per budget E in it, each its own whole schedule of
    E epochs evaluated at its end, so every frontier point is an
    end-of-schedule model (`plan_runs`).
  lora_head: LoRA adapts the LM head too (default: the linear layers of
    the blocks only).
  refine_rounds: rounds of learning-rate refinement near each base's
    common learning level L (experiments/refine.py; 0 = off). After the
    grid is trained and evaluated, each (base, method) whose frontier on
    some seed brackets L with two checkpoints more than `refine_max_width`
    apart in learning, from two learning rates adjacent on that method's
    grid on that base, gets their geometric midpoint for every seed; those
    runs train (one population per method[, budget], as the grid's
    do) and evaluate, L and the brackets are recomputed, and so on for up
    to this many rounds (fewer when no bracket needs a midpoint). Only
    midpoints between learning rates already on the grid: a bracket wider
    than the bar at the grid's ends (L beyond a frontier) needs a wider
    grid, which the report already flags ("L outside"), not a guess.
  refine_max_width: the bracket width (learning distance, in the units of
    `EvalSettings.learning_metric`: nats for a loss) that refinement aims
    at; default report/brackets.py MAX_WIDTH, issue #27's bar.
  """

  methods: tuple[str, ...] = ("adamw", "muon", "lora")
  lrs: Mapping[str, tuple[float, ...]] = dataclasses.field(
      default_factory=dict)
  seeds: int = 1
  epochs: int = 3
  train_examples: int = 1200
  levels: tuple[int, ...] = (1,)
  seq_len: int = 256
  global_batch_size: int = 16
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  epoch_budgets: tuple[int, ...] = ()
  lora_head: bool = False
  refine_rounds: int = 0
  refine_max_width: float = brackets.MAX_WIDTH

  def __post_init__(self):
    if self.refine_rounds < 0:
      raise ValueError(f"reproduce config.finetune.refine_rounds="
                       f"{self.refine_rounds}: need 0 (off) or more")
    if not self.refine_max_width >= 0:  # NaN too
      raise ValueError(f"reproduce config.finetune.refine_max_width="
                       f"{self.refine_max_width}: need a width >= 0")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Eval sizes; the headline learning metric of the plot and table.

  learning_metric: "math/metamath/acc" (exact-match accuracy, the paper's),
    or "-math/response_loss" (minus the held-out finetuning loss), which
    separates runs where a tiny model's accuracy is near zero. Both are
    recorded for every checkpoint.
  probes: the eval job's update probes of every checkpoint against its base
    (evaluate/config.py ProbesEvalConfig; the report's mechanism table).
  retention_unit: what one held-out retention document is
    (`retention.documents`): "file" (one held-out stdlib file's docstrings;
    the corpus has ~27) or "paragraph" (one blank-line-separated paragraph
    of them, ~500: enough items for the report to resample).
  """

  math_examples: int = 48
  max_new_tokens: int = 48
  retention_docs: int = 26
  retention_max_len: int = 256
  learning_metric: str = "math/metamath/acc"
  probes: bool = True
  retention_unit: str = "file"

  def __post_init__(self):
    if self.retention_unit not in RETENTION_UNITS:
      raise ValueError(f"reproduce config.eval.retention_unit="
                       f"{self.retention_unit!r}: expected one of"
                       f" {RETENTION_UNITS}")


# A base model given on the command line (experiments/external_bases.py).
ExternalBase = external_bases.ExternalBase


@dataclasses.dataclass(frozen=True)
class ReproConfig:
  """configs/small_consistency.py, typed.

  optim_kwargs: optimizer name -> keyword arguments of that optimizer,
    for pretraining and finetuning alike (e.g. Adagrad's accumulator start).
  bases: external bases (`reproduce.bases`, experiments/external_bases.py:
    NAME:PATH, or a base of the provenance table labelled from it); empty =
    pretrain our own.
  matrix: `reproduce.matrix`, the report's consistency matrix: "auto"
    (drawn from 3 pretraining optimizers on), "always" (the matrix modes)
    or "never".
  eval_workers: `reproduce.eval_workers`, processes that evaluate the runs
    side by side (experiments/eval_pool.py; CPU devices only, 1 elsewhere).
  """

  mode: str
  seed: int
  tokenizer_path: str
  model: Mapping[str, Any]
  pretrain: PretrainConfig
  finetune: FinetuneConfig
  eval: EvalSettings
  memorization: bool
  fingerprints: bool
  optim_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=dict)
  bases: tuple[ExternalBase, ...] = ()
  matrix: str = "auto"
  eval_workers: int = 1

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ReproConfig:
    d = dict(d)
    in_reproduce = ("bases", "matrix", "eval_workers")
    known = ({f.name for f in dataclasses.fields(cls)} - set(in_reproduce)
             ) | {"reproduce"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"reproduce config: unknown keys {unknown}; valid"
                       f" keys: {sorted(known)}")
    reproduce = typed_config.as_dict(d.get("reproduce"))
    unknown = sorted(set(reproduce) - set(in_reproduce))
    if unknown:
      raise ValueError(f"reproduce config.reproduce: unknown keys {unknown};"
                       f" known: {list(in_reproduce)}")
    eval_workers = reproduce.get("eval_workers", 1)
    if (isinstance(eval_workers, bool) or not isinstance(eval_workers, int)
        or eval_workers < 1):
      raise ValueError(f"reproduce config.reproduce.eval_workers="
                       f"{eval_workers!r}: need an integer >= 1")
    matrix = reproduce.get("matrix") or "auto"
    if matrix not in report.MATRIX_MODES:
      raise ValueError(f"reproduce config.reproduce.matrix={matrix!r}:"
                       f" expected one of {report.MATRIX_MODES}")

    def section(typ, name):
      sd = {k: tuple(v) if isinstance(v, list) else v
            for k, v in typed_config.as_dict(d.get(name)).items()}
      return typed_config.from_dict(typ, sd, f"reproduce config.{name}")

    ft = section(FinetuneConfig, "finetune")
    lrs = {m: tuple(float(x) for x in v) for m, v in dict(ft.lrs).items()}
    missing = [m for m in ft.methods if not lrs.get(m)]
    if missing:
      raise ValueError(f"reproduce config.finetune.lrs: no learning rates for"
                       f" methods {missing}")
    pretrain = section(PretrainConfig, "pretrain")
    for key, n in (("pretrain.seeds", pretrain.seeds),
                   ("finetune.seeds", ft.seeds)):
      if n < 1:
        raise ValueError(f"reproduce config.{key}={n}: need at least 1")
    # deferred: optim pulls in jax; config files import study without it.
    from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
    for key, names in (("finetune.methods", ft.methods),
                       ("pretrain.optimizers", pretrain.optimizers)):
      for name in names:
        try:
          if key == "finetune.methods":
            name = finetune_methods.parse(name)[0]
          presets.preset(name)
        except ValueError as e:
          raise ValueError(f"reproduce config.{key}: {e}") from None
    optim_kwargs = {k: dict(v) for k, v in
                    typed_config.as_dict(d.get("optim_kwargs")).items()}
    return cls(
        mode=d.get("mode", "quick"), seed=int(d.get("seed", 0)),
        tokenizer_path=d.get("tokenizer_path", ""),
        model=dict(d["model"]),
        pretrain=dataclasses.replace(
            pretrain, lrs={k: float(v) for k, v in dict(pretrain.lrs).items()}),
        finetune=dataclasses.replace(ft, lrs=lrs),
        eval=section(EvalSettings, "eval"),
        memorization=bool(dict(d.get("memorization") or {}).get("enabled")),
        fingerprints=bool(dict(d.get("fingerprints") or {}).get("enabled")),
        optim_kwargs=optim_kwargs,
        bases=parse_bases(reproduce.get("bases") or ""),
        matrix=matrix,
        eval_workers=eval_workers,
    )


def parse_bases(spec: str | Sequence[str]) -> tuple[ExternalBase, ...]:
  """`adamw:PATH,Qwen/Qwen2.5-7B` -> external bases (external_bases.parse)."""
  return external_bases.parse(spec)


# ---------------------------------------------------------------------------
# Run plan.


@dataclasses.dataclass(frozen=True)
class Base:
  """A base model: one of our pretraining runs, or an external checkpoint.

  Attributes:
    name: its label in the report (the pretraining optimizer).
    seed: pretraining seed (0 for an external base).
    workdir: our pretraining run's workdir, or the external path.
    kind: init_from kind of `workdir` (orbax, hf or nanogpt).
    tokenizer_path: the tokenizer the base was trained with ("" = shipped).
    config: our pretraining run's train config; None for an external base.
  """

  name: str
  seed: int
  workdir: str
  kind: str
  tokenizer_path: str
  config: dict[str, Any] | None = None

  @property
  def run_name(self) -> str:
    return f"{self.name}-base__s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Run:
  """One finetuning run (labels: base, method, lr, seed)."""

  name: str
  workdir: str
  labels: dict[str, Any]
  config: dict[str, Any]
  base: Base


def _optim_dict(rc: ReproConfig, method: str, lr: float) -> dict[str, Any]:
  """The optim section: the preset of `method`'s family (schedules over the
  whole run), adjusted for its variant (experiments/finetune_methods.py)."""
  # deferred: optim pulls in jax; config files import study without it.
  from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
  family, _ = finetune_methods.parse(method)
  kwargs = rc.optim_kwargs.get(method) or rc.optim_kwargs.get(family)
  return finetune_methods.optim_dict(method, presets.preset(
      family, peak_lr=lr, kwargs=dict(kwargs) if kwargs else None).to_dict())


def _common(rc: ReproConfig, seed: int) -> dict[str, Any]:
  return dict(
      model=dict(rc.model), mesh=dict(preset="dp"),
      checkpoint=dict(every_steps=1_000_000, keep=1, keep_epochs=True,
                      async_save=False),
      train=dict(seed=seed, log_every=10, stats_every=50,
                 progress_every_secs=30.0, parameter_overview=False))


def pretrain_run_config(rc: ReproConfig, optimizer: str,
                        seed: int) -> dict[str, Any]:
  p = rc.pretrain
  d = _common(rc, seed)
  d["optim"] = _optim_dict(rc, optimizer, p.peak_lr(optimizer))
  d["data"] = dict(format="stdlib", split="train", seq_len=p.seq_len,
                   global_batch_size=p.global_batch_size, seed=seed,
                   tokenizer_path=rc.tokenizer_path)
  d["train"].update(num_steps=p.steps, num_epochs=0)
  d["checkpoint"].update(keep_epochs=False)
  return d


def finetune_run_config(rc: ReproConfig, base: Base, method: str, lr: float,
                        seed: int, train_file: str,
                        epochs: int | None = None) -> dict[str, Any]:
  """One finetuning run; `epochs` a budget of `finetune.epoch_budgets` (its
  own schedule, only its end checkpointed), None: `finetune.epochs`."""
  f = rc.finetune
  d = _common(rc, seed)
  if epochs is not None:
    d["checkpoint"].update(keep_epochs=False)
  if base.config is None:  # external: its own architecture
    d["model"] = dict(preset="from_init")
  d["optim"] = _optim_dict(rc, method, lr)
  d["data"] = dict(format="metamathqa", path=train_file, seq_len=f.seq_len,
                   global_batch_size=f.global_batch_size, seed=seed,
                   tokenizer_path=base.tokenizer_path)
  d["train"].update(num_epochs=f.epochs if epochs is None else epochs,
                    num_steps=0)
  d["init_from"] = dict(path=base.workdir, kind=base.kind,
                        optimizer_state=finetune_methods.optimizer_state(
                            method))
  if method == "lora":
    d["lora"] = dict(rank=f.lora_rank, alpha=f.lora_alpha,
                     dropout=f.lora_dropout)
    if f.lora_head:
      # deferred: model pulls in jax; config files import study without it.
      from optconsist_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
      d["lora"]["targets"] = lora_lib.DEFAULT_TARGETS + ("head",)
    if f.lora_dropout:
      d["train"]["dropout_seed"] = seed
  return d


def run_name(base: str, method: str, lr: float, seed: int,
             epochs: int | None = None) -> str:
  budget = "" if epochs is None else f"__e{epochs}"
  return f"{base}-base__{method}__lr{lr:g}{budget}__s{seed}"


def plan_bases(rc: ReproConfig, workdir: str) -> list[Base]:
  """Our pretraining runs (optimizer-major, then seed), or the external ones."""
  if rc.bases:
    # deferred: io.weights pulls in jax; the plan loads without it.
    from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
    out = []
    for b in rc.bases:
      kind = weights.kind_of(b.path)
      out.append(Base(b.name, 0, b.path, kind, external_bases.tokenizer_of(
          b.path, kind, rc.tokenizer_path)))
    return out
  return [Base(opt, rc.seed + k,
               os.path.join(workdir, "bases", f"{opt}__s{rc.seed + k}"),
               "orbax", rc.tokenizer_path,
               pretrain_run_config(rc, opt, rc.seed + k))
          for opt in rc.pretrain.optimizers
          for k in range(rc.pretrain.seeds)]


def lr_grid(rc: ReproConfig, base: str, method: str,
            extra_lrs: Mapping[tuple[str, str], Sequence[float]] | None = None
            ) -> list[float]:
  """`method`'s learning rates on `base`: its `finetune.lrs` and the
  `extra_lrs` of (base, method) (grid refinement), increasing."""
  extra = (extra_lrs or {}).get((base, method), ())
  return sorted(set(rc.finetune.lrs[method]) | {float(x) for x in extra})


def plan_runs(rc: ReproConfig, workdir: str, train_file: str,
              extra_lrs: Mapping[tuple[str, str], Sequence[float]]
              | None = None) -> tuple[list[Base], list[Run]]:
  """Every base, and every finetuning run (base, method, lr, seed[, budget]).

  Finetuning seed seed + i starts from pretraining seed
  seed + (i mod pretrain.seeds). With `finetune.epoch_budgets` each
  (base, method, lr, seed) is one run per budget (labels["epochs"]).
  extra_lrs: (base name, method) -> learning rates added to that method's
    grid on that base (`lr_grid`; experiments/refine.py).
  """
  budgets = rc.finetune.epoch_budgets or (None,)
  bases = plan_bases(rc, workdir)
  by_name: dict[str, list[Base]] = {}
  for b in bases:
    by_name.setdefault(b.name, []).append(b)
  runs = []
  for name, seeds in by_name.items():
    for method in rc.finetune.methods:
      if not finetune_methods.applies(method, name):
        continue  # a base-state variant on another family's base
      for i in range(rc.finetune.seeds):
        seed = rc.seed + i
        base = seeds[i % len(seeds)]
        for lr in lr_grid(rc, name, method, extra_lrs):
          for epochs in budgets:
            rn = run_name(name, method, lr, seed, epochs)
            labels = dict(base=name, method=method, lr=lr, seed=seed,
                          base_seed=base.seed)
            if epochs is not None:
              labels["epochs"] = epochs
            runs.append(Run(
                rn, os.path.join(workdir, "runs", rn), labels,
                finetune_run_config(rc, base, method, lr, seed, train_file,
                                    epochs),
                base))
  return bases, runs


def population_groups(rc: ReproConfig, bases: Sequence[Base],
                      runs: Sequence[Run]) -> list[tuple[str, list]]:
  """The populations, in order: each optimizer's pretraining seeds, then per
  (method[, epoch budget]) every base x finetuning seed x learning rate, each
  member from its own pretraining seed's base (a population's runs share
  their length and architecture, train/population.py; the bases this study
  pretrains share one architecture, so one population holds them all and
  compiles once). External bases (`reproduce.bases`) may differ in
  architecture: one population per (base, method[, budget]) then."""
  groups: dict[str, list] = {}
  for b in bases:
    if b.config is not None:
      groups.setdefault(f"{b.name}-base", []).append(b)
  for r in runs:
    key = (f"{r.base.name}-base" if rc.bases else "bases") + (
        f"__{r.labels['method']}")
    if "epochs" in r.labels:
      key += f"__e{r.labels['epochs']}"
    groups.setdefault(key, []).append(r)
  return list(groups.items())


def check_bases(rc: ReproConfig, bases: Sequence[Base]) -> None:
  """External bases: readable architecture, vocabulary covers the tokenizer."""
  # deferred: io.weights pulls in jax; the plan loads without it.
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  for b in bases:
    if b.config is not None:
      continue
    where = f"reproduce config.reproduce.bases: {b.name}:{b.workdir}"
    try:
      model = weights.model_config_of(b.workdir, b.kind)
      tokenizer = load_tokenizer(b.tokenizer_path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
      raise ValueError(f"{where}: not a readable {b.kind} base"
                       f" ({errors.one_line(e)})") from None
    if model.vocab_size < tokenizer.vocab_size:
      raise ValueError(
          f"{where}: its vocabulary ({model.vocab_size}) is smaller than its"
          f" tokenizer's ({tokenizer.vocab_size} pieces,"
          f" {b.tokenizer_path or 'the shipped tiny tokenizer'})")


def load_tokenizer(tokenizer_path: str):
  """The tokenizer at `tokenizer_path` ("" = the shipped tiny one)."""
  # deferred: data.pipeline pulls in jax; the plan loads without it.
  from optconsist_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_tokenizer(pipeline.DataConfig(
      format="stdlib", tokenizer_path=tokenizer_path))
