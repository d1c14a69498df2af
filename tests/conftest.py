"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import contextlib
import json
import os
import resource
import shutil
import tempfile
import time

# 8 fake CPU devices for the sharding tests. LLVM at -O0: the suite is
# dominated by compiling many small programs, which this halves (a tiny
# train step: 11 s -> 5.5 s), and XLA's CPU backend keeps IEEE semantics at
# every level (the losses of a tiny training run are bitwise equal).
_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# LAPACK (jnp.linalg.svd/eigh on CPU goes through scipy's OpenBLAS) on one
# thread: the probes' small SVDs took 2.4 s instead of 20 ms with OpenBLAS's
# spinning threads on a loaded 2-core machine (two xdist workers).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# One persistent XLA compilation cache for the whole test session: the suite
# compiles the same small programs many times (the tiny configs' train and
# eval steps, in process and in the commands the tests start). The process
# that loads this file first (pytest, or xdist's controller) makes it; the
# xdist workers and every subprocess inherit the environment. No size limit:
# a limit makes JAX lock the cache for every read and write and scan every
# entry on every write (jax/_src/lru_cache.py), quadratic in a suite that
# writes thousands (one DeepSeek-V3 finetuning test writes ~200): one write
# took 71 ms at 1,000 entries and 511 ms at 10,000 on a 2-core Zen 3
# (bench/jax_cache_write.py), and reads queued behind it. Unlocked, a read racing a write of the same entry
# fails zlib's checksum, which JAX reports as a warning and compiles instead.
# A user's own cache dir wins.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = (os.getpid(), tempfile.mkdtemp(prefix="optconsist_jax_xla_"))
  os.environ.update({
      "JAX_COMPILATION_CACHE_DIR": _OWN_CACHE[1],
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })

# The allocator every command uses when it computes on the CPU
# (platforms.select_default() calls the same), before jax allocates.
from optconsist_jax.platforms import allocator  # noqa: E402
from optconsist_jax.platforms import lapack_threads  # noqa: E402

allocator.tune()
lapack_threads.limit()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE and _OWN_CACHE[0] == os.getpid():
    shutil.rmtree(_OWN_CACHE[1], ignore_errors=True)


def pytest_collection_finish(session):
  """Fails when `--dist loadgroup` is asked for but its groups are ignored.

  Tests that share an expensive session fixture carry an xdist_group mark;
  pytest-xdist tags their node ids with "@group". If a pytest/xdist pair
  stops doing that (pytest 9.2 with xdist 3.8.0 did, silently), every
  shared fixture is built once per worker: CI time, not correctness.
  """
  if not getattr(session.config.option, "loadgroup", False):
    return
  lost = [item.nodeid for item in session.items
          if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if lost:
    raise RuntimeError(
        f"--dist loadgroup ignored the xdist_group of {len(lost)} tests (e.g."
        f" {lost[0]}): this pytest/pytest-xdist pair does not tag node ids;"
        " pin pytest as pyproject.toml's test extra says")



@pytest.fixture(scope="session")
def mini_demo(tmp_path_factory):
  """README's `make demo MODE=mini` run once in a fresh clone: (workdir,
  output). Its tests carry xdist_group("mini_run") (one worker, one run)."""
  import test_readme  # pylint: disable=g-import-not-at-top
  return test_readme.run_mini_demo(tmp_path_factory.mktemp("mini_demo"))

# OPTCONSIST_TEST_USAGE=FILE appends one JSON line per test phase (setup,
# call, teardown): wall seconds, start time, the CPU seconds of this process
# (user, system) and of the subprocesses it waited for, and context switches,
# so a slow suite can be cut by the CPU a test costs, not by its wall time
# beside another worker (bench/test_usage.py summarizes such a file).
_USAGE = os.environ.get("OPTCONSIST_TEST_USAGE")


def _usage():
  s = resource.getrusage(resource.RUSAGE_SELF)
  c = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (time.time(), s.ru_utime + s.ru_stime, s.ru_stime,
          c.ru_utime + c.ru_stime, s.ru_nvcsw, s.ru_nivcsw)


@contextlib.contextmanager
def _recorded(item, phase):
  """Appends the phase's usage line (when OPTCONSIST_TEST_USAGE is set)."""
  if not _USAGE:
    yield
    return
  before = _usage()
  try:
    yield
  finally:
    d = [a - b for a, b in zip(_usage(), before)]
    line = json.dumps({
        "test": item.nodeid, "phase": phase,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "start": round(before[0], 3), "wall": round(d[0], 3),
        "cpu": round(d[1], 3), "sys": round(d[2], 3),
        "children_cpu": round(d[3], 3), "voluntary_switches": int(d[4]),
        "involuntary_switches": int(d[5]), "load1": os.getloadavg()[0]})
    with open(_USAGE, "a") as f:  # One short append per line: atomic.
      f.write(line + "\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
  with _recorded(item, "setup"):
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  with _recorded(item, "call"):
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
  del nextitem
  with _recorded(item, "teardown"):
    return (yield)
