"""platforms/lapack_threads.py: XLA's CPU SVD runs on a one-thread OpenBLAS."""

import json
import os
import subprocess
import sys

import pytest

from optconsist_jax.platforms import lapack_threads

# A fresh process: which BLAS libraries are loaded, and their thread counts,
# depend on what ran before in the process.
_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from optconsist_jax.platforms import lapack_threads
if sys.argv[1] == "limit":
  lapack_threads.limit()
jax.block_until_ready(jnp.linalg.svd(jnp.ones((8, 6)) + jnp.eye(8, 6)))
import threadpoolctl
print(json.dumps([(os.path.basename(i["filepath"]), i["num_threads"])
                  for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"]))
"""


def _blas_after_svd(arm: str) -> list[tuple[str, int]]:
  env = {k: v for k, v in os.environ.items()
         if k not in ("OPENBLAS_NUM_THREADS", lapack_threads.ENV)}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", "import os\n" + _CHILD, arm],
                       env=env, check=True, capture_output=True,
                       text=True).stdout
  return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


def test_the_lapack_jax_calls_is_limited_to_one_thread():
  limited = _blas_after_svd("limit")
  # SciPy's OpenBLAS (jaxlib's CPU LAPACK kernels) is among the libraries
  # loaded once an SVD has run, and every BLAS library has one thread.
  assert any("scipy_openblas" in name and "64" not in name
             for name, _ in limited), limited
  assert all(n == 1 for _, n in limited), limited
  if (os.cpu_count() or 1) > 1:
    # Without it the same library starts one thread per core: the test
    # above would fail if limit() did nothing.
    default = dict(_blas_after_svd("none"))
    assert max(default.values()) == os.cpu_count(), default


def test_env_choice():
  assert lapack_threads.limit({lapack_threads.ENV: "0"}) is None
  with pytest.raises(ValueError, match=lapack_threads.ENV):
    lapack_threads.limit({lapack_threads.ENV: "many"})
  with pytest.raises(ValueError, match=">= 0"):
    lapack_threads.limit({lapack_threads.ENV: "-1"})
