"""The eval job over one workdir: the base model, then every checkpoint.

`evaluate_workdir` evaluates what W/checkpoints holds (and, with `watch`,
what arrives) with an `evaluate.job.Evaluator`; the command line
(`python -m optconsist_jax.evaluate`, evaluate/__main__.py) says what it
does step by step.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import logging

from optconsist_jax import errors
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.job import Evaluator
from optconsist_jax.io import checkpoint_layout as ckpt_lib


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
                          is_base=True, progress=say)
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
                            run=run, progress=say)
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
