r"""The small reproduction: pretrain, finetune every way over seeds, evaluate, report.

  python -m optconsist_jax.experiments.reproduce --config configs/small_consistency.py:quick \
      --workdir workdirs/small_consistency

Stages (each skipped when its outputs exist, so a rerun resumes):

  data          W/data/math_train.json, math_test.json (generated problems in
                MetaMathQA format, disjoint questions; fixed across seeds);
                made again on a rerun and checked against the files
  pretrain      W/bases/{optimizer}__s{seed}/: the same tiny Llama pretrained
                on the Python standard library's docstrings with each
                optimizer, `pretrain.seeds` seeds each (one population per
                optimizer). Skipped entirely when `reproduce.bases` names
                external bases.
  finetune      W/runs/{base}-base__{method}__lr{lr}[__e{E}]__s{seed}/:
                each base finetuned with every method over its learning-rate
                grid and `finetune.seeds` seeds, a checkpoint per epoch (or
                one run per epoch budget E, kept at its end). Every base,
                seed and learning rate of one method (and budget) trains as
                one population (train.population.train_population); with
                external bases, one population per base and method.
  evaluate      W/runs/*/eval/results/ (optconsist_jax.evaluate; each
                base model is evaluated once, in its first run)
  refine        with `finetune.refine_rounds` > 0: learning rates added
                where a frontier's bracket at L is too wide
                (experiments/refine.py), trained and evaluated by the two
                stages above, round by round; W/run_info.json "refinement"
                says what each round added
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
report knows which method is matched): a Hugging Face folder or Hub repo
(Llama-2/3, Qwen2.5/3, OLMo-2), a nanoGPT `ckpt.pt` or an Orbax run written
by train.py (see `config_types.InitFromConfig`). A base of the provenance
table (io/provenance.py) needs no NAME: `reproduce.bases=Qwen/Qwen2.5-7B`
labels it with its published pretraining optimizer
(experiments/external_bases.py). Pretraining is skipped; the finetuning runs
take the base's architecture (`model.preset="from_init"`) and its tokenizer
(the folder's tokenizer.model or tokenizer.json, the GPT-2 BPE files beside a
ckpt.pt, the Orbax run's data.tokenizer_path; otherwise `tokenizer_path`).

Each training run is an ordinary `optconsist_jax.train` workdir (its
config.json can be rerun with `python -m optconsist_jax.train`), marked done by
a `done.json` the driver writes after its population returns.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from optconsist_jax.evaluate import results
from optconsist_jax.experiments import eval_pool
from optconsist_jax.experiments import refine as refine_lib
from optconsist_jax.experiments import retention as retention_lib
from optconsist_jax.experiments import study
from optconsist_jax.experiments import study_data
from optconsist_jax import paths as paths_lib
from optconsist_jax import platforms
from optconsist_jax.platforms import allocator
from optconsist_jax.report import tables as report

DONE_FILE = "done.json"
LABELS_FILE = "run_labels.json"
# run_info.json's keys that only a finished invocation writes.
_FINAL_INFO = ("runs", "refinement", "retention_unigram_loss",
               "base_heldout_loss", "parameter_shares")


# ---------------------------------------------------------------------------
# Stages.


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, DONE_FILE))


def _mark_done(path: str, info: dict[str, Any]) -> None:
  tmp = os.path.join(path, DONE_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(path, DONE_FILE))


# Where a run's inputs lie, not what they are: a workdir may move, and be
# resumed from another clone (the shipped tokenizer's path). The base's
# contents are checked as its own run; the tokenizer's size is the model's.
_LOCATIONS = frozenset({"data.path", "data.tokenizer_path", "init_from.path"})


def _check_done(workdir: str, config: dict[str, Any]) -> None:
  """Refuses a done run that was trained with another config than planned.

  A workdir reused after a config change (another model, grid or
  schedule) would otherwise lend its old runs to the new study's report.
  """
  # deferred: pulls in jax; the plan and --help load without it.
  from etils import epath  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import config as config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import setup as train_setup  # pylint: disable=g-import-not-at-top
  done_file = os.path.join(workdir, DONE_FILE)
  try:
    with open(done_file) as fh:
      steps = json.load(fh)["steps"]
  except (OSError, ValueError, KeyError) as e:
    raise errors.UserError(
        f"{done_file} is not a reproduction's done marker"
        f" ({errors.short_cause(e)}): delete it to retrain the run") from None
  planned = config_types.ExperimentConfig.from_dict(
      config).resolve_total_steps(steps)
  train_setup.check_workdir(
      json.loads(planned.to_json()), epath.Path(workdir),
      hint="This study's config plans another run in that directory: rerun"
      " with the config the workdir was written with, or use a fresh"
      " --workdir. Nothing was written", ignore=_LOCATIONS)


def train_population(members: Sequence[tuple[str, dict[str, Any],
                                             dict[str, Any]]]) -> bool:
  """Trains the (workdir, config, labels) not yet done as one population.

  A done run is first checked against its planned config (`_check_done`).
  Returns True when it trained any.
  """
  # deferred: pulls in jax; the plan and --help load without it.
  from optconsist_jax.train import config as config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import population  # pylint: disable=g-import-not-at-top
  todo = [m for m in members if not _done(m[0])]
  for workdir, config, _ in members:
    if _done(workdir):
      _check_done(workdir, config)
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


def eval_config(rc: study.ReproConfig, run: study.Run, test_file: str,
                with_base: bool, retention: str = "stdlib"):
  """The eval job's config for one finetuning run (labels for the plot).

  with_base: also evaluate the run's base model (its init_from), once per
    base over all runs.
  retention: lm_loss.path (`study_data.write_retention_data`).
  """
  # deferred: pulls in jax; the plan and --help load without it.
  from optconsist_jax.evaluate.config import EvalConfig  # pylint: disable=g-import-not-at-top
  labels = run.labels
  return EvalConfig.from_dict(dict(
      mesh=dict(preset="dp"),
      tokenizer_path=run.base.tokenizer_path,
      math=dict(protocols=("metamath",), test=test_file, train="",
                format="metamathqa", response_loss=True,
                limit=rc.eval.math_examples, batch_size=16,
                max_new_tokens=rc.eval.max_new_tokens),
      multiple_choice=dict(hellaswag="", arc_challenge="", winogrande=""),
      lm_loss=dict(path=retention, limit=rc.eval.retention_docs,
                   max_len=rc.eval.retention_max_len, batch_size=16),
      # Cheap probes: 4 rows (the mini study's 2 documents fill 4).
      probes=dict(enabled=rc.eval.probes, batch_size=4,
                  seq_len=rc.eval.retention_max_len),
      learning_metric=rc.eval.learning_metric,
      retention_metric="-lm_loss/loss",
      method=labels["method"], base=labels["base"], lr=labels["lr"],
      base_model="" if with_base else "none"))


def base_fingerprints(rc: study.ReproConfig, bases: Sequence[study.Base],
                      out_dir: str) -> dict[str, str]:
  """Weight spectra and residual-stream statistics of the bases (first seed)."""
  # deferred: pulls in jax; the plan and --help load without it.
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import fingerprints  # pylint: disable=g-import-not-at-top
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
                    study.load_tokenizer(b.tokenizer_path))
  texts = retention_lib.documents(rc)
  paths = fingerprints.compare(models, texts, out_dir)
  return {f"fingerprints_{k}": v for k, v in paths.items()}


def machine_info() -> dict[str, Any]:
  # deferred: pulls in jax; the plan and --help load without it.
  import jax  # pylint: disable=g-import-not-at-top
  return {"platform": platform.platform(), "python": sys.version.split()[0],
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()],
          "cpu_allocator": allocator.current().to_json()}


def _describe(members: Sequence[study.Base | study.Run]) -> str:
  seeds = sorted({m.seed if isinstance(m, study.Base) else m.labels["seed"]
                  for m in members})
  text = f"{len(members)} run{'s' if len(members) > 1 else ''}: seeds {seeds}"
  if members and isinstance(members[0], study.Run):
    text += f" x lr {sorted({m.labels['lr'] for m in members})}"
  return text


def run(rc: study.ReproConfig, workdir: str) -> dict[str, str]:
  """Runs every stage not yet done; returns the report's paths."""
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  data_dir = os.path.join(workdir, "data")
  train_file, test_file = study_data.write_math_data(rc, data_dir)
  retention = study_data.write_retention_data(rc, data_dir)
  bases, runs = study.plan_runs(rc, workdir, train_file)
  with errors.user_input():
    study.check_bases(rc, bases)
  groups = study.population_groups(rc, bases, runs)
  # Seconds of the stages this invocation ran; the names of those it skipped.
  # CPU seconds of this process too: on a shared machine they estimate a
  # quiet machine's time better than the wall clock does.
  stage_times: dict[str, float] = {}
  stage_cpu: dict[str, float] = {}
  skipped: list[str] = []
  # W/run_info.json, rewritten after every stage (a killed invocation keeps
  # the timings of the stages it finished) and completed at the end.
  info_path = os.path.join(workdir, "run_info.json")
  previous = {}
  if os.path.exists(info_path):
    with open(info_path) as fh:
      previous = json.load(fh)
  machine = machine_info()

  def save_info(finished: bool = False, **fields) -> None:
    # One entry per invocation: the first is the whole run, later ones
    # resume and name what they skipped. stage_seconds keeps each stage's
    # first real timing (on the first invocation's machine); a skip never
    # overwrites it.
    invocation = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                 time.localtime(t_start)),
        "seconds": time.time() - t_start, "machine": machine,
        "finished": finished, "stages_run": sorted(stage_times),
        "stages_skipped": sorted(skipped)}
    info = {"mode": rc.mode, "seed": rc.seed,
            "seeds": {"pretrain": 0 if rc.bases else rc.pretrain.seeds,
                      "finetune": rc.finetune.seeds},
            "bases": {b.run_name: b.workdir for b in bases},
            "base_labels": {b.name: b.label_source for b in rc.bases},
            # Until this invocation finishes, the last finished one's.
            **({} if finished else
               {k: previous[k] for k in _FINAL_INFO if k in previous}),
            **fields,
            "machine": previous.get("machine", machine),
            "invocations": previous.get("invocations", []) + [invocation],
            "stage_seconds": {**stage_times,
                              **previous.get("stage_seconds", {})},
            "stage_cpu_seconds": {**stage_cpu,
                                  **previous.get("stage_cpu_seconds", {})}}
    tmp = info_path + ".tmp"
    with open(tmp, "w") as fh:
      json.dump(info, fh, indent=2)
    os.replace(tmp, info_path)

  def record(name: str, ran: bool, seconds: float, cpu_seconds: float):
    if ran:
      stage_times[name], stage_cpu[name] = seconds, cpu_seconds
      save_info()
    else:
      skipped.append(name)

  def timed(name: str, t0: tuple[float, float], ran: bool):
    record(name, ran, time.time() - t0[0], time.process_time() - t0[1])

  if rc.bases:
    print(f"external bases (no pretraining): "
          f"{', '.join(f'{b.name}={b.workdir} ({b.kind})' for b in bases)}",
          flush=True)
    for b in rc.bases:
      print(f"  {b.name}: pretraining optimizer {b.label_source}", flush=True)
  seen_bases = set()

  def train_and_evaluate(groups, runs, stage_prefix=""):
    """The train stage of every population, then the evaluate stage of
    every run: the grid's, then each refinement round's added runs."""
    for i, (name, members) in enumerate(groups, 1):
      print(f"[{i}/{len(groups)}] {stage_prefix}train {name}"
            f" ({_describe(members)})", flush=True)
      t0 = (time.time(), time.process_time())
      ran = train_population([
          (m.workdir, m.config,
           dict(base=m.name, method="base", lr=0.0, seed=m.seed)
           if isinstance(m, study.Base) else m.labels) for m in members])
      timed(f"{stage_prefix}train/{name}", t0, ran)
    # Each base is evaluated once, in its first run's job.
    jobs = []
    for r in runs:
      jobs.append(eval_pool.Job(r.name, r.workdir, eval_config(
          rc, r, test_file, r.base.workdir not in seen_bases, retention)))
      seen_bases.add(r.base.workdir)
    workers = eval_pool.usable_workers(rc.eval_workers)
    print(f"{stage_prefix}evaluate {len(jobs)} runs"
          f" ({workers} process{'es' if workers > 1 else ''})", flush=True)
    for i, done in enumerate(eval_pool.evaluate_runs(jobs, workers), 1):
      print(f"[{i}/{len(jobs)}] {stage_prefix}evaluated {done.name}"
            f"{'' if done.ran else ' (skip: done)'} {done.seconds:.1f} s",
            flush=True)
      record(f"{stage_prefix}eval/{done.name}", done.ran, done.seconds,
             done.cpu_seconds)

  train_and_evaluate(groups, runs)
  refinement = None
  if rc.finetune.refine_rounds:
    runs, refinement = refine_lib.refine_grid(rc, workdir, train_file, runs,
                                              train_and_evaluate)

  out_dir = os.path.join(workdir, "report")
  print("report", flush=True)
  outputs = report.consistency_report(
      [r.workdir for r in runs], out_dir, matrix=rc.matrix,
      grid_note=refinement["note"] if refinement else "")
  shares = {}
  if not rc.bases:
    # deferred: pulls in jax; the plan and --help load without it.
    from optconsist_jax.experiments import parameter_shares  # pylint: disable=g-import-not-at-top
    shares = parameter_shares.shares(rc.model, rc.pretrain.optimizers,
                                     rc.optim_kwargs)
    outputs["parameter_shares"] = os.path.join(out_dir,
                                               "parameter_shares.md")
    with open(outputs["parameter_shares"], "w") as fh:
      fh.write(parameter_shares.markdown(shares))
  # Is each base a language model of its corpus? Its held-out loss against
  # a unigram model's (the retention metric is minus that loss).
  unigram = previous.get("retention_unigram_loss")
  if unigram is None:
    unigram = retention_lib.unigram_loss(rc, bases[0].tokenizer_path)
  base_losses = {}
  for r in runs:
    for rec in results.read_workdir(r.workdir):
      if rec.is_base:
        base_losses[r.base.run_name] = rec.metrics.get("lm_loss/loss")
  for name, loss in base_losses.items():
    print(f"{name}: held-out LM loss {loss:.3f} nats/token (unigram model of"
          f" the corpus: {unigram:.3f})", flush=True)

  ours = all(b.kind == "orbax" for b in bases)
  if rc.memorization and not ours:
    print("memorization experiment: skipped (it needs an Orbax base)")
  if rc.memorization and ours:
    # deferred: pulls in jax; the plan and --help load without it.
    from optconsist_jax.experiments import memorization  # pylint: disable=g-import-not-at-top
    print("memorization experiment", flush=True)
    t0 = (time.time(), time.process_time())
    # Outputs go to W/memorization/ (memorization.SUBDIR); it ran when it
    # added results.
    mem_results = os.path.join(workdir, memorization.SUBDIR,
                               memorization.RESULTS)
    before = (os.path.getsize(mem_results) if os.path.exists(mem_results)
              else -1)
    outputs["memorization"] = memorization.run(workdir, bases[0].workdir,
                                               mode=rc.mode)
    mem_root = os.path.dirname(outputs["memorization"])
    outputs["memorization_summary"] = os.path.join(
        mem_root, memorization.SUMMARY + ".md")
    outputs["memorization_curves"] = os.path.join(mem_root,
                                                  memorization.CURVES)
    timed("memorization", t0, os.path.getsize(mem_results) != before)

  if rc.fingerprints and not ours:
    print("activation fingerprints: skipped (they need Orbax bases)")
  if rc.fingerprints and ours:
    print("activation fingerprints", flush=True)
    t0 = (time.time(), time.process_time())
    fp_dir = os.path.join(workdir, "fingerprints")
    ran = not os.path.exists(os.path.join(fp_dir, "fingerprints.json"))
    outputs.update(base_fingerprints(rc, bases, fp_dir))
    timed("fingerprints", t0, ran)

  save_info(True, runs=len(runs), **({"refinement": refinement} if refinement
                                else {}),
            retention_unigram_loss=unigram, base_heldout_loss=base_losses,
            parameter_shares=shares)
  outputs["run_info"] = info_path
  return outputs


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", "configs/small_consistency.py:quick",
      "The reproduction config (configs/small_consistency.py:MODE).")
  flags.DEFINE_string("workdir", "workdirs/small_consistency",
                      "Where every output goes.")


def main(argv: Sequence[str]) -> None:
  # deferred: pulls in jax; the plan and --help load without it.
  from optconsist_jax import metrics  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  platforms.select_default()
  with errors.user_input():
    rc = study.ReproConfig.from_dict(flags.FLAGS.config.to_dict())
  outputs = run(rc, paths_lib.resolve(flags.FLAGS.workdir))
  print("\nOutputs:")
  for k, v in outputs.items():
    print(f"  {k}: {v}")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
