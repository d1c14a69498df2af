"""tcmalloc detection (optconsist_jax.platforms): optional, never required."""

import os

from optconsist_jax import platforms


def test_tcmalloc_path_is_an_existing_library_or_none():
  path = platforms.tcmalloc_path()
  assert path is None or (os.path.isfile(path)
                          and "libtcmalloc_minimal" in path)


def test_preload_env_prepends_once_and_keeps_others():
  env = {"LD_PRELOAD": "/lib/other.so", "X": "1"}
  out = platforms.preload_env(env, "/lib/tc.so")
  assert out["LD_PRELOAD"] == "/lib/tc.so:/lib/other.so" and out["X"] == "1"
  assert platforms.preload_env(out, "/lib/tc.so") == out
  assert env["LD_PRELOAD"] == "/lib/other.so"  # input untouched
  assert platforms.preload_env({}, "/lib/tc.so") == {"LD_PRELOAD": "/lib/tc.so"}
  assert platforms.preload_env(env, None) == env
