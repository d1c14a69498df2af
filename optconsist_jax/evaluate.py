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
3. Evaluates the base model first (any weight source of io.weights: a
   Hugging Face folder or Hub id, a nanoGPT ckpt.pt, an Orbax checkpoint;
   `config.base_model`, default the run's `init_from` with its kind and
   step), so every plot has its starting point.
4. For every complete checkpoint in W/checkpoints not yet in
   W/eval/results.jsonl: restores params only (io.weights.restore_run_model,
   resharded onto the eval mesh), merges LoRA adapters into the base weights
   (model.lora.merge), runs the evals (evals.suite), writes the per-item predictions to
   W/eval/predictions/step_<N>.jsonl and then appends one line (the
   `results.EvalRecord` schema) to W/eval/results.jsonl, plus clu scalars
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

The pieces live in evals/: config.py (EvalConfig, the defaults), suite.py (the
evals on one model), job.py (the run's config, the Evaluator).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import logging
import jax
import ml_collections

from optconsist_jax import errors
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import paths
from optconsist_jax import platforms
from optconsist_jax import results
from optconsist_jax.evals import config as eval_config
from optconsist_jax.evals.config import EvalConfig
from optconsist_jax.evals.job import EVAL_DIR
from optconsist_jax.evals.job import Evaluator
from optconsist_jax.io import checkpoints as ckpt_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default eval config: `EvalConfig()`'s defaults (evals/config.py)."""
  del arg
  return eval_config.default_config()


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
      r.is_base and r.checkpoint == base.path for r in records):
    say(f"evaluating base model {base.path} ({base.kind})")
    model = ev.base_model(base)
    r = ev.evaluate_model(model, step=0, epoch=0.0, checkpoint=base.path,
                          is_base=True, name="base", progress=say)
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
                            name=f"step_{info.step:08d}", run=run,
                            progress=say)
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
        f.config.to_dict(), eval_config.PATH_KEYS,
        keep=eval_config.BUILT_IN_SOURCES))
    try:
      ev = Evaluator(workdir, config)
    except results.EvalFileError as e:
      raise errors.UserError(str(e)) from e
  try:
    r = evaluate_workdir(workdir, config, watch=f.watch, evaluator=ev)
  except (results.EvalFileError, FileNotFoundError) as e:
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
