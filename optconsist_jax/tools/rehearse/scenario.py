"""The pod rehearsal's run: what a first pod run meets, on this machine.

`rehearse(config, out)` trains configs/pod_rehearsal.py (the 7B config with
a tiny model) with `python -m optconsist_jax.train` as a
`tools.launch.local.ProcessGroup` of N processes x D CPU devices, into a
gs:// workdir on the bucket of a local GCS emulator, kept going by the
supervisor's loop (`supervise.Supervision.run`), and:

1. trains a reference run straight through (same shape, its own workdir);
2. trains the rehearsed run, with the eval job (`python -m
   optconsist_jax.evaluate --watch`, one process, supervised the same way)
   watching its workdir from the start;
3. sends SIGTERM to one training process only once step `preempt_at` is
   logged: every process must save the same step and exit 75, and the
   supervisor starts them again;
4. once the resumed run has written a checkpoint, stops (SIGSTOP) one
   process: the watchdog (`hang_timeout`) must save every process's Python
   stacks to W/hangs/ and restart the job, which starts on the next shape
   (another process count and mesh) and finishes;
5. sends SIGTERM to the eval job once it has evaluated a checkpoint: it
   must exit 75 and resume under its supervisor;
6. checks: params of every checkpoint the resumed run wrote on the first
   shape are bitwise those of the reference run at that step; those written
   on the second shape agree within `tolerance` of the distance training
   moved them (L2; another mesh sums in another order); the eval job left
   one record per checkpoint and evaluated the final step.

The checks raise `RehearsalError` naming what failed; the returned dict
(also written to OUT/rehearsal.json) holds what was seen.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

from optconsist_jax import errors
from optconsist_jax import storage
from optconsist_jax.evaluate import results
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.tools.launch import local

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
CONFIG = os.path.join(_REPO, "configs", "pod_rehearsal.py")


class RehearsalError(errors.CommandError):
  """A step of the rehearsal did not go as a pod run needs it to."""


@dataclasses.dataclass(frozen=True)
class RehearsalConfig:
  """Sizes and timings of one rehearsal.

  Attributes:
    shape: (processes, CPU devices per process) of the training job.
    then: the shape the job restarts on after the hang.
    steps: training steps of the run.
    preempt_at: SIGTERM one training process once this step is logged.
    hang_timeout: the watchdog's seconds without a new step.
    startup_timeout: its seconds before a start's first step (compiling on
      a busy machine).
    poll_secs: the supervisors' polling interval.
    grace_secs: seconds between SIGTERM and SIGKILL when a job is stopped.
    tolerance: L2 distance of a checkpoint written on `then` from the
      reference's, as a fraction of the L2 distance the reference moved the
      params from its first checkpoint to its last.
    eval_sigterm: also send SIGTERM to the eval job once.
    bucket: the emulated bucket's name.
  """

  shape: tuple[int, int] = (4, 2)
  then: tuple[int, int] = (2, 2)
  steps: int = 16
  preempt_at: int = 3
  hang_timeout: float = 45.0
  startup_timeout: float = 600.0
  poll_secs: float = 0.5
  grace_secs: float = 5.0
  tolerance: float = 1e-2
  eval_sigterm: bool = True
  bucket: str = "rehearsal"


def train_argv(workdir: str, steps: int) -> list[str]:
  return [sys.executable, "-m", "optconsist_jax.train",
          f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.train.num_steps={steps}",
          # Every checkpoint kept: the rehearsal compares them.
          "--config.checkpoint.keep=1000"]


def eval_argv(workdir: str) -> list[str]:
  return [sys.executable, "-m", "optconsist_jax.evaluate",
          f"--workdir={workdir}", "--watch", "--config.watch.poll_secs=1",
          "--config.math.limit=2", "--config.math.max_new_tokens=4",
          "--config.multiple_choice.limit=2", "--config.lm_loss.limit=2",
          "--config.lm_loss.max_len=32"]


def _newest_step(group: local.ProcessGroup) -> int:
  """The newest step any running process of the group has logged."""
  steps = [int(n) for _, n in group.job_state().steps if n.isdigit()]
  return max(steps, default=-1)


def _wait_for(what: str, ready: Callable[[], bool], threads, timeout: float,
              poll: float) -> None:
  """Polls `ready` until true; fails if a supervisor ended or time ran out."""
  deadline = time.monotonic() + timeout
  while not ready():
    if not all(t.is_alive() for t in threads):
      raise RehearsalError(f"a supervisor ended while waiting for {what}")
    if time.monotonic() > deadline:
      raise RehearsalError(f"no {what} after {timeout:g} s")
    time.sleep(poll)


def _complete_steps(workdir: str) -> list[int]:
  return [c.step for c in ckpt_lib.list_checkpoints(workdir) if c.complete]


def _has_eval_records(workdir: str) -> bool:
  """Whether the eval job has written a record yet (its results folder
  appears with the first one: read_workdir raises before that)."""
  try:
    return bool(results.read_workdir(workdir))
  except FileNotFoundError:
    return False


def _params(workdir: str, step: int) -> dict[str, np.ndarray]:
  """A checkpoint's params as numpy arrays, by flattened name."""
  # deferred: jax and orbax are heavy; the driver's other parts need neither.
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  where = ckpt_lib.checkpoint_dir(workdir) / str(step) / ckpt_lib.PARAMS
  with ocp.PyTreeCheckpointer() as c:
    meta = c.metadata(where).item_metadata
    tree = getattr(meta, "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                        tree)
    got = c.restore(where, args=ocp.args.PyTreeRestore(restore_args=args))
  flat = {}

  def visit(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      flat[prefix] = np.asarray(node)
  visit("", got)
  return flat


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  if a.keys() != b.keys():
    raise RehearsalError(f"param names differ: {sorted(a.keys() ^ b.keys())}")
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
             for k in a)


def _l2_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  """The L2 norm of a - b over every param."""
  return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2)
                           for k in a)))


def _group(job, argv, shapes, out_dir, cfg, env, log, hang=0.0):
  return local.ProcessGroup(
      job=job, argv=argv, shapes=shapes, log_dir=os.path.join(out_dir, "logs"),
      env=env, poll_secs=cfg.poll_secs, hang_timeout=hang,
      grace_secs=cfg.grace_secs, max_restarts=4, out=log,
      startup_timeout=cfg.startup_timeout if hang else 0.0,
      stacks_dir=f"{argv_workdir(argv)}/hangs")


def argv_workdir(argv: list[str]) -> str:
  return next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))


def _supervised(group: local.ProcessGroup, rcs: dict[str, int]):
  def target():
    try:
      rcs[group.job] = group.run()
    finally:
      group.close()
  t = threading.Thread(target=target, name=group.job, daemon=True)
  t.start()
  return t


def rehearse(cfg: RehearsalConfig, out_dir: str, env: dict[str, str],
             log=sys.stdout) -> dict[str, Any]:
  """Runs the rehearsal (module docstring); `env` reaches the bucket."""
  say = lambda msg: print(f"[rehearse] {msg}", file=log, flush=True)
  root = f"gs://{cfg.bucket}"
  ref_w, run_w = f"{root}/reference", f"{root}/run"
  seen: dict[str, Any] = {"shape": list(cfg.shape), "then": list(cfg.then),
                          "steps": cfg.steps}
  t0 = time.monotonic()

  say(f"1. reference run: {cfg.shape[0]} x {cfg.shape[1]} straight to step"
      f" {cfg.steps} in {ref_w}")
  ref = _group("reference", train_argv(ref_w, cfg.steps), [cfg.shape],
               out_dir, cfg, env, log)
  rcs: dict[str, int] = {}
  _supervised(ref, rcs).join()
  if rcs.get("reference") != 0:
    raise RehearsalError(f"the reference run exited {rcs.get('reference')}"
                         f" (logs: {out_dir}/logs/reference.*)")
  seen["reference_s"] = round(time.monotonic() - t0, 1)

  say(f"2. rehearsed run in {run_w}, the eval job watching it")
  train = _group("train", train_argv(run_w, cfg.steps),
                 [cfg.shape, cfg.shape, cfg.then], out_dir, cfg, env, log,
                 hang=cfg.hang_timeout)
  evaluate = _group("eval", eval_argv(run_w), [(1, 1)], out_dir, cfg, env,
                    log)
  threads = [_supervised(train, rcs), _supervised(evaluate, rcs)]
  poll = cfg.poll_secs
  try:
    _wait_for(f"step {cfg.preempt_at}",
              lambda: _newest_step(train) >= cfg.preempt_at, threads, 900,
              poll)
    pid = train.signal(len(train.procs) - 1, signal.SIGTERM)
    say(f"3. SIGTERM to training process {len(train.procs) - 1} only (pid"
        f" {pid}) at step {_newest_step(train)}")
    first = list(train.procs)
    _wait_for("restart after the preemption", lambda: train.starts >= 2,
              threads, 900, poll)
    seen["preempt_exit_codes"] = [p.returncode for p in first]
    if any(p.returncode != errors.PREEMPTED for p in first):
      raise RehearsalError(
          "after SIGTERM to one process every process must save and exit"
          f" {errors.PREEMPTED}; exit codes: {seen['preempt_exit_codes']}")
    resumed_from = max(_complete_steps(run_w))
    seen["preempted_at_step"] = resumed_from

    # The hang and the eval job's SIGTERM, each as soon as it is due.
    second, eval_first = None, None
    deadline = time.monotonic() + 900
    while second is None or (cfg.eval_sigterm and eval_first is None):
      if not all(t.is_alive() for t in threads):
        raise RehearsalError("a supervisor ended before the hang and the"
                             " eval job's SIGTERM were sent")
      if time.monotonic() > deadline:
        raise RehearsalError("no checkpoint after the resume, or no eval"
                             " record, after 900 s")
      if second is None and max(_complete_steps(run_w)) > resumed_from:
        second = list(train.procs)
        pid = train.signal(len(second) - 1, signal.SIGSTOP)
        seen["hung_at_step"] = _newest_step(train)
        first_shape_steps = _complete_steps(run_w)
        say(f"4. SIGSTOP to training process {len(second) - 1} (pid {pid})"
            f" at step {seen['hung_at_step']}: waiting for the watchdog"
            f" ({cfg.hang_timeout:g} s)")
      if (cfg.eval_sigterm and eval_first is None
          and _has_eval_records(run_w)):
        eval_first = list(evaluate.procs)
        evaluate.signal(0, signal.SIGTERM)
        say("5. SIGTERM to the eval job")
      time.sleep(poll)
    if cfg.eval_sigterm:
      _wait_for("the eval job's restart", lambda: evaluate.starts >= 2,
                threads, 900, poll)
      seen["eval_sigterm_exit_code"] = eval_first[0].returncode
      if eval_first[0].returncode != errors.PREEMPTED:
        raise RehearsalError("the eval job exited"
                             f" {eval_first[0].returncode} on SIGTERM, not"
                             f" {errors.PREEMPTED}")
    for t in threads:
      t.join(1800)
  finally:
    for g in (train, evaluate):
      g.close()
  seen["rehearsal_s"] = round(time.monotonic() - t0, 1)
  for job in ("train", "eval"):
    if rcs.get(job) != 0:
      raise RehearsalError(f"the {job} job's supervisor ended with"
                           f" {rcs.get(job)} (logs: {out_dir}/logs/{job}.*)")
  if train.starts != 3:
    raise RehearsalError(f"expected 3 starts of the training job (first,"
                         f" after SIGTERM, after the hang); saw {train.starts}")
  hangs = sorted(os.fspath(h) for h in storage.path(
      f"{run_w}/hangs").glob("*/process-*.txt"))
  seen["stacks"] = hangs
  dumps = [storage.read_text(h) for h in hangs]
  if (len(hangs) != len(second)
      or not any("T (stopped)" in d for d in dumps)
      or not all("most recent call first" in d for d in dumps)):
    raise RehearsalError(f"the watchdog's stacks are not as expected: {hangs}")
  os.makedirs(os.path.join(out_dir, "hangs"), exist_ok=True)
  for h, d in zip(hangs, dumps):
    with open(os.path.join(out_dir, "hangs", os.path.basename(h)), "w") as f:
      f.write(d)

  say("6. checking checkpoints against the reference and the eval records")
  seen.update(_compare(ref_w, run_w, resumed_from, first_shape_steps, cfg))
  records = results.read_workdir(run_w)
  steps = [r.step for r in records if not r.is_base]
  if len(steps) != len(set(steps)) or cfg.steps not in steps:
    raise RehearsalError(f"eval records: steps {steps} (one each, the final"
                         f" {cfg.steps} among them, expected)")
  seen["evaluated_steps"] = steps
  return seen


def _compare(ref_w, run_w, resumed_from, first_shape_steps, cfg):
  ref_steps, run_steps = _complete_steps(ref_w), _complete_steps(run_w)
  bitwise = [s for s in first_shape_steps if s in ref_steps]
  later = [s for s in run_steps if s not in first_shape_steps
           and s in ref_steps]
  if max(bitwise, default=0) <= resumed_from or cfg.steps not in later:
    raise RehearsalError(f"checkpoints to compare: resumed on the first shape"
                         f" {bitwise}, on the second {later} (reference"
                         f" {ref_steps}, run {run_steps})")
  start = _params(ref_w, min(ref_steps))
  final = _params(ref_w, cfg.steps)
  moved = _l2_diff(start, final)
  for s in bitwise:
    d = _max_diff(_params(ref_w, s), _params(run_w, s))
    if d != 0.0:
      raise RehearsalError(f"step {s}, resumed after SIGTERM on the same"
                           f" shape: params differ from the reference by {d}"
                           " (expected bitwise equal)")
  # L2 over all params, relative to how far training moved them: Adam's
  # normalization turns another summation order's tiny gradient differences
  # into update differences of up to the learning rate on near-zero
  # gradients, so a max over elements says little.
  diffs = {s: _l2_diff(_params(ref_w, s), _params(run_w, s)) / moved
           for s in later}
  worst = max(diffs.values())
  if not worst <= cfg.tolerance:
    raise RehearsalError(f"resumed on {cfg.then}: params differ from the"
                         f" reference by {diffs} of the distance training"
                         f" moved them ({moved:.3g}, L2); allowed"
                         f" {cfg.tolerance:g}")
  return {"bitwise_steps": bitwise, "resumed_from": resumed_from,
          "other_shape_steps": later, "other_shape_rel_l2": worst,
          "moved_l2": moved}
