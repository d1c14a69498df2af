r"""A pod rehearsal on one machine: `make rehearsal`, no TPU and no GCP needed.

    python -m optconsist_jax.tools.rehearse [--processes=4 --devices=2] \
        [--then=2x2] [--steps=16] [--out=workdirs/rehearsal]

Trains the 7B run's config with a tiny model (configs/pod_rehearsal.py) as N
CPU processes x D devices joined by jax.distributed on loopback, in a gs://
workdir of a local GCS emulator (gcp-storage-emulator, the `test` extra),
under the same supervisor loop as `launch tpu supervise`; preempts one
process (SIGTERM), hangs one (SIGSTOP), restarts onto another process count
and mesh, runs the eval job beside it, and checks that the resumed run is
bitwise the run that was never interrupted (scenario.py says each step).
Prints what it saw; exit 0 when every check passed, 1 naming the one that
did not. Outputs in OUT/<UTC time>/: rehearsal.json (what was seen), logs/
(every process's log, per start), hangs/ (the watchdog's stack dumps).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import os
import time

from optconsist_jax import errors
from optconsist_jax import paths
from optconsist_jax.tools.rehearse import gcs_emulator
from optconsist_jax.tools.rehearse import scenario


def _shape(text: str) -> tuple[int, int]:
  n, sep, d = text.partition("x")
  if not (sep and n.isdigit() and d.isdigit() and int(n) and int(d)):
    raise argparse.ArgumentTypeError(
        f"{text!r}: PROCESSESxDEVICES, e.g. 2x2")
  return int(n), int(d)


def _parser() -> argparse.ArgumentParser:
  d = scenario.RehearsalConfig()
  p = argparse.ArgumentParser(prog="python -m optconsist_jax.tools.rehearse",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--processes", type=int, default=d.shape[0],
                 help="training processes (hosts)")
  p.add_argument("--devices", type=int, default=d.shape[1],
                 help="CPU devices per process (chips per host)")
  p.add_argument("--then", type=_shape, default=d.then,
                 help="PROCESSESxDEVICES the job restarts on after the hang")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--preempt-at", type=int, default=d.preempt_at,
                 help="SIGTERM one process once this step is logged")
  p.add_argument("--hang-timeout", type=float, default=d.hang_timeout,
                 help="the watchdog's seconds without a new step (before a"
                 " start's first step: 600)")
  p.add_argument("--no-eval-sigterm", dest="eval_sigterm",
                 action="store_false", help="leave the eval job alone")
  p.add_argument("--out", default="workdirs/rehearsal",
                 help="local folder for the logs, stacks and rehearsal.json")
  return p


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  cfg = scenario.RehearsalConfig(
      shape=(args.processes, args.devices), then=args.then, steps=args.steps,
      preempt_at=args.preempt_at, hang_timeout=args.hang_timeout,
      eval_sigterm=args.eval_sigterm)
  if min(cfg.shape) < 1 or cfg.shape[0] < 2 or cfg.then == cfg.shape:
    raise errors.UserError(
        f"--processes={args.processes} --then={args.then}: at least 2"
        " processes, and another shape to restart onto")
  if not 2 * cfg.preempt_at < cfg.steps:
    raise errors.UserError(f"--steps={cfg.steps}: more than twice"
                           f" --preempt-at={cfg.preempt_at}")
  # Each rehearsal in a folder of its own: an earlier one is never touched.
  out = os.path.join(paths.resolve(args.out),
                     time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
  os.makedirs(out)
  print(f"[rehearse] starting a GCS emulator (bucket gs://{cfg.bucket}, in"
        " memory)", flush=True)
  with gcs_emulator.running(cfg.bucket) as env:
    env = {**env, "OPTCONSIST_STORAGE_CACHE": os.path.join(out, "gcs_cache")}
    os.environ.update(env)  # This process checks the bucket too.
    seen = scenario.rehearse(cfg, out, env)
  with open(os.path.join(out, "rehearsal.json"), "w") as f:
    json.dump(seen, f, indent=1)
  print(f"[rehearse] passed in {seen['rehearsal_s']:g} s:"
        f" {cfg.shape[0]} x {cfg.shape[1]} devices preempted by SIGTERM to one"
        f" process at step {seen['preempted_at_step']} (exit codes"
        f" {seen['preempt_exit_codes']}) and resumed bitwise (steps"
        f" {seen['bitwise_steps']}); hung at step {seen['hung_at_step']},"
        f" stacks saved, restarted on {cfg.then[0]} x {cfg.then[1]} (steps"
        f" {seen['other_shape_steps']} within {seen['other_shape_rel_l2']:.2g}"
        " of the distance training moved the params from the reference's);"
        " eval records for"
        f" steps {seen['evaluated_steps']}. Outputs in {out}: rehearsal.json,"
        " logs/, hangs/", flush=True)
  return 0


if __name__ == "__main__":
  errors.run(main, absl=False)
