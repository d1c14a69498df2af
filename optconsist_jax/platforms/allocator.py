"""The CPU allocator of this process: glibc kept from unmapping, or tcmalloc.

XLA's CPU runtime frees and re-allocates its large temporaries every step
(~1.3 GiB for llama_100m fwd+bwd at 4x256), from its worker threads. Under
glibc malloc's defaults a block above the mmap threshold (128 KiB, raised
dynamically up to 32 MiB) is a fresh mmap/munmap each time, and heap top
beyond M_TRIM_THRESHOLD goes back to the kernel: every step pays page faults
and system time to map and zero the same memory again
(bench/model_throughput.py records faults and system seconds per step).

`tune()` fixes that in-process, on any glibc machine, with nothing installed:
mallopt(3) (man7.org/linux/man-pages/man3/mallopt.3.html) through ctypes,
before the first large allocation:

* M_ARENA_MAX = 1: every thread allocates from the main (sbrk) heap. A
  thread arena's heaps are at most 64 MiB, and glibc serves a larger block
  there with mmap whatever M_MMAP_MAX says (sysmalloc's fallback), so the
  other settings alone leave XLA's threads re-mapping (measured: 359k faults
  and 0.7 s system CPU per llama_100m step with them, ~0 with this one too);
* M_MMAP_MAX = 0: no block is served by mmap; large ones come from the heap;
* M_TRIM_THRESHOLD = -1: "disables trimming completely" (mallopt(3)): freed
  heap top is kept (this also turns off the dynamic mmap threshold);
* M_TOP_PAD = 1 GiB: each heap extension asks for 1 GiB more than needed
  (virtual until touched), so growth is a few sbrk calls, not one per step.

The costs: the process keeps its peak heap resident (RSS does not shrink
after a large temporary is freed), and one arena serializes malloc across
threads (XLA's CPU work is in large blocks; applied only when the compute
runs on CPU). When tcmalloc, jemalloc or mimalloc is
already loaded (LD_PRELOAD: it keeps freed pages for reuse itself),
or the user set glibc's own MALLOC_*_ variables or GLIBC_TUNABLES, nothing
is changed. OPTCONSIST_CPU_ALLOCATOR=glibc-default turns tuning off (the
benchmark's baseline row). tcmalloc is optional: `make demo` and the
benchmarks preload it when the shared library is present (Debian/Ubuntu:
`apt-get install libtcmalloc-minimal4`; the Makefile's `TCMALLOC` variable
globs the same paths as `TCMALLOC_PATTERNS`).
"""

from __future__ import annotations

from collections.abc import Mapping
import ctypes
import dataclasses
import glob
import os

ENV = "OPTCONSIST_CPU_ALLOCATOR"
CHOICES = ("auto", "glibc-default")

# glibc <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
GLIBC_SETTINGS = {"M_ARENA_MAX": (_M_ARENA_MAX, 1),
                  "M_MMAP_MAX": (_M_MMAP_MAX, 0),
                  "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, -1),
                  "M_TOP_PAD": (_M_TOP_PAD, 1 << 30)}
# glibc reads these at start-up (mallopt(3), "Environment variables").
_GLIBC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_PRELOADED = ("libtcmalloc", "libjemalloc", "libmimalloc")

TCMALLOC_PATTERNS = ("/usr/lib/*/libtcmalloc_minimal.so.4",
                     "/usr/lib64/libtcmalloc_minimal.so.4",
                     "/usr/lib/libtcmalloc_minimal.so.4")


@dataclasses.dataclass(frozen=True)
class Allocator:
  """Which allocator serves this process, and what was set.

  Attributes:
    name: "tcmalloc" / "jemalloc" / "mimalloc" (preloaded), "glibc-tuned",
      "glibc-default", or "unknown" (not glibc, nothing preloaded).
    reason: why (e.g. "OPTCONSIST_CPU_ALLOCATOR=glibc-default").
    settings: the mallopt parameters set (glibc-tuned only).
  """
  name: str
  reason: str
  settings: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return {"name": self.name, "reason": self.reason,
            "settings": dict(self.settings)}


_chosen: Allocator | None = None  # what tune() did in this process


def preloaded_allocator() -> str | None:
  """"tcmalloc"/"jemalloc"/"mimalloc" when mapped into this process."""
  try:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
      maps = f.read()
  except OSError:
    return None
  for lib in _PRELOADED:
    if lib in maps:
      return lib.removeprefix("lib")
  return None


def _libc() -> ctypes.CDLL | None:
  """This process's C library when it is glibc, else None."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None
  return libc


def _decide(env: Mapping[str, str]) -> Allocator | None:
  """The allocator to report without tuning; None = tune glibc."""
  choice = env.get(ENV, "auto").strip() or "auto"
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r}: expected one of {CHOICES}")
  other = preloaded_allocator()
  if other:
    return Allocator(other, "preloaded (LD_PRELOAD)")
  if _libc() is None:
    return Allocator("unknown", "not glibc; left as it is")
  if choice == "glibc-default":
    return Allocator("glibc-default", f"{ENV}=glibc-default")
  given = [k for k in _GLIBC_ENV if k in env]
  if given:
    return Allocator("glibc-default", "user's " + ", ".join(given) + " kept")
  return None


def tune(env: Mapping[str, str] | None = None) -> Allocator:
  """Keeps glibc from unmapping freed memory (module docstring), once.

  Call at start-up of a process whose compute runs on the CPU, before the
  first large allocation (platforms.select_default does, for CPU).

  Returns:
    What serves this process (also `current()` from now on).

  Raises:
    ValueError: OPTCONSIST_CPU_ALLOCATOR holds an unknown value.
  """
  global _chosen
  if _chosen is not None:
    return _chosen
  env = os.environ if env is None else env
  chosen = _decide(env)
  if chosen is None:
    libc = _libc()
    for name, (param, value) in GLIBC_SETTINGS.items():
      if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
        raise OSError(f"mallopt({name}, {value}) failed")
    chosen = Allocator("glibc-tuned", "mallopt at start-up",
                       {k: v for k, (_, v) in GLIBC_SETTINGS.items()})
  _chosen = chosen
  return chosen


def current() -> Allocator:
  """What serves this process: tune()'s choice, else what is loaded."""
  if _chosen is not None:
    return _chosen
  return _decide({**os.environ, ENV: "glibc-default"}) or Allocator(
      "glibc-default", "not tuned in this process")


def tcmalloc_path() -> str | None:
  """The first installed libtcmalloc_minimal.so.4, or None."""
  for pattern in TCMALLOC_PATTERNS:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def preload_env(env: Mapping[str, str], library: str | None) -> dict[str, str]:
  """`env` with `library` prepended to LD_PRELOAD (unchanged when None)."""
  out = dict(env)
  if library:
    rest = out.get("LD_PRELOAD", "")
    if library not in rest.split(":"):
      out["LD_PRELOAD"] = f"{library}:{rest}" if rest else library
  return out
