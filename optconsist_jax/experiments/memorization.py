r"""The synthetic memorization experiment: rote memorization vs rule learning.

The paper (arXiv 2605.06654) reports, from a synthetic task, that Muon leans
to rote memorization when finetuning. This module rebuilds such a task so the
two abilities are measured separately:

* rule items: level-1 arithmetic word problems whose answer follows from
  the question by a rule;
* fact items: "What is the locker number of <made-up name>?" answered by an
  arbitrary 3-digit number, so they can only be memorized
  (optconsist_jax.experiments.memorization_data writes both).

The finetuning set mixes both (MetaMathQA format, so the ordinary trainer and
data pipeline read it). Two probes are scored after every epoch:

* memorization: the training fact items themselves;
* rule: held-out rule items from the same templates whose arithmetic (the
  operation and both operands) never occurs in the training set, so a right
  answer needs the rule, not a recalled equation.

Scores (`evaluate`): greedy accuracy (the training prompt, MetaMath answer
extraction `evaluate.math.extract_answer`) and, as a smoother signal for tiny
models, the mean per-token log-probability of the gold response (+ EOS) under
the training prompt, as the training loss sees it. The log-probability of a
fact's number also rises when a model merely learns the answer format (any
3-digit number: log(1/900) = -6.80 nats), so memorization is read from the
contrastive score (`contrastive_scores`): log p(own number) minus the mean
log p(another fact's number) under the same question, 0 at chance whatever
the format knowledge. With `Settings.peak_lrs` every optimizer runs over a
learning-rate grid and the summary compares optimizers at equal training
loss (memorization_report.at_equal_loss), not at one shared learning rate.

`run(W, base)` finetunes the base with each optimizer (memorization_config)
and `Settings.seeds` seeds (data order), the seeds of one optimizer as one
population (`train.population.train_population`, one checkpoint per
epoch), evaluates the base and every epoch checkpoint, and writes

  W/memorization/settings.json     the settings (a rerun must match them)
  W/memorization/data/             train.json, facts.json, heldout_rule.json
  W/memorization/runs/<optimizer>[__lr<lr>]__s<seed>/ the finetuning runs
                                   (train.py layout; __lr<lr> with a grid)
  W/memorization/results.jsonl     one line per (optimizer, seed, epoch)
  W/memorization/summary.md, .json each score at the last epoch per optimizer
                                   (mean and 95% interval over seeds) and each
                                   optimizer minus the first, paired by seed,
                                   with its verdict (report/statistics.py);
                                   with a grid, first the comparison at
                                   equal training loss (also in
                                   at_equal_loss.json)
  W/memorization/curves.png        memorization and rule curves per optimizer
                                   (mean over seeds, the interval as a band)

Each step is skipped when its output exists, so an interrupted run resumes.

  python -m optconsist_jax.experiments.memorization --workdir W --base BASE_RUN_DIR \
      [--mode quick|full] [--optimizers adamw,muon] [--seeds N]
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import time
from typing import Any

from absl import flags

from optconsist_jax.data import formats
from optconsist_jax.data import pipeline as data_lib
from optconsist_jax.experiments import memorization_config
from optconsist_jax.experiments import memorization_data
from optconsist_jax.experiments import memorization_report
from optconsist_jax.experiments import memorization_scores
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import weights
from optconsist_jax import errors
from optconsist_jax import paths
from optconsist_jax import platforms
from optconsist_jax.train import config as config_types
from optconsist_jax.train import population

SUBDIR = "memorization"
RESULTS = "results.jsonl"
CURVES = "curves.png"
SETTINGS = "settings.json"
SUMMARY = memorization_report.SUMMARY
BASE = memorization_report.BASE

# The scores (experiments/memorization_scores.py), by their old names.
gold_logprobs = memorization_scores.gold_logprobs
answer_logprobs = memorization_scores.answer_logprobs
contrastive_requests = memorization_scores.contrastive_requests
contrastive_scores = memorization_scores.contrastive_scores
evaluate = memorization_scores.evaluate


# ---------------------------------------------------------------------------
# The experiment.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one memorization experiment.

  Attributes:
    n_rule, n_fact: training rule / fact items.
    n_heldout: held-out rule items (the rule probe).
    num_epochs: finetuning epochs (one checkpoint and one eval per epoch).
    peak_lr: peak learning rate of both optimizers (Muon with rms_match).
    peak_lrs: () = `peak_lr` only; else a learning-rate grid every
      optimizer runs over (runs <optimizer>__lr<lr>__s<seed>), so the
      summary can compare optimizers at equal training loss.
    global_batch_size, seq_len: the finetuning batch (packed rows).
    max_new_tokens, eval_batch_size: decoding of the probes.
    seed: the data set's seed, and the first training seed.
    seeds: training seeds per optimizer (`seed`, `seed + 1`, ...: data
      order); the summary's intervals are over them.
  """

  n_rule: int = 200
  n_fact: int = 100
  n_heldout: int = 64
  num_epochs: int = 4
  peak_lr: float = 2e-3
  global_batch_size: int = 16
  seq_len: int = 128
  max_new_tokens: int = 48
  eval_batch_size: int = 64
  seed: int = 0
  seeds: int = 3
  peak_lrs: tuple[float, ...] = ()


MODES = {
    # About two minutes on a 2-core CPU with the tiny reproduction model.
    "quick": Settings(),
    # One GPU, or a patient CPU: enough epochs for facts to be memorized.
    "full": Settings(n_rule=1000, n_fact=500, n_heldout=256, num_epochs=16),
    # configs/small_consistency.py:standard: quick's sizes over a grid of
    # three learning rates x2 apart around quick's one.
    "standard": Settings(peak_lrs=(1e-3, 2e-3, 4e-3)),
}


def _base_run_config(base: str) -> dict[str, Any]:
  """The resolved W/config.json of the run that wrote `base`."""
  path = os.path.abspath(base)
  for _ in range(3):  # W, W/checkpoints or W/checkpoints/<step>
    f = os.path.join(path, "config.json")
    if os.path.isfile(f):
      with open(f, encoding="utf-8") as fh:
        return json.load(fh)
    path = os.path.dirname(path)
  raise FileNotFoundError(
      f"memorization.run: no config.json in {base} or its parents; base must"
      " be a run directory written by optconsist_jax.train (or inside one)")


def experiment_config(optimizer: str, base: str, data_path: str,
                      settings: Settings, seed: int | None = None,
                      lr: float | None = None
                      ) -> config_types.ExperimentConfig:
  """`memorization_config.get_config(optimizer)`, base and data filled in.

  `seed` (default `settings.seed`) is the run's data-order and train seed;
  `lr` its peak learning rate (default `settings.peak_lr`).
  """
  seed = settings.seed if seed is None else seed
  base_cfg = _base_run_config(base)
  c = memorization_config.get_config(optimizer).to_dict()
  c["model"] = dict(base_cfg["model"])
  c["optim"] = memorization_config.optim_dict(
      optimizer, settings.peak_lr if lr is None else lr)
  c["data"].update(path=os.path.abspath(data_path), seq_len=settings.seq_len,
                   global_batch_size=settings.global_batch_size,
                   seed=seed,
                   tokenizer_path=base_cfg.get("data", {}).get(
                       "tokenizer_path", ""))
  c["train"].update(num_epochs=settings.num_epochs, seed=seed)
  c["init_from"].update(path=os.path.abspath(base), kind="orbax")
  return config_types.ExperimentConfig.from_dict(c)


def _read_results(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _append(path: str, record: dict[str, Any]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def _epoch_checkpoints(run_dir: str) -> dict[int, ckpt_lib.CheckpointInfo]:
  return {c.epoch: c for c in ckpt_lib.list_checkpoints(run_dir)
          if c.complete and c.epoch is not None}


def _base_key(base_init_path: str, workdir: str) -> str:
  """The base as settings.json records it: relative to the workdir if inside.

  A workdir copied or moved elsewhere then still matches its settings.
  """
  base = os.path.abspath(base_init_path)
  rel = os.path.relpath(base, os.path.abspath(os.fspath(workdir)))
  return base if rel.startswith(os.pardir) else rel


def _same_base(found: str | None, wanted: str) -> bool:
  """Whether a recorded base names `wanted` (older files hold absolute paths).

  An absolute path recorded before bases were stored relative to the workdir
  matches when it ends with the relative one.
  """
  if found is None or found == wanted:
    return found is not None
  return (os.path.isabs(found) and not os.path.isabs(wanted)
          and found.endswith(os.sep + wanted))


def run(workdir: str | os.PathLike, base_init_path: str | os.PathLike,
        optimizers: Sequence[str] = ("adamw", "muon"), *,
        mode: str = "quick", settings: Settings | None = None,
        log=print) -> str:
  """Runs (or resumes) the experiment; returns the path of results.jsonl.

  Args:
    workdir: W; outputs go to W/memorization/ (module docstring).
    base_init_path: the base model, an Orbax run dir written by train.py
      (its config.json gives the model shape and tokenizer).
    optimizers: finetuning optimizers (memorization_config args); the
      summary compares each with the first.
    mode: a key of MODES, used when `settings` is None.
    settings: explicit sizes (overrides `mode`).
    log: progress messages go here.
  """
  if settings is None:
    if mode not in MODES:
      raise ValueError(f"memorization.run: mode={mode!r}; expected one of"
                       f" {sorted(MODES)}")
    settings = MODES[mode]
  if settings.seeds < 1:
    raise ValueError(f"memorization.run: seeds={settings.seeds}; expected"
                     " at least 1")
  root = os.path.join(os.fspath(workdir), SUBDIR)
  os.makedirs(root, exist_ok=True)
  settings_path = os.path.join(root, SETTINGS)
  wanted = {**dataclasses.asdict(settings),
            "base": _base_key(base_init_path, workdir)}
  if not settings.peak_lrs:  # as settings.json was before the grid existed
    del wanted["peak_lrs"]
  else:
    wanted["peak_lrs"] = list(settings.peak_lrs)
  if os.path.exists(settings_path):
    with open(settings_path, encoding="utf-8") as f:
      found = json.load(f)
    if _same_base(found.get("base"), wanted["base"]):
      found["base"] = wanted["base"]
    if found != wanted:
      diff = sorted(k for k in set(found) | set(wanted)
                    if found.get(k) != wanted.get(k))
      raise ValueError(f"{settings_path} was written with other settings"
                       f" (differing: {diff}); use another workdir")
  else:
    with open(settings_path, "w", encoding="utf-8") as f:
      json.dump(wanted, f, indent=2)

  s = settings
  seeds = range(s.seed, s.seed + s.seeds)
  data = memorization_data.make_dataset(
      os.path.join(root, "data"), seed=s.seed, n_rule=s.n_rule,
      n_fact=s.n_fact, n_heldout=s.n_heldout)
  facts = formats.read_metamathqa(data.facts)
  heldout = formats.read_metamathqa(data.heldout_rule)
  train_items = formats.read_metamathqa(data.train)
  results_path = os.path.join(root, RESULTS)
  done = {(r["optimizer"], r.get("lr"), r.get("seed"), r["epoch"])
          for r in _read_results(results_path)}
  lrs = s.peak_lrs or (None,)
  configs = {(o, lr, k): experiment_config(o, os.fspath(base_init_path),
                                           data.train, s, seed=k, lr=lr)
             for o in optimizers for lr in lrs for k in seeds}
  tokenizer = data_lib.load_tokenizer(next(iter(configs.values())).data)

  def score(model_config, checkpoint, optimizer, lr, seed, epoch, step):
    if (optimizer, lr, seed, epoch) in done:
      return
    t = time.perf_counter()
    model = weights.restore_run_model(checkpoint, model_config)
    m = evaluate(model, tokenizer, facts, heldout,
                 max_new_tokens=s.max_new_tokens,
                 batch_size=s.eval_batch_size, train=train_items)
    record = {"optimizer": optimizer, "epoch": epoch, "step": step,
              "checkpoint": os.fspath(checkpoint), **m,
              "eval_seconds": round(time.perf_counter() - t, 2)}
    if seed is not None:
      record["seed"] = seed
    if lr is not None:
      record["lr"] = lr
    _append(results_path, record)
    done.add((optimizer, lr, seed, epoch))
    log(f"memorization: {optimizer}"
        f"{'' if seed is None else f' seed {seed}'} epoch {epoch}:"
        f" memorization {m['memorization_acc']:.3f} rule {m['rule_acc']:.3f}"
        f" (log-probs {m['memorization_logprob']:.3f} /"
        f" {m['rule_logprob']:.3f})")

  any_config = next(iter(configs.values()))
  score(any_config.model, os.fspath(base_init_path), BASE, None, None, 0, 0)
  for optimizer, lr in ((o, lr) for o in optimizers for lr in lrs):
    tag = optimizer if lr is None else f"{optimizer}__lr{lr:g}"
    run_dirs = {k: os.path.join(root, "runs", f"{tag}__s{k}") for k in seeds}
    todo = [k for k in seeds
            if not all(e in _epoch_checkpoints(run_dirs[k])
                       for e in range(1, s.num_epochs + 1))]
    if todo:
      t = time.perf_counter()
      population.train_population(
          [configs[(optimizer, lr, k)] for k in todo],
          [run_dirs[k] for k in todo])
      log(f"memorization: finetuned with {tag}, seeds {todo} (one"
          f" population) in {time.perf_counter() - t:.1f} s")
    for k in seeds:
      have = _epoch_checkpoints(run_dirs[k])
      for epoch in range(1, s.num_epochs + 1):
        if epoch not in have:
          raise RuntimeError(
              f"{run_dirs[k]}: no checkpoint for epoch {epoch} after"
              f" training (complete epoch checkpoints: {sorted(have)})")
        score(configs[(optimizer, lr, k)].model, have[epoch].path,
              optimizer, lr, k, epoch, have[epoch].step)

  results = [r for r in _read_results(results_path)
             if r["optimizer"] == BASE or r["optimizer"] in optimizers]

  def stale(out):
    return (not os.path.exists(out)
            or os.path.getmtime(out) < os.path.getmtime(results_path))

  curves = os.path.join(root, CURVES)
  if stale(curves):
    memorization_report.plot(results, curves)
  if len(optimizers) > 1 and stale(os.path.join(root, SUMMARY + ".md")):
    summary = memorization_report.summarize(results, optimizers)
    equal_loss = memorization_report.at_equal_loss(results, optimizers)
    memorization_report.write_summary(summary, root, equal_loss)
    for row in equal_loss:
      log(f"memorization: at equal training loss, {row['metric']}:"
          f" {row['other']} - {row['first']} ="
          f" {memorization_report.fmt(row['gap_mean'])}: {row['verdict']}")
    for row in summary:
      log(f"memorization: {row['metric']}: {row['other']} - {row['first']} ="
          f" {memorization_report.fmt(row['gap'])}: {row['verdict']}")
  return results_path


def main(argv):
  del argv
  platforms.select_default()
  f = flags.FLAGS
  start = time.perf_counter()
  settings = MODES[f.mode]
  if f.seeds is not None:
    settings = dataclasses.replace(settings, seeds=f.seeds)
  path = run(paths.resolve(f.workdir), paths.resolve(f.base),
             tuple(f.optimizers), settings=settings)
  root = os.path.dirname(path)
  print(f"results: {path}\nsummary: {os.path.join(root, SUMMARY + '.md')}"
        f"\ncurves: {os.path.join(root, CURVES)}"
        f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Where the experiment's outputs go.",
                      required=True)
  flags.DEFINE_string("base", None, "Base model: an Orbax run dir of optconsist_jax.train.",
                      required=True)
  flags.DEFINE_enum("mode", "quick", sorted(MODES), "Experiment size.")
  flags.DEFINE_list("optimizers", ["adamw", "muon"],
                    "Finetuning optimizers; the summary compares each with"
                    " the first.")
  flags.DEFINE_integer("seeds", None, "Training seeds per optimizer (default:"
                       " the mode's).")
  errors.run(main)
