r"""The small reproduction: pretrain twice, finetune every way, evaluate, report.

  python -m optconsist_jax.experiments.reproduce --config configs/small_consistency.py:quick \
      --workdir workdirs/small_consistency

Stages (each skipped when its outputs exist, so a rerun resumes):

  data          W/data/math_train.json, math_test.json (generated problems in
                MetaMathQA format, disjoint questions)
  pretrain      W/bases/{adamw,muon}/: the same tiny Llama pretrained on the
                Python standard library's docstrings with each optimizer
  finetune      W/runs/{base}-base__{method}__lr{lr}/: each base finetuned with
                AdamW, Muon and LoRA per learning rate, a checkpoint per epoch
  evaluate      W/{bases,runs}/*/eval/results.jsonl (optconsist_jax.evaluate)
  report        W/report/: Pareto frontier per base (PNG, SVG), table.md and
                summary.md (matched vs mismatched vs LoRA)
  memorization  W/memorization/ (optconsist_jax.experiments.memorization)
  fingerprints  W/fingerprints/ (optconsist_jax.experiments.fingerprints)

Each training run is an ordinary `optconsist_jax.train` workdir (its
config.json can be rerun with `python -m optconsist_jax.train`), marked done by
a `done.json` the driver writes after the run returns.
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


# ---------------------------------------------------------------------------
# Typed config.


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  optimizers: tuple[str, ...] = ("adamw", "muon")
  steps: int = 200
  seq_len: int = 256
  global_batch_size: int = 16
  lr: float = 3e-3


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  methods: tuple[str, ...] = ("adamw", "muon", "lora")
  lrs: Mapping[str, tuple[float, ...]] = dataclasses.field(
      default_factory=dict)
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
class ReproConfig:
  """configs/small_consistency.py, typed."""

  mode: str
  seed: int
  tokenizer_path: str
  model: Mapping[str, Any]
  pretrain: PretrainConfig
  finetune: FinetuneConfig
  eval: EvalSettings
  memorization: bool
  fingerprints: bool

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ReproConfig:
    d = dict(d)
    typed_config.check_keys(cls, d, "reproduce config")

    def section(typ, name):
      sd = {k: tuple(v) if isinstance(v, list) else v
            for k, v in typed_config.as_dict(d.get(name)).items()}
      return typed_config.from_dict(typ, sd, f"reproduce config.{name}")

    ft = section(FinetuneConfig, "finetune")
    lrs = {m: tuple(float(x) for x in v) for m, v in dict(ft.lrs).items()}
    missing = [m for m in ft.methods if m not in lrs]
    if missing:
      raise ValueError(f"reproduce config.finetune.lrs: no learning rates for"
                       f" methods {missing}")
    from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
    pretrain = section(PretrainConfig, "pretrain")
    for key, names in (("finetune.methods", ft.methods),
                       ("pretrain.optimizers", pretrain.optimizers)):
      for name in names:
        try:
          presets.preset(name)
        except ValueError as e:
          raise ValueError(f"reproduce config.{key}: {e}") from None
    return cls(
        mode=d.get("mode", "quick"), seed=int(d.get("seed", 0)),
        tokenizer_path=d.get("tokenizer_path", ""),
        model=dict(d["model"]),
        pretrain=pretrain,
        finetune=dataclasses.replace(ft, lrs=lrs),
        eval=section(EvalSettings, "eval"),
        memorization=bool(dict(d.get("memorization") or {}).get("enabled")),
        fingerprints=bool(dict(d.get("fingerprints") or {}).get("enabled")),
    )


# ---------------------------------------------------------------------------
# Run configs (ordinary train.py experiment dicts).


def _optim_dict(method: str, lr: float) -> dict[str, Any]:
  """The optim section: the preset `method` (schedules over the whole run)."""
  from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
  return presets.preset(method, peak_lr=lr).to_dict()


def _common(rc: ReproConfig, workdir_seed: int) -> dict[str, Any]:
  return dict(
      model=dict(rc.model), mesh=dict(preset="dp"),
      checkpoint=dict(every_steps=1_000_000, keep=1, keep_epochs=True,
                      async_save=False),
      train=dict(seed=workdir_seed, log_every=10, stats_every=50,
                 progress_every_secs=30.0, parameter_overview=False))


def pretrain_run_config(rc: ReproConfig, optimizer: str) -> dict[str, Any]:
  p = rc.pretrain
  d = _common(rc, rc.seed)
  d["optim"] = _optim_dict(optimizer, p.lr)
  d["data"] = dict(format="stdlib", split="train", seq_len=p.seq_len,
                   global_batch_size=p.global_batch_size, seed=rc.seed,
                   tokenizer_path=rc.tokenizer_path)
  d["train"].update(num_steps=p.steps, num_epochs=0)
  d["checkpoint"].update(keep_epochs=False)
  return d


def finetune_run_config(rc: ReproConfig, base_dir: str, method: str,
                        lr: float, train_file: str) -> dict[str, Any]:
  f = rc.finetune
  d = _common(rc, rc.seed)
  d["optim"] = _optim_dict(method, lr)
  d["data"] = dict(format="metamathqa", path=train_file, seq_len=f.seq_len,
                   global_batch_size=f.global_batch_size, seed=rc.seed,
                   tokenizer_path=rc.tokenizer_path)
  d["train"].update(num_epochs=f.epochs, num_steps=0)
  d["init_from"] = dict(path=base_dir, kind="orbax")
  if method == "lora":
    d["lora"] = dict(rank=f.lora_rank, alpha=f.lora_alpha,
                     dropout=f.lora_dropout)
    if f.lora_dropout:
      d["train"]["dropout_seed"] = rc.seed
  return d


def run_name(base: str, method: str, lr: float) -> str:
  return f"{base}-base__{method}__lr{lr:g}"


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


def train_once(run_config: dict[str, Any], workdir: str,
               labels: dict[str, Any]) -> bool:
  """Trains unless done; returns True when it trained."""
  from optconsist_jax import config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax import train  # pylint: disable=g-import-not-at-top
  if _done(workdir):
    logging.info("skip (done): %s", workdir)
    return False
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "run_labels.json"), "w") as fh:
    json.dump(labels, fh, indent=2)
  config = config_types.ExperimentConfig.from_dict(run_config)
  t0 = time.time()
  result = train.train(config, workdir)
  if result.stopped != "done":
    raise errors.Preempted(f"{workdir}: training stopped ({result.stopped});"
                           " rerun the same command to resume")
  _mark_done(workdir, {"steps": result.step, "seconds": time.time() - t0,
                       "final_loss": (result.losses[max(result.losses)]
                                      if result.losses else None)})
  return True


def eval_config(rc: ReproConfig, test_file: str, labels: dict[str, Any],
                with_base: bool):
  """The eval job's config for one finetuning run (labels for the plot).

  with_base: also evaluate the run's base model (its init_from), once per
    base over all runs.
  """
  from optconsist_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.EvalConfig.from_dict(dict(
      mesh=dict(preset="dp"),
      tokenizer_path=rc.tokenizer_path,
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
      run.workdir, eval_config(rc, test_file, run.labels, with_base))
  return bool(r.evaluated or r.base_evaluated)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  labels: dict[str, Any]
  config: dict[str, Any]


def plan_runs(rc: ReproConfig, workdir: str, train_file: str
              ) -> tuple[list[Run], list[Run]]:
  bases, runs = [], []
  for opt in rc.pretrain.optimizers:
    bdir = os.path.join(workdir, "bases", opt)
    bases.append(Run(f"{opt}-base", bdir,
                     dict(base=opt, method="base", lr=0.0),
                     pretrain_run_config(rc, opt)))
    for method in rc.finetune.methods:
      for lr in rc.finetune.lrs[method]:
        name = run_name(opt, method, lr)
        runs.append(Run(name, os.path.join(workdir, "runs", name),
                        dict(base=opt, method=method, lr=lr),
                        finetune_run_config(rc, bdir, method, lr,
                                            train_file)))
  return bases, runs


def base_fingerprints(rc: ReproConfig, bases: Sequence[Run],
                      out_dir: str) -> dict[str, str]:
  """Weight spectra and residual-stream statistics of the pretrained bases."""
  from optconsist_jax import config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import fingerprints  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data import corpus  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  done = os.path.join(out_dir, "fingerprints.json")
  if os.path.exists(done):
    return {f"fingerprints_{k}": os.path.join(out_dir, f)
            for k, f in (("spectra", "spectra.png"),
                         ("activations", "activations.png"),
                         ("json", "fingerprints.json"))}
  models = {}
  for b in bases:
    config = config_types.ExperimentConfig.from_dict(b.config)
    models[b.name] = (weights.restore_run_model(b.workdir, config.model),
                      pipeline.load_tokenizer(config.data))
  texts = corpus.python_stdlib_text("heldout")[:rc.eval.retention_docs]
  paths = fingerprints.compare(models, texts, out_dir)
  return {f"fingerprints_{k}": v for k, v in paths.items()}


def machine_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {"platform": platform.platform(), "python": sys.version.split()[0],
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


def run(rc: ReproConfig, workdir: str) -> dict[str, str]:
  """Runs every stage not yet done; returns the report's paths."""
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  train_file, test_file = write_math_data(rc, os.path.join(workdir, "data"))
  bases, runs = plan_runs(rc, workdir, train_file)
  total = len(bases) + len(runs)
  # Seconds of the stages this invocation ran; the names of those it skipped.
  stage_times: dict[str, float] = {}
  skipped: list[str] = []

  def timed(name: str, t0: float, ran: bool):
    if ran:
      stage_times[name] = time.time() - t0
    else:
      skipped.append(name)

  for i, r in enumerate(bases + runs, 1):
    print(f"[{i}/{total}] train {r.name}", flush=True)
    t0 = time.time()
    timed(f"train/{r.name}", t0, train_once(r.config, r.workdir, r.labels))

  seen_bases = set()
  for i, r in enumerate(runs, 1):
    print(f"[{i}/{len(runs)}] evaluate {r.name}", flush=True)
    t0 = time.time()
    ran = evaluate_run(rc, r, test_file, r.labels["base"] not in seen_bases)
    seen_bases.add(r.labels["base"])
    timed(f"eval/{r.name}", t0, ran)

  from optconsist_jax import report  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(workdir, "report")
  print("report", flush=True)
  outputs = report.consistency_report([r.workdir for r in runs], out_dir)

  if rc.memorization:
    from optconsist_jax.experiments import memorization  # pylint: disable=g-import-not-at-top
    print("memorization experiment", flush=True)
    t0 = time.time()
    # Outputs go to W/memorization/ (memorization.SUBDIR); it ran when it
    # added results.
    results = os.path.join(workdir, memorization.SUBDIR, memorization.RESULTS)
    before = os.path.getsize(results) if os.path.exists(results) else -1
    outputs["memorization"] = memorization.run(workdir, bases[0].workdir,
                                               mode=rc.mode)
    outputs["memorization_curves"] = os.path.join(
        os.path.dirname(outputs["memorization"]), memorization.CURVES)
    timed("memorization", t0, os.path.getsize(results) != before)

  if rc.fingerprints:
    print("activation fingerprints", flush=True)
    t0 = time.time()
    fp_dir = os.path.join(workdir, "fingerprints")
    ran = not os.path.exists(os.path.join(fp_dir, "fingerprints.json"))
    outputs.update(base_fingerprints(rc, bases, fp_dir))
    timed("fingerprints", t0, ran)

  info_path = os.path.join(workdir, "run_info.json")
  previous = {}
  if os.path.exists(info_path):
    with open(info_path) as fh:
      previous = json.load(fh)
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
          "machine": previous.get("machine", machine),
          "invocations": invocations,
          "stage_seconds": {**stage_times,
                            **previous.get("stage_seconds", {})}}
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
