"""The machine a command runs on: backends, hosts, compilation cache.

* Backends: `select_default()`, called first thing by each command's main,
  leaves an explicit choice (`JAX_PLATFORMS`, `--jax_platforms`) alone and
  otherwise names only the platforms this machine has: TPU when TPU chips are
  attached (found the way JAX's Cloud TPU setup finds them, on the PCI bus),
  else CUDA when an NVIDIA GPU and JAX's CUDA plugin are present, else CPU.
  With libtpu installed (the planner needs it) JAX would otherwise try the
  TPU backend on a machine without TPU chips and print `Failed to find host
  bounds` on every CPU/GPU command. Only the planner (tools/plan) loads
  libtpu on a CPU machine, on purpose.
* Hosts: `maybe_initialize_distributed()` starts `jax.distributed` when this
  process is one of several.
* Compilation cache: `enable_compilation_cache()` points JAX's persistent
  cache (jax.readthedocs.io, "Persistent compilation cache") at a directory,
  so a restarted job loads its compiled programs instead of compiling again.
* The CPU allocator (platforms/allocator.py): `select_default()` keeps glibc
  from unmapping XLA's per-step temporaries when the compute runs on CPU,
  and LAPACK on one OpenBLAS thread (platforms/lapack_threads.py).
* Cloud TPU hardware facts: platforms/tpu.py.

jax is imported inside the functions that need it: the Cloud TPU launcher
reads the TPU facts on machines without jax.
"""

from __future__ import annotations

import atexit
from collections.abc import Mapping
import glob
import importlib.util
import os

from optconsist_jax import paths
from optconsist_jax.platforms import allocator
from optconsist_jax.platforms import lapack_threads

# ---------------------------------------------------------------------------
# Backends.

_GOOGLE_PCI_VENDOR = "0x1ae0"


def _tpu_chips() -> int:
  """Google accelerators on the PCI bus (what JAX's cloud_tpu_init checks)."""
  n = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        n += f.read().strip() == _GOOGLE_PCI_VENDOR
    except OSError:
      continue
  return n


def _cuda_usable() -> bool:
  has_gpu = any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl"))
  has_plugin = any(importlib.util.find_spec(m) is not None for m in (
      "jax_cuda13_plugin", "jax_cuda12_plugin"))
  return has_gpu and has_plugin


def default_platforms() -> str | None:
  """The platforms to initialize here; None = leave it to JAX (TPU VMs)."""
  if _tpu_chips():
    return None
  return "cuda,cpu" if _cuda_usable() else "cpu"


def select_default() -> str | None:
  """Sets jax_platforms (and JAX_PLATFORMS for subprocesses) unless given.

  Call before anything touches a device. When the platforms in use are CPU
  only, also tunes the CPU allocator (`allocator.tune()`: the step's
  temporaries stay mapped between steps) and runs LAPACK on one OpenBLAS
  thread (`lapack_threads.limit()`: no spinning threads inside XLA's pool).

  Returns:
    What was chosen (None: the user's choice or JAX's own).
  """
  # deferred: platforms imports without jax (the launcher reads its TPU facts).
  import jax  # pylint: disable=g-import-not-at-top
  given = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
  platforms = None if given else default_platforms()
  if platforms is not None:
    os.environ["JAX_PLATFORMS"] = platforms
    jax.config.update("jax_platforms", platforms)
  if (given or platforms) == "cpu":
    allocator.tune()
    lapack_threads.limit()
  return platforms


# ---------------------------------------------------------------------------
# Hosts.

# Env vars that mean "this process is one of several".
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when running as one of many hosts.

  OPTCONSIST_DISTRIBUTED=1 forces it, =0 disables it. Otherwise it runs when a
  coordinator address is set, or on a multi-host Cloud TPU slice
  (TPU_WORKER_HOSTNAMES lists more than one host; on TPU VMs
  jax.distributed.initialize() finds the coordinator itself), or under SLURM /
  Open MPI with more than one task. Call it before anything touches devices.
  Processes started by hand (tools/launch/local.py: N processes on one
  machine) name the coordinator in JAX_COORDINATOR_ADDRESS and themselves in
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, which jax.distributed does not read
  itself.

  Returns:
    Whether it initialized the distributed runtime.
  """
  env = os.environ if env is None else env
  flag = env.get("OPTCONSIST_DISTRIBUTED")
  if flag is not None:
    wanted = flag.strip() not in ("", "0", "false", "False")
  else:
    wanted = (any(env.get(k) for k in _MULTI_PROCESS_ENV)
              or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
              or int(env.get("SLURM_NTASKS", "1") or 1) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
  # deferred: platforms imports without jax (the launcher reads its TPU facts).
  import jax  # pylint: disable=g-import-not-at-top
  if not wanted or jax.distributed.is_initialized():
    return False
  given = {k: int(env[e]) for k, e in (("num_processes", "JAX_NUM_PROCESSES"),
                                       ("process_id", "JAX_PROCESS_ID"))
           if env.get(e)}
  jax.distributed.initialize(**given)
  # Leave the coordination service (and stop the preemption sync manager)
  # before the interpreter tears its objects down; jax registers no such
  # hook itself.
  atexit.register(jax.distributed.shutdown)
  return True


# ---------------------------------------------------------------------------
# The persistent compilation cache.

CACHE_SUBDIR = "compilation_cache"


def compilation_cache_dir(setting: str, workdir: str | os.PathLike,
                          backend: str) -> str | None:
  """Where a job's compilation cache lives, or None (off).

  Args:
    setting: `config.train.compilation_cache_dir`: "auto" =
      W/compilation_cache on TPU, off elsewhere; "" = off; else a directory
      (local paths made absolute, gs:// and other URLs as they are).
    workdir: W (local or gs://).
    backend: `jax.default_backend()` ("tpu", "gpu", "cpu").

  On TPU "auto" puts the cache in W, not on the VM's disk: JAX writes cache
  entries from process 0 only (jax/_src/compiler.py `_cache_write`), so on a
  multi-host slice only a directory every host reads (a gs:// workdir)
  spares every host the compile; and a preempted VM that is recreated has a
  fresh disk but the same W.
  """
  setting = os.fspath(setting).strip()
  if setting == "auto":
    if backend != "tpu":
      return None
    w = os.fspath(workdir).rstrip("/")
    return f"{w}/{CACHE_SUBDIR}"
  return paths.resolve(setting) or None


def enable_compilation_cache(setting: str,
                             workdir: str | os.PathLike) -> str | None:
  """Turns on JAX's persistent compilation cache per `setting`.

  Call after `maybe_initialize_distributed` and before the first compile
  (JAX opens its cache once, at the first compile). A directory set with
  JAX's own `--jax_compilation_cache_dir` (or JAX_COMPILATION_CACHE_DIR) is
  kept under "auto". JAX's thresholds stay as JAX sets them (programs that
  compile in under `jax_persistent_cache_min_compile_time_secs`, 1 s, are
  not written); its flags change them.

  Returns:
    The cache directory in use, or None when the cache is off.
  """
  # deferred: platforms imports without jax (the launcher reads its TPU facts).
  import jax  # pylint: disable=g-import-not-at-top
  given = jax.config.jax_compilation_cache_dir
  if os.fspath(setting).strip() == "auto" and given:
    return given
  path = compilation_cache_dir(setting, workdir, jax.default_backend())
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
  return path


