"""The pod rehearsal: N local processes under the supervisor's loop.

First the local process-group backend with a stand-in program (no JAX, a
second or two): a preemption (exit 75 on SIGTERM) is restarted, a stopped
(SIGSTOP) process is a hang whose stacks faulthandler dumps, and the next
start takes the next shape. Then README's rehearsal command end to end: the
7B config with a tiny model as 2 processes x 2 CPU devices on an emulated
bucket, SIGTERM to one process, SIGSTOP to one, a restart onto 1 x 4, the
eval job beside it, and the resumed checkpoints compared with a run never
interrupted (bitwise on the same shape).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from optconsist_jax import errors
from optconsist_jax.tools.launch import local
from optconsist_jax.tools.launch import supervise
from optconsist_jax.tools.launch import worker_commands

import test_readme

REPO = pathlib.Path(__file__).resolve().parent.parent

# Logs a step as clu's LoggingWriter does every 0.2 s from START; SIGTERM:
# exit 75 (a preemption that saved); run to STOP and exit 0.
_PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    start, stop = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
    print("process", os.environ.get("JAX_PROCESS_ID", "-"), "of",
          os.environ.get("JAX_NUM_PROCESSES", "1"), os.environ["XLA_FLAGS"],
          flush=True)
    for step in range(start, stop + 1):
      print(f"I1206 logging_writer.py:48] [{step}] loss=1.0", flush=True)
      time.sleep(0.2)
    """)


def test_process_group_preempt_hang_and_reshape(tmp_path):
  prog = tmp_path / "prog.py"
  prog.write_text(_PROGRAM)
  out = io.StringIO()
  group = local.ProcessGroup(
      job="fake", argv=[sys.executable, str(prog), "1", "20"],
      shapes=[(2, 2), (2, 2), (3, 1)], log_dir=str(tmp_path / "logs"),
      poll_secs=0.1, hang_timeout=2.0, grace_secs=1.0, out=out,
      stacks_dir=str(tmp_path / "hangs"))
  rc = {}
  t = threading.Thread(target=lambda: rc.setdefault("rc", group.run()))
  t.start()
  try:
    def wait(pred, what):
      deadline = time.monotonic() + 60
      while not pred():
        assert time.monotonic() < deadline, f"no {what}: {out.getvalue()}"
        time.sleep(0.05)
    def steps():
      return [int(n) if n.isdigit() else -1
              for _, n in group.job_state().steps]
    wait(lambda: len(steps()) == 2 and min(steps()) >= 3, "step 3")
    first = list(group.procs)
    group.signal(1, signal.SIGTERM)  # One process only.
    wait(lambda: group.starts == 2, "restart after exit 75")
    assert [p.returncode for p in first] == [0, 75]
    wait(lambda: len(steps()) == 2 and min(steps()) >= 1, "second start")
    group.signal(0, signal.SIGSTOP)
    wait(lambda: group.starts == 3, "watchdog restart")
  finally:
    t.join(120)
    group.close()
  text = out.getvalue()
  assert rc["rc"] == errors.OK, text
  assert "preempted and saved (exit 75)" in text
  assert "no step progress for 2 s" in text
  assert "the job finished (exit 0) on every worker" in text
  # The third start took the third shape: 3 processes x 1 device.
  logs = sorted((tmp_path / "logs").glob("fake.3.*.log"))
  assert len(logs) == 3
  head = logs[2].read_text().splitlines()[0]
  assert head.startswith("process 2 of 3 ") and head.endswith(
      " --xla_force_host_platform_device_count=1"), head
  assert head.count("device_count") == 1, head
  # The stopped process woke up to dump its stack (faulthandler on SIGABRT).
  (dump,) = [p for p in (tmp_path / "hangs").glob("*/process-0.txt")]
  body = dump.read_text()
  assert "T (stopped)" in body.splitlines()[0]
  assert "most recent call first" in body and "prog.py" in body


def test_process_env_joins_processes_on_loopback():
  env = local.process_env(1, 4, 2, 1234)
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("4", "1")
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  # The caller's XLA flags pass, with the process's own device count.
  assert local.process_env(0, 2, 2, 1234, xla_flags=(
      "--xla_dump_to=/d --xla_force_host_platform_device_count=8"
      " --xla_backend_optimization_level=0"))["XLA_FLAGS"] == (
          "--xla_dump_to=/d --xla_backend_optimization_level=0"
          " --xla_force_host_platform_device_count=2")
  # One process needs no coordinator (and would not start one).
  assert "JAX_COORDINATOR_ADDRESS" not in local.process_env(0, 1, 8, 1234)


@pytest.mark.slow
def test_readme_rehearsal_command(tmp_path):
  """README's "Before your first pod run" command passes its checks."""
  (argv,) = test_readme.commands("rehearse")
  argv = [sys.executable if a == "python" else a for a in argv]
  argv = [f"--out={tmp_path / 'out'}" if a.startswith("--out=") else a
          for a in argv]
  env = test_readme.user_env(os.environ)
  t0 = time.monotonic()
  p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=900)
  out = p.stdout + p.stderr
  assert p.returncode == 0, f"{shlex.join(argv)}:\n{out[-6000:]}"
  (result,) = (tmp_path / "out").glob("*/rehearsal.json")
  seen = json.loads(result.read_text())
  # Every process saved and exited 75 after SIGTERM reached one of them.
  assert seen["preempt_exit_codes"] == [75, 75]
  assert max(seen["bitwise_steps"]) > seen["resumed_from"]
  assert seen["steps"] in seen["other_shape_steps"]
  assert seen["eval_sigterm_exit_code"] == 75
  assert seen["steps"] in seen["evaluated_steps"]
  stacks = sorted(result.parent.glob("hangs/process-*.txt"))
  assert len(stacks) == 2
  print(f"rehearsal: {time.monotonic() - t0:.0f} s; {seen}")


def test_watchdog_gives_a_start_its_startup_timeout():
  """Before a start's first step (the parameter overview's step 0 and the
  trainer's `resumed ... at step N` line do not count) the limit is
  startup_timeout; after it, hang_timeout."""
  log = ("I1207 loop.py:272] resumed from gs://b/w/checkpoints/5 at step 5\n"
         "I1207 logging_writer.py:64] [0] Got texts: {...}\n")
  assert [m.group() for m in re.finditer(worker_commands.STEP_MARKS, log,
                                         flags=re.M)] == ["] [0]"]
  # Compiling (step 0) for 250 s, then steps 1..3, then stuck at 3.
  lines = (["job-state h running 0"] * 6 + ["job-state h running 1",
           "job-state h running 2"] + ["job-state h running 3"] * 4)
  states, clock = iter(lines), iter(range(0, 10_000, 50))
  hung = []

  class Sup(supervise.Supervision):
    name = "s"

    def launch(self):
      return 0

    def slice_state(self):
      return "ACTIVE"

    def job_state(self):
      return supervise.parse_job_state(next(states), 1)

    def collect_stacks(self, where):
      return 0

    def stop_job(self):
      return 0

    def start_job(self):
      hung.append(self.clock())
      return 1  # Ends the run.

  sup = Sup(hang_timeout=100, startup_timeout=400, sleep=lambda s: None,
            clock=lambda: next(clock), out=io.StringIO())
  assert sup.run() == 1
  text = sup.out.getvalue()
  assert "no step progress for 100 s (newest step per worker: h 3)" in text
  assert text.count("no step progress") == 1, text


def test_eval_records_absent_before_the_first_result(tmp_path):
  """The scenario polls for the eval job's first record: before its results
  folder exists that is "none yet", not an error (read_workdir raises)."""
  from optconsist_jax.evaluate import results  # pylint: disable=g-import-not-at-top
  from optconsist_jax.tools.rehearse import scenario  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError):
    results.read_workdir(str(tmp_path))
  assert scenario._has_eval_records(str(tmp_path)) is False
