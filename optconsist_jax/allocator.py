"""Finding tcmalloc, the allocator the CPU runs preload when it is installed.

XLA's CPU runtime frees and re-allocates its large temporaries every step;
with glibc malloc each one is a fresh mmap, so every step pays page faults and
system time to map and zero it again (bench/model_throughput.py records
faults and system seconds per step). tcmalloc keeps freed pages for reuse.
It is optional: `make demo` and the benchmarks preload it only when the
shared library is present (Debian/Ubuntu: `apt-get install
libtcmalloc-minimal4`); nothing requires it.

The Makefile's `TCMALLOC` variable globs the same paths as `PATTERNS`.
"""

from __future__ import annotations

from collections.abc import Mapping
import glob

PATTERNS = ("/usr/lib/*/libtcmalloc_minimal.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4",
            "/usr/lib/libtcmalloc_minimal.so.4")


def tcmalloc_path() -> str | None:
  """The first installed libtcmalloc_minimal.so.4, or None."""
  for pattern in PATTERNS:
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
