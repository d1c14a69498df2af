"""The study's evaluate stage over many runs, in one or several processes.

`evaluate_runs` hands the jobs to `workers` spawned processes (each keeps
its compiled functions across its jobs) and yields each result as it
finishes; with one worker it evaluates them here, in order, through the
same function. Each run's results are written whole by the eval job
(evaluate/watch.py), so an interrupted pool loses at most the checkpoints
in flight, and the rerun skips what has a record. Whether more processes
pay depends on how many cores one evaluation keeps busy:
bench/eval_workers.py measures it (on 2 cores they do not).

Worker processes share nothing but the files: they suit CPU devices, where
each process gets its own. On an accelerator the first process would hold
the device, so `workers` falls back to 1 there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import concurrent.futures
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Job:
  """One run to evaluate: its name (for progress), workdir and EvalConfig."""
  name: str
  workdir: str
  config: Any


@dataclasses.dataclass(frozen=True)
class Done:
  """What a job did: whether it evaluated anything, its wall and CPU time,
  and the process that ran it."""
  name: str
  ran: bool
  seconds: float
  cpu_seconds: float
  pid: int


def evaluate_job(job: Job) -> Done:
  """Evaluates what `job.workdir` holds that has no record yet."""
  # deferred: pulls in jax, in the worker process only.
  from optconsist_jax.evaluate import watch  # pylint: disable=g-import-not-at-top
  t0, c0 = time.time(), time.process_time()
  r = watch.evaluate_workdir(job.workdir, job.config)
  return Done(job.name, bool(r.evaluated or r.base_evaluated),
              time.time() - t0, time.process_time() - c0, os.getpid())


def die_with_parent(parent_pid: int) -> None:
  """Linux: the kernel kills this process when its parent exits.

  A pool's workers otherwise outlive a killed command (they wait on its
  queue, and the eval job's own SIGTERM handling can keep them from
  exiting), holding cores for nothing. prctl(PR_SET_PDEATHSIG, SIGKILL)
  (man7.org/linux/man-pages/man2/prctl.2.html); elsewhere a no-op.
  """
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return
  pr_set_pdeathsig = 1
  prctl(pr_set_pdeathsig, signal.SIGKILL)
  if os.getppid() != parent_pid:  # the parent exited before prctl
    os._exit(1)


def _init_worker(parent_pid: int) -> None:
  """A spawned worker's process set-up, as the command's main does it."""
  die_with_parent(parent_pid)
  # deferred: the worker's own imports (jax among them).
  from absl import flags  # pylint: disable=g-import-not-at-top
  from optconsist_jax import metrics  # pylint: disable=g-import-not-at-top
  from optconsist_jax import platforms  # pylint: disable=g-import-not-at-top
  # absl flags are unparsed in a spawned process; the eval job's logging
  # reads them.
  flags.FLAGS.mark_as_parsed()
  metrics.quiet_library_logs()
  # The parent's JAX_PLATFORMS is inherited; on CPU this tunes the
  # allocator and LAPACK's threads as the parent's main did.
  platforms.select_default()


def usable_workers(workers: int) -> int:
  """`workers` on CPU devices; 1 where jax's default backend is not CPU."""
  # deferred: pulls in jax; the plan and --help load without it.
  import jax  # pylint: disable=g-import-not-at-top
  return workers if jax.default_backend() == "cpu" else 1


def evaluate_runs(jobs: Sequence[Job], workers: int) -> Iterator[Done]:
  """Evaluates every job, yielding each one's `Done` as it finishes.

  Jobs that evaluate a base model (the first run of each base) must stay
  the only ones that do: the caller decides that in each job's config.
  """
  if workers <= 1 or len(jobs) <= 1:
    for job in jobs:
      yield evaluate_job(job)
    return
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=min(workers, len(jobs)), mp_context=ctx,
      initializer=_init_worker, initargs=(os.getpid(),)) as pool:
    futures = [pool.submit(evaluate_job, job) for job in jobs]
    try:
      for fut in concurrent.futures.as_completed(futures):
        yield fut.result()
    except BaseException:
      for fut in futures:
        fut.cancel()
      raise
