"""The eval job over one workdir: the base model, then every checkpoint.

`evaluate_workdir` evaluates what W/checkpoints holds (and, with `watch`,
what arrives) with an `evaluate.job.Evaluator`; the command line
(`python -m optconsist_jax.evaluate`, evaluate/__main__.py) says what it
does step by step.

SIGTERM (a preemption notice, the supervisor stopping the job) ends the job
with errors.Preempted (exit 75), as it ends training: while it waits for
checkpoints at once, while it evaluates one after that checkpoint's record
is written (each record is one object, written whole: nothing partial, and
the rerun skips what has a record). The same command resumes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

from absl import logging

from optconsist_jax import errors
from optconsist_jax import storage
from optconsist_jax.evaluate import job as job_lib
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.job import Evaluator
from optconsist_jax.io import checkpoint_layout as ckpt_lib


@dataclasses.dataclass
class JobResult:
  evaluated: list[int]
  failed: list[int]
  base_evaluated: bool


class _Termination:
  """SIGTERM -> errors.Preempted: at once while `waiting`, else at `check`.

  Installed only in the main thread (where Python runs signal handlers).
  """

  def __init__(self, result: JobResult, *, last: bool = True):
    self.result = result
    self.last = last  # The job's work ends with this block.
    self.requested = False
    self.waiting = False
    self._previous = None

  def _error(self) -> errors.Preempted:
    done = self.result.evaluated
    return errors.Preempted(
        f"stopped by SIGTERM after evaluating {len(done)} checkpoints"
        f" ({done or 'none'}) in this job, each with its record written;"
        " rerun the same command to resume")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      def handler(signum, frame):
        del signum, frame
        self.requested = True
        if self.waiting:
          raise self._error()
      self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is None:
      return
    if self.last:
      # The work is done (or failed): a SIGTERM now lets the job end as it
      # was going to, rather than killing it (exit 143, which a supervisor
      # reads as a crash).
      signal.signal(signal.SIGTERM, lambda *_: None)
    else:
      signal.signal(signal.SIGTERM, self._previous)

  def check(self) -> None:
    if self.requested:
      raise self._error()


def wait_for_run(workdir: str | os.PathLike, poll_secs: float, *,
                 sleep=time.sleep, out=sys.stdout) -> None:
  """--watch started beside the trainer: waits until W/config.json exists.

  The trainer writes it before its first step; until then the job reads as
  idle (the line starts as the one it prints between checkpoints).
  SIGTERM meanwhile: errors.Preempted.
  """
  config_path = storage.path(workdir) / job_lib.RUN_CONFIG_FILE
  said = False
  with _Termination(JobResult([], [], False), last=False) as term:
    term.waiting = True
    while not config_path.exists():
      if not said:
        print(f"waiting for new checkpoints: {config_path} is not there yet"
              " (the training job writes it before its first step; polling"
              f" every {poll_secs:g} s)", file=out, flush=True)
        said = True
      sleep(poll_secs)


def evaluate_workdir(workdir: str | os.PathLike, config: EvalConfig, *,
                     watch: bool = False, evaluator: Evaluator | None = None,
                     sleep=time.sleep, clock=time.monotonic,
                     out=sys.stdout) -> JobResult:
  """Evaluates the base model and every new complete checkpoint of W.

  Raises:
    errors.Preempted: on SIGTERM (see the module docstring).
  """
  ev = evaluator or Evaluator(workdir, config)
  result = JobResult([], [], False)
  try:
    with _Termination(result) as term:
      _evaluate(ev, workdir, config, watch, sleep, clock, out, result, term)
  finally:
    ev.close()
  return result


def _evaluate(ev: Evaluator, workdir, config: EvalConfig, watch: bool, sleep,
              clock, out, result: JobResult, term: _Termination) -> None:
  """evaluate_workdir's passes over W (`term` stops them on SIGTERM)."""
  records = ev.done()
  done_steps = {r.step for r in records if not r.is_base}
  say = lambda msg: print(msg, file=out, flush=True)

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
    term.check()

  attempts: dict[int, int] = {}  # step -> failed reads so far
  given_up: set[int] = set()
  retries = config.watch.retries
  last_new = clock()
  said_waiting = False
  while True:
    term.waiting = True
    infos = ckpt_lib.list_checkpoints(workdir)
    term.waiting = False
    # Finalized but unreadable (meta missing or truncated), or complete.
    todo = [info for info in infos
            if (info.complete or info.error is not None)
            and info.step not in done_steps and info.step not in given_up]
    for info in todo:
      term.check()
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
    term.check()
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
    term.waiting = True
    term.check()  # A SIGTERM that came while it evaluated.
    sleep(config.watch.poll_secs)
    term.waiting = False
