"""`launch tpu supervise`: keep one job going on preemptible slice(s).

Spot VMs and queued resources can be reclaimed at any time ("Manage TPU Spot
VMs", "Manage queued resources" in the Cloud TPU docs); a job stopped by
SIGTERM saves a checkpoint and exits with errors.PREEMPTED. The Supervisor
polls the slice and the job and recreates / restarts them until the job
finishes, reading the job's state from every worker, and restarts a job that
stopped making progress (a hang) after saving its Python stacks.

The decisions (`Supervision.run`) are separate from how a slice and a job
are reached: `Supervisor` drives Cloud TPU slices through gcloud and ssh;
tools/launch/local.py drives N processes on this machine (the pod
rehearsal, tools/rehearse) through the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import subprocess
import sys
import time

from optconsist_jax import errors
from optconsist_jax.tools.launch import gcloud
from optconsist_jax.tools.launch import worker_commands as workers_lib
from optconsist_jax.tools.launch.gcloud import Command


@dataclasses.dataclass(frozen=True)
class JobState:
  """The job over all workers of all slices.

  kind: `running` (every worker), `partial` (some running, some ended),
  `done` (every worker exited 0), `failed` (a worker exited with another
  code than 0 and 75; `code` says which), `preempted` (a worker exited 75
  and none runs), `none` (no job on a worker and none runs: the VM
  restarted) or `unreachable` (ssh failed or workers are missing).
  steps: (host, newest step in its log or "-") of the running workers.
  idle: a worker is waiting for input (evaluate --watch), not hung.
  """

  kind: str
  code: int | None = None
  steps: tuple[tuple[str, str], ...] = ()
  idle: bool = False


def parse_job_state(stdout: str, workers: int) -> JobState:
  """Reads the `job_status_command` lines of `workers` workers."""
  rows = {}
  for line in stdout.splitlines():
    words = line.split()
    if len(words) >= 4 and words[0] == workers_lib.STATUS_PREFIX:
      rows[words[1]] = (words[2], words[3], "idle" in words[4:])
  if len(rows) < workers:
    return JobState("unreachable")
  states = [state for state, _, _ in rows.values()]
  codes = [int(x.split(":")[1]) for x in states if x.startswith("exit:")]
  steps = tuple(sorted((h, n) for h, (x, n, _) in rows.items()
                       if x == "running"))
  idle = any(i for x, _, i in rows.values() if x == "running")
  failed = [c for c in codes if c not in (errors.OK, errors.PREEMPTED)]
  if failed:
    return JobState("failed", failed[0], steps, idle)
  running = states.count("running")
  if running == len(states):
    return JobState("running", None, steps, idle)
  if running:
    return JobState("partial", None, steps, idle)
  if errors.PREEMPTED in codes:
    return JobState("preempted", errors.PREEMPTED)
  if "none" in states:
    return JobState("none")
  return JobState("done", errors.OK)


@dataclasses.dataclass(kw_only=True)
class Supervision:
  """The restart policy, over any way of reaching a slice and its job.

  Each poll: if the slice is gone (preempted / suspended / missing) it is
  created again and the job started (it resumes from its workdir). The
  job's state is read from every worker (`JobState`): a worker that exited
  with errors.PREEMPTED (SIGTERM, checkpoint saved) while none runs, or a
  job gone from the workers, is started again; exit 0 everywhere ends the
  supervision; any other exit code (2 refused input, 3 non-finite loss, 74
  failed save, a crash) stops it with that code, since a restart would fail
  the same way. The hang watchdog: when the running workers' newest steps
  have not changed for `hang_timeout` seconds (0: off; an idle evaluate
  --watch does not count), every worker's Python stacks are saved under
  `stacks_dir`/TIME/ and the job is stopped and started again (it resumes
  from its last checkpoint); before a start's first step (loading weights,
  compiling) the limit is `startup_timeout` instead, when set. At most
  `max_restarts` restarts of any kind.

  A backend (a subclass) says how: `name`, `launch` (create the slice and
  start the job), `slice_state` (one of `up_states`, `gone_states`, or a
  state to wait out), `recreate`, `job_state`, `start_job`,
  `collect_stacks(folder)` and `stop_job`; each action returns an exit code
  (0: done).
  """

  max_restarts: int = 10
  poll_secs: float = 300.0
  hang_timeout: float = 0.0
  startup_timeout: float = 0.0  # before a start's first step; 0: hang_timeout
  stacks_dir: str = ""  # the workdir's hangs/ folder
  out: object = sys.stdout
  sleep: Callable[[float], None] = time.sleep
  clock: Callable[[], float] = time.monotonic

  up_states = gcloud.UP_STATES
  gone_states = gcloud.GONE_STATES

  @property
  def name(self) -> str:
    raise NotImplementedError

  def launch(self) -> int:
    raise NotImplementedError

  def slice_state(self) -> str:
    raise NotImplementedError

  def recreate(self) -> int:
    raise NotImplementedError

  def job_state(self) -> JobState:
    raise NotImplementedError

  def start_job(self) -> int:
    raise NotImplementedError

  def collect_stacks(self, where: str) -> int:
    raise NotImplementedError

  def stop_job(self) -> int:
    raise NotImplementedError

  def _say(self, msg: str):
    print(f"[supervise] {msg}", file=self.out, flush=True)

  def _limit(self, steps) -> float:
    """The watchdog's seconds: `startup_timeout` until a step is logged.

    Step 0 does not count: the trainer logs its parameter overview as step 0
    before compiling its first step.
    """
    if self.startup_timeout and not any(
        n.isdigit() and int(n) > 0 for _, n in steps):
      return self.startup_timeout
    return self.hang_timeout

  def restart_hung(self, steps) -> int:
    """Saves every worker's stacks, stops the job and starts it again."""
    where = (f"{self.stacks_dir.rstrip('/')}/"
             + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    shown = ", ".join(f"{h} {n}" for h, n in steps) or "no step yet"
    self._say(f"no step progress for {self._limit(steps):g} s (newest step per"
              f" worker: {shown}): saving every worker's Python stacks to"
              f" {where}/ and restarting the job")
    self.collect_stacks(where)
    self.stop_job()
    return self.start_job()

  def run(self) -> int:
    restarts = 0
    rc = self.launch()
    if rc:
      return rc
    progress, since = None, self.clock()
    while True:
      self.sleep(self.poll_secs)
      state = self.slice_state()
      if state not in self.up_states:
        if state not in self.gone_states:
          self._say(f"slice {self.name} is {state}; waiting")
          continue
        if restarts >= self.max_restarts:
          self._say(f"slice {self.name} is {state or 'gone'}; gave up"
                    f" after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        self._say(f"slice {self.name} is {state or 'gone'}"
                  f" (preempted): creating it again and resuming (restart"
                  f" {restarts} of {self.max_restarts})")
        rc = self.recreate()
        if rc:
          return rc
        progress, since = None, self.clock()
        continue
      job = self.job_state()
      if job.kind == "unreachable":
        continue
      if job.kind in ("running", "partial"):
        if job.idle or job.steps != progress:
          progress, since = job.steps, self.clock()
        if (not self.hang_timeout
            or self.clock() - since < self._limit(job.steps)):
          continue
        if restarts >= self.max_restarts:
          self._say(f"the job is hung; gave up after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        rc = self.restart_hung(job.steps)
        if rc:
          return rc
        progress, since = None, self.clock()
        continue
      if job.kind == "done":
        self._say("the job finished (exit 0) on every worker")
        return errors.OK
      if job.kind in ("preempted", "none"):
        if restarts >= self.max_restarts:
          self._say(f"gave up after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        why = ("was preempted and saved (exit 75)" if job.kind == "preempted"
               else "is not running (the VM restarted?)")
        self._say(f"the job {why}: starting it again to resume (restart"
                  f" {restarts} of {self.max_restarts})")
        rc = self.start_job()
        if rc:
          return rc
        progress, since = None, self.clock()
        continue
      if self.slice_state() not in self.up_states:
        continue  # Killed by the slice going away: recreated next poll.
      self._say(f"the job failed with exit code {job.code}; not restarting"
                " (see the worker's log: launch tpu logs --worker=N)")
      return job.code


@dataclasses.dataclass(kw_only=True)
class Supervisor(Supervision):
  """Keeps one job going on a (spot / queued, one or several) Cloud TPU
  slice(s), through gcloud: a gone slice is deleted, created again,
  installed, staged and the job started (`setup`); the job's state comes from
  `status` run on every worker (`worker_commands.job_status_command`)."""

  target: gcloud.TpuTarget
  spec: gcloud.SliceSpec
  setup: list[Command]  # install + stage + start, after a (re)create
  start: list[Command]  # start the job on a live slice
  status: Command
  workers: int = 1  # hosts over all slices: the status lines expected
  collect: Callable[[str], list[Command]] | None = None  # stacks -> folder
  stop: list[Command] = dataclasses.field(default_factory=list)

  @property
  def name(self) -> str:
    return self.target.name

  def _run(self, commands: list[Command]) -> int:
    return gcloud.run_commands(commands, False, out=self.out)

  def launch(self) -> int:
    return self._run(gcloud.create_commands(self.target, self.spec)
                     + self.setup)

  def slice_state(self) -> str:
    r = subprocess.run(self.target.state_argv(self.spec.queued),
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""

  def job_state(self) -> JobState:
    r = subprocess.run(self.status.argv, capture_output=True, text=True,
                       check=False)
    if r.returncode:
      return JobState("unreachable")
    return parse_job_state(r.stdout, self.workers)

  def recreate(self) -> int:
    commands = (gcloud.delete_commands(self.target, self.spec.queued)
                + gcloud.create_commands(self.target, dataclasses.replace(
                    self.spec, reuse=False, wait=True)) + self.setup)
    self._run(commands[:1])  # Deleting what is already gone may fail.
    return self._run(commands[1:])

  def start_job(self) -> int:
    return self._run(self.start)

  def collect_stacks(self, where: str) -> int:
    return self._run(self.collect(where) if self.collect else [])

  def stop_job(self) -> int:
    return self._run(self.stop)
