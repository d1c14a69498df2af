"""One OpenBLAS thread for the LAPACK calls XLA's CPU linear algebra makes.

On CPU, `jnp.linalg.svd`/`eigh`/`qr` run as LAPACK calls that jaxlib takes
from SciPy (`scipy.linalg.cython_lapack`, jaxlib's CPU lapack kernels), i.e.
SciPy's bundled OpenBLAS, which SciPy loads on the first such call. OpenBLAS
starts one thread per core and its idle threads spin while they wait: inside
XLA's own thread pool, on a machine shared with other work, a batch of small
SVDs then runs tens of times slower than on one thread (the update probes'
SVDs, evaluate/probes_geometry.py; bench/lapack_threads.py measures it).

`limit()` loads SciPy's LAPACK now and caps every BLAS library loaded in the
process at one thread, through threadpoolctl (which knows the prefixed
symbols of the SciPy/NumPy OpenBLAS builds). `platforms.select_default()`
calls it whenever the compute runs on CPU. OPTCONSIST_LAPACK_THREADS=N keeps
N threads instead (`0`: leave the libraries' own defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
import os

ENV = "OPTCONSIST_LAPACK_THREADS"


def _wanted(env: Mapping[str, str]) -> int:
  raw = env.get(ENV, "1").strip()
  try:
    n = int(raw)
  except ValueError:
    raise ValueError(f"{ENV}={raw!r}: expected a thread count (0 = leave the"
                     " BLAS libraries' defaults)") from None
  if n < 0:
    raise ValueError(f"{ENV}={raw!r}: expected a count >= 0")
  return n


def limit(env: Mapping[str, str] | None = None) -> int | None:
  """Caps the process's BLAS libraries (SciPy's loaded first) at N threads.

  Args:
    env: the environment to read OPTCONSIST_LAPACK_THREADS from (os.environ).

  Returns:
    The thread count set, or None when left alone (N = 0).
  """
  n = _wanted(os.environ if env is None else env)
  if n == 0:
    return None
  # deferred: both load shared libraries; platforms imports without them.
  import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  threadpoolctl.threadpool_limits(n, user_api="blas")
  return n
