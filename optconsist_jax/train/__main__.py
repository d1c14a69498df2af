r"""The training loop: finetuning (or pretraining) a Llama from a config file.

  python -m optconsist_jax.train --config configs/tiny_metamath.py \
      --workdir /tmp/tiny [--config.train.num_steps=100 ...]

Reads top to bottom (big_vision style):

1. Config: the ml_collections config (with `--config.x.y=...` overrides) is
   converted once to a typed `ExperimentConfig` (train/config.py) and written,
   resolved, to W/config.json. Bad input (unknown keys, a global batch the
   data-parallel axes do not divide, a missing init_from path) fails here,
   before anything is compiled.
2. Mesh and model: the (data, fsdp, tensor) mesh from `config.mesh`; the model,
   optionally wrapped with LoRA adapters (`config.lora`); the optimizer from
   `config.optim` over the trainable params.
3. Initial state, first found wins:
     a. a checkpoint in W/checkpoints (resume: params, optimizer state, data
        iterator position, step; refused if written for another model);
     b. `config.init_from` (optconsist_jax.io.weights): a Hugging Face folder
        or Hub repo id, a nanoGPT ckpt.pt or an Orbax run/checkpoint of a
        full model, possibly saved under another mesh (params only; fresh
        optimizer state);
     c. random init (`config.train.seed`).
   Every array is created directly in its sharding.
4. Loop over steps (`train.num_steps`, or `train.num_epochs` x steps per
   epoch): global batch from the grain pipeline -> jitted step (explicit
   shardings, donated state, gradient accumulation, remat per
   `model.remat_policy`) -> metrics of the *previous* step fetched (no device
   stall) and written every `log_every` steps; residual-stream statistics
   every `stats_every` steps; checkpoints every `checkpoint.every_steps`, at
   each epoch end and at the end (async).
5. Stops: normally (exit 0); on SIGTERM (preemption) after saving the
   current step (exit 75); on a NaN/Inf loss or gradient norm with a message
   naming the step and the last good checkpoint, nothing saved from the bad
   state (exit 3); at the first step after a save that did not commit, naming
   the step directory, the cause and the last good checkpoint (exit 74).
   Refused input exits 2 (optconsist_jax.errors). A workdir holds one run:
   its identity (`run_identity`) is checked against the newest checkpoint's
   recorded config before anything is written; a resume meeting an
   unreadable checkpoint sets it aside (`<step>.corrupt`) and resumes from
   the newest readable one.

Outputs in W: config.json, checkpoints/<step>/ (io/checkpoint_layout.py
documents the layout), metrics/ (TensorBoard event files), profile/ (with
`--config.profile.steps=START:END`: a jax.profiler trace of those steps, for
TensorBoard's profile plugin or xprof) and, on TPU, compilation_cache/ (JAX's
persistent cache, `config.train.compilation_cache_dir`: a restart loads the
compiled step instead of compiling it again).

Steps 1-3 are in setup.py (the state built by state.py), the jitted step in
step.py, the early stops in guards.py, the loop in loop.py; this module is the
command line.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from optconsist_jax import errors
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import paths
from optconsist_jax import platforms
from optconsist_jax.train import loop
from optconsist_jax.train import setup
from optconsist_jax.train.config import ExperimentConfig

# Config keys holding local paths (made absolute at the command line).
PATH_KEYS = ("data.path", "data.tokenizer_path", "data.cache_dir",
             "init_from.path")


def _define_flags():
  """Flags of the command line (only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/*.py[:arg]).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory W.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  metrics_lib.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.parse_flags_with_absl()
  platforms.select_default()
  with errors.user_input():
    config = ExperimentConfig.from_dict(
        paths.resolve_keys(flags.FLAGS.config.to_dict(), PATH_KEYS))
  result = loop.train(config, paths.resolve(flags.FLAGS.workdir))
  w = result.workdir
  final = result.losses.get(result.step)
  what = (f"preempted (exit code {errors.PREEMPTED}): stopped by SIGTERM"
          " after saving; rerun the same command to resume"
          if result.stopped == "preempted" else "done")
  print(f"{what}: step {result.step}"
        + (f", loss {final:.4f}" if final is not None else "")
        + f". Outputs in {w}: {setup.CONFIG_FILE}, checkpoints/ (last:"
        f" {result.last_checkpoint}), metrics/ (tensorboard --logdir"
        f" {os.path.join(w, metrics_lib.METRICS_DIR)})"
        + (f", {loop.PROFILE_DIR}/ (steps {config.profile.steps})"
           if config.profile.steps else ""), flush=True)
  if result.stopped == "preempted":
    sys.exit(errors.PREEMPTED)


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
