"""What the benchmarks record about the machine: load, faults, matmul peak.

Shared by the bench/ scripts (imported from the script's own directory):
`Meter` measures one timed region (wall seconds, this process's CPU, system
time and page faults from getrusage, and `other_load`: the fraction of all
cores busy outside this process, from /proc/stat), and `jax_matmul_peak`
times an fp32 2048^3 matmul under XLA, the yardstick for "fraction of the
matmul floor".
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

MATMUL_N = 2048


def usage() -> dict:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return {"utime": r.ru_utime, "stime": r.ru_stime, "minflt": r.ru_minflt,
          "majflt": r.ru_majflt}


def cpu_busy_seconds() -> float:
  """Busy CPU seconds of all cores since boot (/proc/stat; 0 if absent)."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return 0.0
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Meter:
  """with Meter() as m: ...; then m.result (dict) describes the region."""

  def __enter__(self) -> Meter:
    self._u0, self._busy0 = usage(), cpu_busy_seconds()
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    wall = time.perf_counter() - self._t0
    u1, busy1 = usage(), cpu_busy_seconds()
    own = (u1["utime"] + u1["stime"] - self._u0["utime"]
           - self._u0["stime"])
    other = max(busy1 - self._busy0 - own, 0.0)
    self.result = {
        "seconds": wall, "cpu_s": own,
        "system_s": u1["stime"] - self._u0["stime"],
        "minor_faults": u1["minflt"] - self._u0["minflt"],
        "major_faults": u1["majflt"] - self._u0["majflt"],
        "other_load": other / (max(wall, 1e-9) * os.cpu_count()),
        "loadavg_1m": os.getloadavg()[0],
    }


def jax_matmul_peak(reps: int = 5) -> dict:
  """fp32 2048^3 matmul GFLOP/s under XLA: best of `reps` (and all samples)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  samples = []
  for _ in range(reps):
    with Meter() as m:
      jax.block_until_ready(f(a, b))
    samples.append(m.result)
  best = min(s["seconds"] for s in samples)
  return {"gflops": 2 * MATMUL_N**3 / best / 1e9,
          "seconds": [round(s["seconds"], 4) for s in samples],
          "other_load": [round(s["other_load"], 3) for s in samples]}


ALLOCATORS = ("tuned", "tcmalloc", "default")


def use_allocator(choice: str) -> dict:
  """Puts this benchmark process on the allocator `choice`; what serves it.

  "tuned": glibc kept from unmapping (optconsist_jax.platforms.allocator.tune,
  what every command does on CPU); "tcmalloc": re-executes the script with
  libtcmalloc_minimal preloaded (SystemExit when it is not installed);
  "default": glibc's defaults.
  """
  from optconsist_jax.platforms import allocator  # pylint: disable=g-import-not-at-top
  if choice == "tcmalloc":
    lib = allocator.tcmalloc_path()
    if not lib:
      raise SystemExit("--allocator tcmalloc: libtcmalloc_minimal.so.4 is not"
                       " installed (apt-get install libtcmalloc-minimal4)")
    if lib not in os.environ.get("LD_PRELOAD", "").split(":"):
      env = allocator.preload_env(os.environ, lib)
      os.execve(sys.executable, [sys.executable, *sys.argv], env)
  env = dict(os.environ)
  if choice == "default":
    env[allocator.ENV] = "glibc-default"
  return allocator.tune(env).to_json()


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
