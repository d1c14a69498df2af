"""Runs N worker processes of a test on localhost, like the hosts of a pod.

Not a test module: the two-process tests (test_multihost.py,
test_harness.py) start their workers through `run_workers`.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import subprocess
import sys


def run_workers(script: str, extra_args: Sequence[str], *,
                num_processes: int = 2, local_devices: int = 4,
                timeout: float = 300) -> list[str]:
  """Runs `python script PORT N I *extra_args` for I < N; returns outputs.

  Each worker is a CPU-only JAX process with `local_devices` devices; PORT
  is a free port for `jax.distributed.initialize`'s coordinator. Waits for
  all of them (killing any still running after `timeout` seconds or on an
  error) and asserts that each exited 0, showing the failing one's output.
  """
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={local_devices}"
                 " --xla_backend_optimization_level=0"),  # as conftest.py
      JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  procs = [
      subprocess.Popen(
          [sys.executable, script, str(port), str(num_processes), str(i),
           *map(str, extra_args)],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for i in range(num_processes)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs
