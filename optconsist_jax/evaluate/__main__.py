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
4. For every complete checkpoint in W/checkpoints without a results object
   yet: restores params only (io.weights.restore_run_model, resharded onto
   the eval mesh), merges LoRA adapters into the base weights
   (model.lora.merge), runs the evals (evals.suite), writes the per-item
   predictions to W/eval/predictions/step_<N>.jsonl and then its record (the
   `results.EvalRecord` schema) to W/eval/results/step_<N>.json, each in one
   write (a bucket has no append or rename; evaluate/results.py), plus
   TensorBoard scalars (W/eval/metrics, keyed by the training step). A crash loses at
   most the checkpoint being evaluated: rerunning skips those with a record
   (an old W/eval/results.jsonl counts too).
5. Half-written checkpoints (Orbax temporary directories) are never read. A
   finalized checkpoint that cannot be read (missing or truncated
   meta/metadata, a corrupt array, another model) is reported on one line
   with its step and cause (errors.short_cause, not TensorStore's spec dump)
   and the rest are evaluated; with --watch it is tried again on the next
   `watch.retries` passes, then given up. Without --watch the job evaluates
   what is there and exits (saying so when there is nothing); with --watch it
   first waits for W/config.json (a job started beside the trainer), then
   polls every `watch.poll_secs` until the run's final step is evaluated or
   given up, or nothing new arrived for `watch.idle_timeout_secs` (0: keep
   waiting). SIGTERM ends the job with exit 75 (errors.PREEMPTED), as it ends
   training: at once while it waits, else once the checkpoint in hand has its
   record; the same command resumes (watch.py).
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

The probes eval (`eval.probes` of an experiment config; the eval config's
`probes`, a ProbesEvalConfig, on with `--config.probes.enabled=True`, off by
default) also measures every finetuned checkpoint's update against its base
(geometry, second-order forgetting, activation drift; evaluate/probes.py) as
probe/<name> metrics, with `probe_seconds` beside `eval_seconds`; the report
relates them to retention (report/mechanism.py).

The pieces beside this file: config.py (EvalConfig, the defaults), suite.py
(the evals on one model), job.py (the run's config, the Evaluator), watch.py
(the loop over checkpoints), results.py (the results schema), and the evals:
math.py, multiple_choice.py, lm_loss.py, harness.py, probes.py (+
probes_geometry.py).
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from optconsist_jax import errors
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import paths
from optconsist_jax import platforms
from optconsist_jax import storage
from optconsist_jax.evaluate import config as eval_config
from optconsist_jax.evaluate import results
from optconsist_jax.evaluate import watch
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.job import Evaluator


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", eval_config.__file__,
      "Eval config file with get_config() (default: evaluate/config.py's).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory W.")
  flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  metrics_lib.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.parse_flags_with_absl()
  platforms.select_default()
  # A multi-host eval slice: every process restores its shards together.
  platforms.maybe_initialize_distributed()
  f = flags.FLAGS
  workdir = paths.resolve(f.workdir)
  # As config.train.compilation_cache_dir="auto": W/compilation_cache on TPU.
  platforms.enable_compilation_cache("auto", workdir)
  with errors.user_input():
    config = EvalConfig.from_dict(paths.resolve_keys(
        f.config.to_dict(), eval_config.PATH_KEYS,
        keep=eval_config.BUILT_IN_SOURCES))
    if f.watch:  # Started beside the trainer, maybe before its first write.
      watch.wait_for_run(workdir, config.watch.poll_secs)
    try:
      ev = Evaluator(workdir, config)
    except results.EvalFileError as e:
      raise errors.UserError(str(e)) from e
  try:
    r = watch.evaluate_workdir(workdir, config, watch=f.watch, evaluator=ev)
  except (results.EvalFileError, FileNotFoundError) as e:
    # A results file that is not ours, a base model that is not there.
    raise errors.UserError(str(e)) from e
  print(f"evaluated {len(r.evaluated)} checkpoints"
        + (" and the base model" if r.base_evaluated else "")
        + (f"; {len(r.failed)} failed to restore: {r.failed}" if r.failed
           else "")
        + f". Results in {storage.join(workdir, results.RESULTS_DIR)}/"
        " (one object per checkpoint)",
        flush=True)


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
