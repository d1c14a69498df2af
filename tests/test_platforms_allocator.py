"""The CPU allocator (optconsist_jax.platforms.allocator): optional, measured.

The behaviour that matters is page faults: a process that allocates, touches
and frees a large block every "step" (as XLA's CPU runtime does with its
temporaries) faults every page in again each time under glibc's defaults
(the block is a fresh mmap), and almost never once tuned (the block stays in
the heap; aligned allocations walk the heap top for a few steps first).
Measured in fresh subprocesses with getrusage.
"""

import json
import os
import subprocess
import sys

import pytest

from optconsist_jax.platforms import allocator

# posix_memalign + touch + free from a worker thread: how XLA's CPU runtime
# gets its temporaries (tsl::port::AlignedMalloc, on its thread pool). A
# thread's arena cannot hold a 64 MiB block, which is what M_ARENA_MAX=1 is
# for.
_PROBE = r"""
import ctypes, json, resource, threading
from optconsist_jax.platforms import allocator
chosen = allocator.tune()
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
def step():
  p = ctypes.c_void_p()
  assert libc.posix_memalign(ctypes.byref(p), 64, ctypes.c_size_t(n)) == 0
  ctypes.memset(p, 1, n)
  libc.free(p)
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
measured = []
def worker():
  for _ in range(12):  # warm-up: the heap grows to its steady state
    step()
  f0 = faults()
  for _ in range(10):
    step()
  measured.append(faults() - f0)
t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps({"allocator": chosen.to_json(),
                  "faults_per_step": measured[0] / 10,
                  "pages_per_step": n / resource.getpagesize()}))
"""


def _probe(**env_overrides) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k != "LD_PRELOAD" and not k.startswith("MALLOC_")
         and k != allocator.ENV}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(
    allocator._libc() is None, reason="glibc's mallopt is what is tested")


@glibc_only
def test_tuned_glibc_stops_refaulting_a_freed_block():
  default = _probe(**{allocator.ENV: "glibc-default"})
  tuned = _probe()
  assert default["allocator"]["name"] == "glibc-default"
  assert tuned["allocator"]["name"] == "glibc-tuned"
  assert tuned["allocator"]["settings"]["M_MMAP_MAX"] == 0
  assert tuned["allocator"]["settings"]["M_ARENA_MAX"] == 1
  pages = default["pages_per_step"]
  # Default: every page of the block faults in again each step.
  assert default["faults_per_step"] > 0.5 * pages
  # Tuned: the block is reused from the heap.
  assert tuned["faults_per_step"] < 0.05 * pages
  # Without one arena, a thread's large block is mmap'd whatever
  # M_MMAP_MAX says (glibc's sysmalloc fallback): why M_ARENA_MAX=1.
  no_arena = _probe(MALLOC_MMAP_MAX_="0", MALLOC_TOP_PAD_=str(1 << 30),
                    MALLOC_TRIM_THRESHOLD_=str(10**11))
  assert no_arena["faults_per_step"] > 0.5 * pages


@glibc_only
def test_user_malloc_settings_and_preloads_are_left_alone():
  kept = _probe(MALLOC_TOP_PAD_="0")
  assert kept["allocator"]["name"] == "glibc-default"
  assert "MALLOC_TOP_PAD_" in kept["allocator"]["reason"]
  lib = allocator.tcmalloc_path()
  if lib:
    pre = _probe(LD_PRELOAD=lib)
    assert pre["allocator"]["name"] == "tcmalloc"


def test_unknown_choice_is_a_clear_error():
  with pytest.raises(ValueError, match=allocator.ENV):
    allocator._decide({allocator.ENV: "jemalloc"})


def test_tcmalloc_path_is_an_existing_library_or_none():
  path = allocator.tcmalloc_path()
  assert path is None or (os.path.isfile(path)
                          and "libtcmalloc_minimal" in path)


def test_preload_env_prepends_once_and_keeps_others():
  env = {"LD_PRELOAD": "/lib/other.so", "X": "1"}
  out = allocator.preload_env(env, "/lib/tc.so")
  assert out["LD_PRELOAD"] == "/lib/tc.so:/lib/other.so" and out["X"] == "1"
  assert allocator.preload_env(out, "/lib/tc.so") == out
  assert env["LD_PRELOAD"] == "/lib/other.so"  # input untouched
  assert allocator.preload_env({}, "/lib/tc.so") == {"LD_PRELOAD": "/lib/tc.so"}
  assert allocator.preload_env(env, None) == env
