"""`launch tpu supervise`: keep one job going on a preemptible slice.

Spot VMs and queued resources can be reclaimed at any time ("Manage TPU Spot
VMs", "Manage queued resources" in the Cloud TPU docs); a job stopped by
SIGTERM saves a checkpoint and exits with errors.PREEMPTED. The Supervisor
polls the slice and the job and recreates / restarts them until the job
finishes.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import subprocess
import sys
import time

from optconsist_jax import errors
from optconsist_jax.tools.launch import gcloud
from optconsist_jax.tools.launch.gcloud import Command


@dataclasses.dataclass
class Supervisor:
  """Keeps one training job going on a (spot / queued) slice until it ends.

  Each poll: if the slice is gone (preempted / suspended / missing) it is
  deleted, created again, installed, staged and the job started (it resumes
  from its gs:// workdir); if the job exited with errors.PREEMPTED (SIGTERM,
  checkpoint saved) it is started again; exit 0 ends the supervision; any
  other exit code (2 refused input, 3 non-finite loss, 74 failed save, a
  crash) stops it with that code, since a restart would fail the same way.
  At most `max_restarts` restarts.
  """

  target: gcloud.TpuTarget
  spec: gcloud.SliceSpec
  setup: list[Command]  # install + stage + start, after a (re)create
  start: list[Command]  # start the job on a live slice
  status: Command
  max_restarts: int = 10
  poll_secs: float = 300.0
  out: object = sys.stdout
  sleep: Callable[[float], None] = time.sleep

  def _say(self, msg: str):
    print(f"[supervise] {msg}", file=self.out, flush=True)

  def slice_state(self) -> str:
    r = subprocess.run(self.target.state_argv(self.spec.queued),
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""

  def job_state(self) -> str:
    r = subprocess.run(self.status.argv, capture_output=True, text=True,
                       check=False)
    if r.returncode:
      return "unreachable"
    return (r.stdout.strip().splitlines() or ["none"])[-1]

  def _run(self, commands: list[Command]) -> int:
    return gcloud.run_commands(commands, False, out=self.out)

  def recreate(self) -> int:
    commands = (gcloud.delete_commands(self.target, self.spec.queued)
                + gcloud.create_commands(self.target, dataclasses.replace(
                    self.spec, reuse=False, wait=True)) + self.setup)
    self._run(commands[:1])  # Deleting what is already gone may fail.
    return self._run(commands[1:])

  def run(self) -> int:
    restarts = 0
    rc = self._run(gcloud.create_commands(self.target, self.spec) + self.setup)
    if rc:
      return rc
    while True:
      self.sleep(self.poll_secs)
      state = self.slice_state()
      if state not in gcloud.UP_STATES:
        if state not in gcloud.GONE_STATES:
          self._say(f"slice {self.target.name} is {state}; waiting")
          continue
        if restarts >= self.max_restarts:
          self._say(f"slice {self.target.name} is {state or 'gone'}; gave up"
                    f" after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        self._say(f"slice {self.target.name} is {state or 'gone'}"
                  f" (preempted): creating it again and resuming (restart"
                  f" {restarts} of {self.max_restarts})")
        rc = self.recreate()
        if rc:
          return rc
        continue
      job = self.job_state()
      if job in ("running", "unreachable"):
        continue
      code = int(job.split()[1]) if job.startswith("exit ") else None
      if code == errors.OK:
        self._say("the job finished (exit 0)")
        return errors.OK
      if code == errors.PREEMPTED or code is None:
        if restarts >= self.max_restarts:
          self._say(f"gave up after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        why = ("was preempted and saved (exit 75)" if code is not None
               else "is not running (the VM restarted?)")
        self._say(f"the job {why}: starting it again to resume (restart"
                  f" {restarts} of {self.max_restarts})")
        rc = self._run(self.start)
        if rc:
          return rc
        continue
      if self.slice_state() not in gcloud.UP_STATES:
        continue  # Killed by the slice going away: recreated next poll.
      self._say(f"the job failed with exit code {code}; not restarting (see"
                " its log: launch tpu logs)")
      return code
