r"""OpenBLAS threads for XLA's CPU SVDs: the library default vs one thread.

  .venv/bin/python bench/lapack_threads.py --rounds 2 \
      --out bench/results/lapack_threads.json

Each sample is a fresh process (the thread count is fixed when SciPy's
OpenBLAS loads) that jit-compiles a batched `jnp.linalg.svd` of the update
probes' largest shapes in the small study (8 matrices of 256 x 688, fp32),
then times `--reps` calls: `default` leaves OpenBLAS's own thread count
(OPTCONSIST_LAPACK_THREADS=0), `one` is what platforms.select_default()
sets on CPU (`platforms/lapack_threads.py`). Samples alternate A B A B; each
records wall and CPU seconds and the other load on the machine
(machine_load.Meter). The point of the change shows only when other work
shares the cores: OpenBLAS's waiting threads spin, so the ratio grows with
the load the samples record.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine_load  # pylint: disable=g-import-not-at-top,wrong-import-position

SHAPE = (8, 256, 688)

_CHILD = """
import json, os, sys
sys.path.insert(0, {bench!r})
import machine_load
import jax, jax.numpy as jnp, numpy as np
from optconsist_jax.platforms import lapack_threads
lapack_threads.limit()
x = jnp.asarray(np.random.default_rng(0).normal(size={shape}).astype(np.float32))
svd = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False))
jax.block_until_ready(svd(x))
import threadpoolctl
threads = sorted({{i["num_threads"] for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"}})
with machine_load.Meter() as m:
  for _ in range({reps}):
    jax.block_until_ready(svd(x))
print(json.dumps({{**m.result, "blas_threads": threads}}))
"""


def _cpu_model() -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return None
  name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
               if line.startswith("model name")), None)
  return f"{name} ({'AVX-512' if 'avx512f' in text else 'AVX2'})"


def sample(arm: str, reps: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "OPTCONSIST_LAPACK_THREADS": "0" if arm == "default" else "1"}
  code = _CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)),
                       shape=SHAPE, reps=reps)
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  return {"arm": arm, **json.loads(out.strip().splitlines()[-1])}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=2, help="A B rounds")
  p.add_argument("--reps", type=int, default=5, help="SVD calls per sample")
  p.add_argument("--out", default="bench/results/lapack_threads.json")
  args = p.parse_args()
  rows = []
  for r in range(args.rounds):
    for arm in ("default", "one"):
      row = {"round": r, **sample(arm, args.reps)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  med = {}
  for arm in ("default", "one"):
    w = sorted(x["seconds"] for x in rows if x["arm"] == arm)
    med[arm] = w[len(w) // 2]
  out = {"command": " ".join(["bench/lapack_threads.py"] + sys.argv[1:]),
         "cpu": _cpu_model(), "cores": os.cpu_count(), "shape": SHAPE,
         "reps": args.reps, "samples": rows,
         "median_wall_s": med, "ratio_default_over_one": med["default"] / med["one"]}
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(f"default / one thread: {out['ratio_default_over_one']:.1f}x"
        f" (median wall {med['default']:.2f} s vs {med['one']:.2f} s);"
        f" wrote {args.out}")


if __name__ == "__main__":
  main()
