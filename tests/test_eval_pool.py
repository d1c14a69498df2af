"""Worker processes of the evaluate stage die with the command."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# A command whose pool worker (initialized like eval_pool's) sleeps; it
# prints the worker's pid and waits.
_COMMAND = """
import concurrent.futures, multiprocessing, os, sys, time
from optconsist_jax.experiments import eval_pool
with concurrent.futures.ProcessPoolExecutor(
    1, mp_context=multiprocessing.get_context("spawn"),
    initializer=eval_pool.die_with_parent, initargs=(os.getpid(),)) as pool:
  print(pool.submit(os.getpid).result(), flush=True)
  pool.submit(time.sleep, 600)
  time.sleep(600)
"""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie is dead too (it waits for its reaper).
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_killed_command_takes_its_workers_with_it():
  cmd = subprocess.Popen([sys.executable, "-c", _COMMAND], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
  try:
    worker = int(cmd.stdout.readline())
    assert _alive(worker)
    cmd.send_signal(signal.SIGKILL)
    cmd.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not _alive(worker), f"worker {worker} outlived its command"
  finally:
    cmd.kill()
