"""A job as N processes on this machine, kept going by the supervisor's loop.

`ProcessGroup` is a `supervise.Supervision` backend: the "slice" is this
machine (never reclaimed) and the job is N copies of one program, each a
JAX process with D CPU devices joined by `jax.distributed` on loopback
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, read by
platforms.maybe_initialize_distributed; CPU collectives over gloo), the way
`gcloud ... ssh --worker=all` starts one program on every host of a pod.
The restart policy, the exit-code rules and the hang watchdog are the
`Supervision.run` loop the Cloud TPU supervisor runs, not a copy of it.

Each start may take the next (processes, devices) of `shapes` (the last
repeats): a job restarted onto another process count and mesh, as a slice
recreated at another size would be. Logs: LOG_DIR/<name>.<start>.<i>.log.
Job state per process, as `worker_commands.job_status_command` reports it
from a TPU worker: running or its exit code (a signal N as 128+N, as a
shell reports it), the newest step in its log and whether it waits for
input (evaluate --watch).

A hung job's stacks (`collect_stacks`): every process gets SIGABRT and then
SIGCONT, so a stopped (SIGSTOP) process wakes up to take it too, and
faulthandler (PYTHONFAULTHANDLER=1, set at start) writes every thread's
Python stack to its log; the new bytes of each log, headed by the state
/proc showed before (`T (stopped)` for a stopped process), land in
FOLDER/process-<i>.txt (FOLDER local or gs://).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
import re
import signal
import socket
import subprocess
import time

from optconsist_jax import storage
from optconsist_jax.tools.launch import supervise
from optconsist_jax.tools.launch import worker_commands as workers_lib

UP = "LOCAL"
_TAIL_BYTES = 262144  # As job_status_command reads a worker's log.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def process_env(index: int, processes: int, devices: int, port: int,
                xla_flags: str = "") -> dict[str, str]:
  """What process `index` of `processes` needs (D CPU devices each).

  `xla_flags` (the caller's XLA_FLAGS) reach the process, with their device
  count replaced by D.
  """
  kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_COUNT)]
  env = {"JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join([*kept, f"{_DEVICE_COUNT}={devices}"]),
         "PYTHONFAULTHANDLER": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  return env


def _proc_state(pid: int) -> str:
  """The process state /proc shows (`R (running)`, `T (stopped)`, ...)."""
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("State:"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def _rc(p: subprocess.Popen) -> int | None:
  rc = p.poll()
  return 128 - rc if rc is not None and rc < 0 else rc


@dataclasses.dataclass(kw_only=True)
class ProcessGroup(supervise.Supervision):
  """Supervises `argv` run as N local processes (see the module docstring).

  Attributes:
    job: the job's name (log files, messages).
    argv: the program, e.g. [python, -m, optconsist_jax.train, --config=...].
    shapes: (processes, devices per process) of each start; the last repeats.
    log_dir: a local folder for the processes' logs.
    env: more environment for every process (the bucket's, ...).
    grace_secs: `stop_job` waits this long after SIGTERM before SIGKILL.
    cwd: where the processes run.
  """

  job: str
  argv: Sequence[str]
  shapes: Sequence[tuple[int, int]]
  log_dir: str
  env: Mapping[str, str] = dataclasses.field(default_factory=dict)
  grace_secs: float = 10.0
  cwd: str | None = None
  up_states = (UP,)
  gone_states = ()
  procs: list[subprocess.Popen] = dataclasses.field(default_factory=list,
                                                   init=False)
  logs: list[str] = dataclasses.field(default_factory=list, init=False)
  starts: int = dataclasses.field(default=0, init=False)

  def __post_init__(self):
    if not self.shapes or any(n < 1 or d < 1 for n, d in self.shapes):
      raise ValueError(f"shapes={self.shapes!r}: (processes, devices) pairs"
                       " of positive numbers")

  @property
  def name(self) -> str:
    return f"{self.job} (local)"

  def _say(self, msg: str):
    print(f"[supervise {self.job}] {msg}", file=self.out, flush=True)

  def launch(self) -> int:
    return self.start_job()

  def slice_state(self) -> str:
    return UP

  def recreate(self) -> int:
    return self.start_job()

  def start_job(self) -> int:
    n, d = self.shapes[min(self.starts, len(self.shapes) - 1)]
    self.starts += 1
    os.makedirs(self.log_dir, exist_ok=True)
    port = free_port()
    self.procs, self.logs = [], []
    for i in range(n):
      log = os.path.join(self.log_dir, f"{self.job}.{self.starts}.{i}.log")
      env = {**os.environ, **self.env}
      env.update(process_env(i, n, d, port, env.get("XLA_FLAGS", "")))
      with open(log, "wb") as f:
        # pylint: disable-next=consider-using-with
        self.procs.append(subprocess.Popen(
            list(self.argv), cwd=self.cwd, env=env, stdout=f,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
      self.logs.append(log)
    self._say(f"started {self.job} (start {self.starts}): {n} processes x {d}"
              f" CPU devices, coordinator 127.0.0.1:{port}, logs"
              f" {self.log_dir}/{self.job}.{self.starts}.*.log")
    return 0

  def status_lines(self) -> str:
    """One `job-state` line per process, as a TPU worker reports it."""
    lines = []
    for i, (p, log) in enumerate(zip(self.procs, self.logs)):
      rc = _rc(p)
      state = "running" if rc is None else f"exit:{rc}"
      try:
        with open(log, "rb") as f:
          f.seek(max(0, os.path.getsize(log) - _TAIL_BYTES))
          text = f.read().decode("utf-8", "replace")
      except OSError:
        text = ""
      marks = [m.group() for m in re.finditer(workers_lib.STEP_MARKS, text,
                                              flags=re.M)]
      step = re.search(r"[0-9]+", marks[-1]).group() if marks else "-"
      last = text.rstrip("\n").rpartition("\n")[2]
      idle = " idle" if rc is None and last.startswith(
          workers_lib.IDLE_LINE) else ""
      lines.append(f"{workers_lib.STATUS_PREFIX} process-{i} {state}"
                   f" {step}{idle}")
    return "\n".join(lines)

  def job_state(self) -> supervise.JobState:
    if not self.procs:
      return supervise.JobState("none")
    return supervise.parse_job_state(self.status_lines(), len(self.procs))

  def signal(self, index: int, signum: int) -> int:
    """Sends `signum` to process `index` (a preemption notice, a stop)."""
    p = self.procs[index]
    os.kill(p.pid, signum)
    return p.pid

  def collect_stacks(self, where: str) -> int:
    states = [_proc_state(p.pid) for p in self.procs]
    sizes = [os.path.getsize(log) for log in self.logs]
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGABRT)
        p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    for p in self.procs:
      try:
        p.wait(max(0.1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    for i, (log, size, state) in enumerate(zip(self.logs, sizes, states)):
      with open(log, "rb") as f:
        f.seek(size)
        dump = f.read().decode("utf-8", "replace")
      storage.write_text(
          f"{where.rstrip('/')}/process-{i}.txt",
          f"process {i} (pid {self.procs[i].pid}), state before the dump:"
          f" {state}\n{dump}")
      self._say(f"stacks of process {i} ({state}) ->"
                f" {where.rstrip('/')}/process-{i}.txt")
    return 0

  def stop_job(self) -> int:
    """SIGTERM (and SIGCONT), SIGKILL after `grace_secs`; waits for all."""
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + self.grace_secs
    for p in self.procs:
      try:
        p.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return 0

  def close(self) -> None:
    """Kills what still runs (an interrupted rehearsal)."""
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
