r"""The small reproduction: pretrain, finetune every way over seeds, evaluate, report.

  python -m optconsist_jax.experiments.reproduce --config configs/small_consistency.py:quick \
      --workdir workdirs/small_consistency

Stages (each skipped when its outputs exist, so a rerun resumes):

  data          W/data/math_train.json, math_test.json (generated problems in
                MetaMathQA format, disjoint questions; fixed across seeds)
  pretrain      W/bases/{optimizer}__s{seed}/: the same tiny Llama pretrained
                on the Python standard library's docstrings with each
                optimizer, `pretrain.seeds` seeds each (one population per
                optimizer). Skipped entirely when `reproduce.bases` names
                external bases.
  finetune      W/runs/{base}-base__{method}__lr{lr}__s{seed}/: each base
                finetuned with every method over its learning-rate grid and
                `finetune.seeds` seeds, a checkpoint per epoch. All seeds and
                learning rates of one (base, method) train as one population
                (experiments.population.train_population).
  evaluate      W/runs/*/eval/results.jsonl (optconsist_jax.evaluate; each
                base model is evaluated once, in its first run)
  report        W/report/ (optconsist_jax.report.consistency_report)
  memorization  W/memorization/ (optconsist_jax.experiments.memorization)
  fingerprints  W/fingerprints/ (optconsist_jax.experiments.fingerprints)

Seeds. Finetuning seed s (s = seed + i, i < finetune.seeds) sets the run's
data order (data.seed), its adapter init (train.seed; LoRA's A matrices) and
its adapter dropout (train.dropout_seed), and starts from pretraining seed
seed + (i mod pretrain.seeds): with as many pretraining as finetuning seeds
the two pair one to one, so the spread over seeds covers both; with one
pretraining seed every finetuning seed starts from the same base.

External bases (`--config.reproduce.bases=adamw:PATH,muon:PATH`): each
NAME:PATH is a base model labelled NAME (the pretraining optimizer, so the
report knows which method is matched): a Hugging Face Llama folder or Hub
repo, a nanoGPT `ckpt.pt` or an Orbax run written by train.py (see
`config_types.InitFromConfig`). Pretraining is skipped; the finetuning runs
take the base's architecture (`model.preset="from_init"`) and its tokenizer
(the folder's tokenizer.model, the GPT-2 BPE files beside a ckpt.pt, the
Orbax run's data.tokenizer_path; otherwise `tokenizer_path`).

Each training run is an ordinary `optconsist_jax.train` workdir (its
config.json can be rerun with `python -m optconsist_jax.train`), marked done by
a `done.json` the driver writes after its population returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from optconsist_jax import errors
from optconsist_jax import paths as paths_lib
from optconsist_jax import typed_config

DONE_FILE = "done.json"
LABELS_FILE = "run_labels.json"


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
  """How every base is finetuned (`lrs`: method -> its learning-rate grid)."""

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


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Eval sizes; the headline learning metric of the plot and table.

  learning_metric: "math/metamath/acc" (exact-match accuracy, the paper's),
    or "-math/response_loss" (minus the held-out finetuning loss), which
    separates runs where a tiny model's accuracy is near zero. Both are
    recorded for every checkpoint.
  """

  math_examples: int = 48
  max_new_tokens: int = 48
  retention_docs: int = 26
  retention_max_len: int = 256
  learning_metric: str = "math/metamath/acc"


@dataclasses.dataclass(frozen=True)
class ExternalBase:
  """A base model given on the command line (NAME:PATH)."""

  name: str
  path: str


@dataclasses.dataclass(frozen=True)
class ReproConfig:
  """configs/small_consistency.py, typed.

  optim_kwargs: optimizer name -> keyword arguments of that optimizer,
    for pretraining and finetuning alike (e.g. Adagrad's accumulator start).
  bases: external bases (`reproduce.bases`); empty = pretrain our own.
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

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ReproConfig:
    d = dict(d)
    known = ({f.name for f in dataclasses.fields(cls)} - {"bases"}) | {
        "reproduce"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"reproduce config: unknown keys {unknown}; valid"
                       f" keys: {sorted(known)}")
    reproduce = typed_config.as_dict(d.get("reproduce"))
    unknown = sorted(set(reproduce) - {"bases"})
    if unknown:
      raise ValueError(f"reproduce config.reproduce: unknown keys {unknown};"
                       " known: ['bases']")

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
    from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
    for key, names in (("finetune.methods", ft.methods),
                       ("pretrain.optimizers", pretrain.optimizers)):
      for name in names:
        try:
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
    )


def parse_bases(spec: str | Sequence[str]) -> tuple[ExternalBase, ...]:
  """`adamw:PATH,muon:PATH` (or a list of NAME:PATH) -> external bases.

  Paths are resolved against the current directory (Hub references and URLs
  stay as they are); a local path must exist.
  """
  from optconsist_jax.io import hub  # pylint: disable=g-import-not-at-top
  key = "reproduce config.reproduce.bases"
  entries = ([e for e in spec.split(",") if e.strip()]
             if isinstance(spec, str) else list(spec))
  out = []
  for entry in entries:
    name, sep, path = str(entry).strip().partition(":")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise ValueError(f"{key}: entry {entry!r} is not NAME:PATH (e.g."
                       " adamw:path/to/ckpt.pt)")
    if any(b.name == name for b in out):
      raise ValueError(f"{key}: base name {name!r} given twice")
    local = paths_lib.resolve(path)
    if os.path.exists(local):
      path = local
    elif not (hub.is_hub_ref(path) or paths_lib.is_url(path)):
      raise ValueError(f"{key}: {name}:{path}: no such file or directory")
    out.append(ExternalBase(name, path))
  return tuple(out)


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
  """The optim section: the preset `method` (schedules over the whole run)."""
  from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
  kwargs = rc.optim_kwargs.get(method)
  return presets.preset(method, peak_lr=lr,
                        kwargs=dict(kwargs) if kwargs else None).to_dict()


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
                        seed: int, train_file: str) -> dict[str, Any]:
  f = rc.finetune
  d = _common(rc, seed)
  if base.config is None:  # external: its own architecture
    d["model"] = dict(preset="from_init")
  d["optim"] = _optim_dict(rc, method, lr)
  d["data"] = dict(format="metamathqa", path=train_file, seq_len=f.seq_len,
                   global_batch_size=f.global_batch_size, seed=seed,
                   tokenizer_path=base.tokenizer_path)
  d["train"].update(num_epochs=f.epochs, num_steps=0)
  d["init_from"] = dict(path=base.workdir, kind=base.kind)
  if method == "lora":
    d["lora"] = dict(rank=f.lora_rank, alpha=f.lora_alpha,
                     dropout=f.lora_dropout)
    if f.lora_dropout:
      d["train"]["dropout_seed"] = seed
  return d


def run_name(base: str, method: str, lr: float, seed: int) -> str:
  return f"{base}-base__{method}__lr{lr:g}__s{seed}"


def _external_tokenizer(rc: ReproConfig, path: str, kind: str) -> str:
  """The tokenizer that came with an external base (module docstring)."""
  from optconsist_jax.data import gpt2_bpe  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import hub  # pylint: disable=g-import-not-at-top
  if kind == "hf":
    if hub.is_hub_ref(path) or os.path.exists(
        os.path.join(path, "tokenizer.model")):
      return path  # a folder or repo means its tokenizer.model
  elif kind == "nanogpt":
    folder = os.path.dirname(path)
    if gpt2_bpe.is_gpt2_bpe_dir(folder):
      return folder
  else:
    for run_dir in (path, os.path.dirname(path),
                    os.path.dirname(os.path.dirname(path))):
      config_file = os.path.join(run_dir, "config.json")
      if os.path.exists(config_file):
        with open(config_file) as fh:
          data = json.load(fh).get("data") or {}
        return data.get("tokenizer_path", rc.tokenizer_path) or ""
  return rc.tokenizer_path


def plan_bases(rc: ReproConfig, workdir: str) -> list[Base]:
  """Our pretraining runs (optimizer-major, then seed), or the external ones."""
  if rc.bases:
    from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
    out = []
    for b in rc.bases:
      kind = weights.kind_of(b.path)
      out.append(Base(b.name, 0, b.path, kind,
                      _external_tokenizer(rc, b.path, kind)))
    return out
  return [Base(opt, rc.seed + k,
               os.path.join(workdir, "bases", f"{opt}__s{rc.seed + k}"),
               "orbax", rc.tokenizer_path,
               pretrain_run_config(rc, opt, rc.seed + k))
          for opt in rc.pretrain.optimizers
          for k in range(rc.pretrain.seeds)]


def plan_runs(rc: ReproConfig, workdir: str, train_file: str
              ) -> tuple[list[Base], list[Run]]:
  """Every base, and every finetuning run (base, method, lr, seed)."""
  bases = plan_bases(rc, workdir)
  by_name: dict[str, list[Base]] = {}
  for b in bases:
    by_name.setdefault(b.name, []).append(b)
  runs = []
  for name, seeds in by_name.items():
    for method in rc.finetune.methods:
      for i in range(rc.finetune.seeds):
        seed = rc.seed + i
        base = seeds[i % len(seeds)]
        for lr in rc.finetune.lrs[method]:
          rn = run_name(name, method, lr, seed)
          runs.append(Run(
              rn, os.path.join(workdir, "runs", rn),
              dict(base=name, method=method, lr=lr, seed=seed,
                   base_seed=base.seed),
              finetune_run_config(rc, base, method, lr, seed, train_file),
              base))
  return bases, runs


def population_groups(rc: ReproConfig, bases: Sequence[Base],
                      runs: Sequence[Run]) -> list[tuple[str, list]]:
  """The populations, in order: each optimizer's pretraining seeds, then per
  (base, base seed, method) every finetuning seed x learning rate."""
  groups: dict[str, list] = {}
  for b in bases:
    if b.config is not None:
      groups.setdefault(f"{b.name}-base", []).append(b)
  one_base_seed = len({(r.base.name, r.base.seed) for r in runs}) == len(
      {r.base.name for r in runs})
  for r in runs:
    key = (f"{r.base.name}-base__{r.labels['method']}" if one_base_seed else
           f"{r.base.name}-base__s{r.base.seed}__{r.labels['method']}")
    groups.setdefault(key, []).append(r)
  return list(groups.items())


def check_bases(rc: ReproConfig, bases: Sequence[Base]) -> None:
  """External bases: readable architecture, vocabulary covers the tokenizer."""
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
  from optconsist_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_tokenizer(pipeline.DataConfig(
      format="stdlib", tokenizer_path=tokenizer_path))


def unigram_retention_loss(rc: ReproConfig, tokenizer_path: str) -> float:
  """The retention loss of a unigram model of the pretraining corpus.

  The floor a base must beat to be a language model of its corpus: token
  frequencies of the docstrings' training split (add-one smoothed over the
  vocabulary), scored on exactly the tokens the eval job's retention loss
  scores (every token after BOS of the first `eval.retention_docs` held-out
  documents, EOS included; evals/lm_loss.py), in nats per token.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data import corpus  # pylint: disable=g-import-not-at-top
  tokenizer = load_tokenizer(tokenizer_path)
  counts = np.ones(tokenizer.vocab_size, np.float64)
  for doc in corpus.python_stdlib_text("train"):
    ids = tokenizer.encode(doc, eos=True)
    np.add.at(counts, np.asarray(ids, np.int64), 1.0)
  log_p = np.log(counts / counts.sum())
  targets = []
  for doc in corpus.python_stdlib_text("heldout")[:rc.eval.retention_docs]:
    targets += tokenizer.encode(doc, bos=True, eos=True)[1:]
  return float(-log_p[np.asarray(targets, np.int64)].mean())


# ---------------------------------------------------------------------------
# Stages.


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, DONE_FILE))


def _mark_done(path: str, info: dict[str, Any]) -> None:
  tmp = os.path.join(path, DONE_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(path, DONE_FILE))


def write_math_data(rc: ReproConfig, data_dir: str) -> tuple[str, str]:
  """Generated train/test problems (MetaMathQA format); skipped if present."""
  from optconsist_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  train_file = os.path.join(data_dir, "math_train.json")
  test_file = os.path.join(data_dir, "math_test.json")
  if os.path.exists(train_file) and os.path.exists(test_file):
    return train_file, test_file
  os.makedirs(data_dir, exist_ok=True)
  f = rc.finetune
  train, test = synthetic.make_splits(f.train_examples, rc.eval.math_examples,
                                      rc.seed, levels=f.levels)
  # Both in MetaMathQA's format (a JSON list); the questions are disjoint.
  for path, problems in ((test_file, test), (train_file, train)):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
      json.dump([synthetic.render_metamath(p) for p in problems], fh, indent=0)
    os.replace(tmp, path)
  return train_file, test_file


def train_population(members: Sequence[tuple[str, dict[str, Any],
                                             dict[str, Any]]]) -> bool:
  """Trains the (workdir, config, labels) not yet done as one population.

  Returns True when it trained any.
  """
  from optconsist_jax import config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import population  # pylint: disable=g-import-not-at-top
  todo = [m for m in members if not _done(m[0])]
  for workdir, _, _ in members:
    if _done(workdir):
      logging.info("skip (done): %s", workdir)
  if not todo:
    return False
  configs = []
  for workdir, config, labels in todo:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LABELS_FILE), "w") as fh:
      json.dump(labels, fh, indent=2)
    configs.append(config_types.ExperimentConfig.from_dict(config))
  t0 = time.time()
  results = population.train_population(configs, [m[0] for m in todo])
  seconds = time.time() - t0
  for (workdir, _, _), result in zip(todo, results):
    if result.stopped != "done":
      raise errors.Preempted(f"{workdir}: training stopped ({result.stopped});"
                             " rerun the same command to resume")
  for (workdir, _, _), result in zip(todo, results):
    _mark_done(workdir, {
        "steps": result.step, "population_size": len(todo),
        "population_seconds": seconds,
        "step_time_s": (result.perf or {}).get("step_time_s"),
        "final_loss": (result.losses[max(result.losses)]
                       if result.losses else None)})
  return True


def eval_config(rc: ReproConfig, run: Run, test_file: str, with_base: bool):
  """The eval job's config for one finetuning run (labels for the plot).

  with_base: also evaluate the run's base model (its init_from), once per
    base over all runs.
  """
  from optconsist_jax import evaluate  # pylint: disable=g-import-not-at-top
  labels = run.labels
  return evaluate.EvalConfig.from_dict(dict(
      mesh=dict(preset="dp"),
      tokenizer_path=run.base.tokenizer_path,
      math=dict(protocols=("metamath",), test=test_file, train="",
                format="metamathqa", response_loss=True,
                limit=rc.eval.math_examples, batch_size=16,
                max_new_tokens=rc.eval.max_new_tokens),
      multiple_choice=dict(hellaswag="", arc_challenge="", winogrande=""),
      lm_loss=dict(path="stdlib", limit=rc.eval.retention_docs,
                   max_len=rc.eval.retention_max_len, batch_size=8),
      learning_metric=rc.eval.learning_metric,
      retention_metric="-lm_loss/loss",
      method=labels["method"], base=labels["base"], lr=labels["lr"],
      base_model="" if with_base else "none"))


def evaluate_run(rc: ReproConfig, run: Run, test_file: str,
                 with_base: bool) -> bool:
  """Evaluates what is not evaluated yet; returns True when it did any."""
  from optconsist_jax import evaluate  # pylint: disable=g-import-not-at-top
  r = evaluate.evaluate_workdir(
      run.workdir, eval_config(rc, run, test_file, with_base))
  return bool(r.evaluated or r.base_evaluated)


def base_fingerprints(rc: ReproConfig, bases: Sequence[Base],
                      out_dir: str) -> dict[str, str]:
  """Weight spectra and residual-stream statistics of the bases (first seed)."""
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import fingerprints  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data import corpus  # pylint: disable=g-import-not-at-top
  done = os.path.join(out_dir, "fingerprints.json")
  if os.path.exists(done):
    return {f"fingerprints_{k}": os.path.join(out_dir, f)
            for k, f in (("spectra", "spectra.png"),
                         ("activations", "activations.png"),
                         ("json", "fingerprints.json"))}
  models = {}
  for b in bases:
    name = f"{b.name}-base"
    if name in models:
      continue
    model_config = weights.model_config_of(b.workdir, "orbax")
    models[name] = (weights.restore_run_model(b.workdir, model_config),
                    load_tokenizer(b.tokenizer_path))
  texts = corpus.python_stdlib_text("heldout")[:rc.eval.retention_docs]
  paths = fingerprints.compare(models, texts, out_dir)
  return {f"fingerprints_{k}": v for k, v in paths.items()}


def machine_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {"platform": platform.platform(), "python": sys.version.split()[0],
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


def _describe(members: Sequence[Base | Run]) -> str:
  seeds = sorted({m.seed if isinstance(m, Base) else m.labels["seed"]
                  for m in members})
  text = f"{len(members)} run{'s' if len(members) > 1 else ''}: seeds {seeds}"
  if members and isinstance(members[0], Run):
    text += f" x lr {sorted({m.labels['lr'] for m in members})}"
  return text


def run(rc: ReproConfig, workdir: str) -> dict[str, str]:
  """Runs every stage not yet done; returns the report's paths."""
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  train_file, test_file = write_math_data(rc, os.path.join(workdir, "data"))
  bases, runs = plan_runs(rc, workdir, train_file)
  with errors.user_input():
    check_bases(rc, bases)
  groups = population_groups(rc, bases, runs)
  # Seconds of the stages this invocation ran; the names of those it skipped.
  # CPU seconds of this process too: on a shared machine they estimate a
  # quiet machine's time better than the wall clock does.
  stage_times: dict[str, float] = {}
  stage_cpu: dict[str, float] = {}
  skipped: list[str] = []

  def timed(name: str, t0: tuple[float, float], ran: bool):
    if ran:
      stage_times[name] = time.time() - t0[0]
      stage_cpu[name] = time.process_time() - t0[1]
    else:
      skipped.append(name)

  if rc.bases:
    print(f"external bases (no pretraining): "
          f"{', '.join(f'{b.name}={b.workdir} ({b.kind})' for b in bases)}",
          flush=True)
  for i, (name, members) in enumerate(groups, 1):
    print(f"[{i}/{len(groups)}] train {name} ({_describe(members)})",
          flush=True)
    t0 = (time.time(), time.process_time())
    ran = train_population([
        (m.workdir, m.config,
         dict(base=m.name, method="base", lr=0.0, seed=m.seed)
         if isinstance(m, Base) else m.labels) for m in members])
    timed(f"train/{name}", t0, ran)

  seen_bases = set()
  for i, r in enumerate(runs, 1):
    print(f"[{i}/{len(runs)}] evaluate {r.name}", flush=True)
    t0 = (time.time(), time.process_time())
    ran = evaluate_run(rc, r, test_file, r.base.workdir not in seen_bases)
    seen_bases.add(r.base.workdir)
    timed(f"eval/{r.name}", t0, ran)

  from optconsist_jax import report  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(workdir, "report")
  print("report", flush=True)
  outputs = report.consistency_report([r.workdir for r in runs], out_dir)
  # Is each base a language model of its corpus? Its held-out loss against
  # a unigram model's (the retention metric is minus that loss).
  info_path = os.path.join(workdir, "run_info.json")
  previous = {}
  if os.path.exists(info_path):
    with open(info_path) as fh:
      previous = json.load(fh)
  unigram = previous.get("retention_unigram_loss")
  if unigram is None:
    unigram = unigram_retention_loss(rc, bases[0].tokenizer_path)
  base_losses = {}
  for r in runs:
    for rec in report.read_workdir(r.workdir):
      if rec.is_base:
        base_losses[r.base.run_name] = rec.metrics.get("lm_loss/loss")
  for name, loss in base_losses.items():
    print(f"{name}: held-out LM loss {loss:.3f} nats/token (unigram model of"
          f" the corpus: {unigram:.3f})", flush=True)

  ours = all(b.kind == "orbax" for b in bases)
  if rc.memorization and not ours:
    print("memorization experiment: skipped (it needs an Orbax base)")
  if rc.memorization and ours:
    from optconsist_jax.experiments import memorization  # pylint: disable=g-import-not-at-top
    print("memorization experiment", flush=True)
    t0 = (time.time(), time.process_time())
    # Outputs go to W/memorization/ (memorization.SUBDIR); it ran when it
    # added results.
    results = os.path.join(workdir, memorization.SUBDIR, memorization.RESULTS)
    before = os.path.getsize(results) if os.path.exists(results) else -1
    outputs["memorization"] = memorization.run(workdir, bases[0].workdir,
                                               mode=rc.mode)
    outputs["memorization_curves"] = os.path.join(
        os.path.dirname(outputs["memorization"]), memorization.CURVES)
    timed("memorization", t0, os.path.getsize(results) != before)

  if rc.fingerprints and not ours:
    print("activation fingerprints: skipped (they need Orbax bases)")
  if rc.fingerprints and ours:
    print("activation fingerprints", flush=True)
    t0 = (time.time(), time.process_time())
    fp_dir = os.path.join(workdir, "fingerprints")
    ran = not os.path.exists(os.path.join(fp_dir, "fingerprints.json"))
    outputs.update(base_fingerprints(rc, bases, fp_dir))
    timed("fingerprints", t0, ran)

  # One entry per invocation: the first is the whole run, later ones resume
  # and name what they skipped. stage_seconds keeps each stage's first real
  # timing (on the first invocation's machine); a skip never overwrites it.
  machine = machine_info()
  invocations = previous.get("invocations", []) + [{
      "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
      "seconds": time.time() - t_start,
      "machine": machine,
      "stages_run": sorted(stage_times),
      "stages_skipped": sorted(skipped)}]
  info = {"mode": rc.mode, "seed": rc.seed,
          "seeds": {"pretrain": 0 if rc.bases else rc.pretrain.seeds,
                    "finetune": rc.finetune.seeds},
          "bases": {b.run_name: b.workdir for b in bases},
          "runs": len(runs),
          "retention_unigram_loss": unigram,
          "base_heldout_loss": base_losses,
          "machine": previous.get("machine", machine),
          "invocations": invocations,
          "stage_seconds": {**stage_times,
                            **previous.get("stage_seconds", {})},
          "stage_cpu_seconds": {**stage_cpu,
                                **previous.get("stage_cpu_seconds", {})}}
  with open(info_path, "w") as fh:
    json.dump(info, fh, indent=2)
  outputs["run_info"] = info_path
  return outputs


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", "configs/small_consistency.py:quick",
      "The reproduction config (configs/small_consistency.py:MODE).")
  flags.DEFINE_string("workdir", "workdirs/small_consistency",
                      "Where every output goes.")


def main(argv: Sequence[str]) -> None:
  from optconsist_jax import metrics  # pylint: disable=g-import-not-at-top
  from optconsist_jax import platforms  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  platforms.select_default()
  with errors.user_input():
    rc = ReproConfig.from_dict(flags.FLAGS.config.to_dict())
  outputs = run(rc, paths_lib.resolve(flags.FLAGS.workdir))
  print("\nOutputs:")
  for k, v in outputs.items():
    print(f"  {k}: {v}")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
