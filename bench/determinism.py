"""Run-to-run determinism of training on CPU, and what changes the numbers.

Trains `configs/tiny_metamath.py:muon` (Muon on the hidden matrices, AdamW
elsewhere) for a few steps with the training command, several times under
different thread settings, and compares the final parameters bit for bit:

  repeat       the same command twice (same machine, same settings)
  one_core     `taskset -c 0`: XLA's CPU thread pool sized for one core
  no_eigen_mt  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (single-threaded
               Eigen matmuls/convolutions)

It also runs the one operation found to depend on the core count (a dot
contracting a long dimension, as weight gradients contract batch x time) in a
fresh process with two cores and with one, and records whether the bits differ.

Run: .venv/bin/python bench/determinism.py [--steps 30]
Writes bench/results/determinism.json (max |difference| and the max relative
difference of every variant against the first run, bitwise equality, the
final losses, the machine and its load) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


def train(workdir: str, steps: int, env: dict[str, str], prefix=()) -> None:
  cmd = [*prefix, sys.executable, "-m", "optconsist_jax.train",
         "--config", str(REPO / "configs" / "tiny_metamath.py") + ":muon",
         "--workdir", workdir, f"--config.train.num_steps={steps}",
         "--config.train.stats_every=0",
         "--config.checkpoint.async_save=False"]
  subprocess.run(cmd, check=True, env={**os.environ, **env},
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def final_params(workdir: str):
  """Flat {path: float64 array} of the last checkpoint's params."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from optconsist_jax import platforms  # pylint: disable=g-import-not-at-top
  platforms.select_default()
  from optconsist_jax.io import weights  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json")) as f:
    config = ExperimentConfig.from_dict(json.load(f))
  model = weights.restore_run_model(workdir, config.model)
  flat = nnx.state(model, nnx.Param).flat_state()
  return {"/".join(map(str, k)): np.asarray(v[...], np.float64)
          for k, v in flat}


_DOT_PROBE = """
import hashlib, jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
a = jnp.asarray(rng.standard_normal((3072, 64)), jnp.float32)
b = jnp.asarray(rng.standard_normal((3072, 160)), jnp.float32)
f = jax.jit(lambda a, b: jnp.einsum("kb,kn->bn", jnp.tanh(a), b))
print(hashlib.md5(np.asarray(f(a, b)).tobytes()).hexdigest())
"""


def dot_probe(env: dict[str, str]) -> dict[str, str]:
  """Hash of the long-contraction dot with all cores and with one."""
  out = {}
  cpus = sorted(os.sched_getaffinity(0))
  for name, use in (("all_cores", cpus), ("one_core", cpus[:1])):
    p = subprocess.run(["taskset", "-c", ",".join(map(str, use)),
                        sys.executable, "-c", _DOT_PROBE],
                       env={**os.environ, **env}, check=True,
                       capture_output=True, text=True)
    out[name] = p.stdout.strip().splitlines()[-1]
  return out


def compare(a, b) -> dict[str, float | bool]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  rel = max(float(np.max(np.abs(a[k] - b[k]))
                  / max(float(np.max(np.abs(a[k]))), 1e-30)) for k in a)
  equal = all(np.array_equal(a[k], b[k]) for k in a)
  return {"bitwise_equal": equal, "max_abs_diff": diff, "max_rel_diff": rel}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--out", default=str(REPO / "bench" / "results" /
                                      "determinism.json"))
  args = p.parse_args()
  base_env = {"JAX_PLATFORMS": "cpu",
              "PYTHONPATH": os.pathsep.join(
                  [str(REPO), os.environ.get("PYTHONPATH", "")])}
  variants = {
      "first": ({}, ()),
      "repeat": ({}, ()),
      "one_core": ({}, ("taskset", "-c", "0")),
      "no_eigen_mt": ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, ()),
  }
  if shutil.which("taskset") is None:
    del variants["one_core"]
  root = tempfile.mkdtemp(prefix="determinism_")
  params = {}
  for name, (env, prefix) in variants.items():
    w = os.path.join(root, name)
    train(w, args.steps, {**base_env, **env}, prefix)
    params[name] = final_params(w)
    print(f"{name}: trained", flush=True)
  shutil.rmtree(root, ignore_errors=True)
  probe = dot_probe(base_env) if "one_core" in variants else {}
  out = {
      "command": "bench/determinism.py --steps %d" % args.steps,
      "config": "configs/tiny_metamath.py:muon",
      "steps": args.steps,
      "vs_first": {n: compare(params["first"], params[n])
                   for n in variants if n != "first"},
      "dot_probe_md5": probe,
      "machine": {"platform": platform.platform(),
                  "cpu_count": os.cpu_count(),
                  "affinity": len(os.sched_getaffinity(0)),
                  "loadavg": os.getloadavg()},
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
