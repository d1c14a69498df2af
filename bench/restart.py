"""Restart cost with and without JAX's persistent compilation cache (CPU).

Starts `python -m optconsist_jax.train` on configs/tiny_metamath.py:adamw for
a few steps into a fresh workdir, as a restarted job starts, in three arms:

  off   `--config.train.compilation_cache_dir=` (no cache: every start
        compiles),
  cold  the cache on, in an empty directory (the first start: compiles and
        writes the entries),
  warm  the cache on, in a directory an earlier start filled (a restart).

and times each from process start to the log line of its first step's
metrics (`[1] ... loss=...`, written once step 1 has run) and to exit. The
arms run in rounds, alternating their order (off cold warm, warm cold off,
...), so every arm sees the same machine load; the 1-minute load average is
recorded before and after each sample. JAX writes only programs that compile
in at least `--min_compile_secs` (JAX's default threshold, 1 s, unless
given). The summary holds each arm's median and the median over rounds of
off/warm (time to the first step and to exit).

Run: .venv/bin/python bench/restart.py [--rounds 4 --steps 3]
Writes bench/results/restart.json and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FIRST_STEP = re.compile(r"\] \[1\] .*loss=")
ARMS = ("off", "cold", "warm")


def machine() -> dict:
  """CPU model, cores, vector extensions, memory, load."""
  out = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
         "python": sys.version.split()[0]}
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    out["cpu_model"] = re.search(r"model name\s*:\s*(.*)", info)[1]
    flags = set(re.search(r"flags\s*:\s*(.*)", info)[1].split())
    out["avx2"] = "avx2" in flags
    out["avx512"] = sorted(f for f in flags if f.startswith("avx512"))
  except (OSError, TypeError):
    pass
  out["loadavg"] = _loadavg()
  return out


def _loadavg() -> str:
  with open("/proc/loadavg") as f:
    return f.read().strip()


def _command(workdir: pathlib.Path, cache: str, steps: int,
             min_compile_secs: float | None) -> list[str]:
  cmd = [sys.executable, "-m", "optconsist_jax.train", "--config",
         "configs/tiny_metamath.py:adamw", "--workdir", str(workdir),
         f"--config.train.num_steps={steps}", "--config.train.log_every=1",
         "--config.train.stats_every=0", "--config.checkpoint.every_steps=0",
         f"--config.train.compilation_cache_dir={cache}"]
  if min_compile_secs is not None:
    cmd.append(f"--jax_persistent_cache_min_compile_time_secs="
               f"{min_compile_secs}")
  return cmd


def _env() -> dict[str, str]:
  """A user's shell on a CPU machine: no test or cache settings inherited."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
         and k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO)
  return env


def sample(cmd: list[str]) -> dict:
  """Seconds from start to the first step's metrics line and to exit."""
  before = _loadavg()
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  first, tail = None, []
  for line in p.stdout:
    if first is None and FIRST_STEP.search(line):
      first = time.perf_counter() - t0
    tail = (tail + [line])[-30:]
  rc = p.wait()
  total = time.perf_counter() - t0
  if rc != 0 or first is None:
    raise RuntimeError(f"{shlex.join(cmd)} exited {rc} (first step line:"
                       f" {first}):\n{''.join(tail)}")
  return {"first_step_s": round(first, 3), "exit_s": round(total, 3),
          "loadavg_before": before, "loadavg_after": _loadavg()}


def _entries(cache: pathlib.Path) -> int:
  return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=4,
                 help="rounds of the three arms (>= 3)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--min_compile_secs", type=float, default=None,
                 help="jax_persistent_cache_min_compile_time_secs (default:"
                 " JAX's, 1 s)")
  p.add_argument("--out", default=str(REPO / "bench/results/restart.json"))
  args = p.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="restart_bench_"))
  warm = root / "warm_cache"
  prime = sample(_command(root / "prime", str(warm), args.steps,
                          args.min_compile_secs))
  print(f"primed {warm}: {_entries(warm)} entries ({prime})", flush=True)
  samples = []
  for r in range(args.rounds):
    for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
      cache = {"off": "", "cold": str(root / f"cold_{r}"),
               "warm": str(warm)}[arm]
      s = sample(_command(root / f"w_{r}_{arm}", cache, args.steps,
                          args.min_compile_secs))
      s.update(round=r, arm=arm,
               cache_entries=_entries(pathlib.Path(cache)) if cache else 0)
      samples.append(s)
      print(json.dumps(s), flush=True)

  def med(arm, key):
    return statistics.median(s[key] for s in samples if s["arm"] == arm)

  def paired(key):
    by = {(s["round"], s["arm"]): s[key] for s in samples}
    return statistics.median(by[(r, "off")] / by[(r, "warm")]
                             for r in range(args.rounds))

  summary = {f"median_{key}_{arm}": med(arm, key) for arm in ARMS
             for key in ("first_step_s", "exit_s")}
  summary.update(
      off_over_warm_first_step_median=round(paired("first_step_s"), 3),
      off_over_warm_exit_median=round(paired("exit_s"), 3),
      cold_over_off_first_step_median=round(
          med("cold", "first_step_s") / med("off", "first_step_s"), 3))
  result = {
      "command": "bench/restart.py " + shlex.join(sys.argv[1:]),
      "train_command": shlex.join(_command(
          pathlib.Path("W"), "CACHE", args.steps, args.min_compile_secs)),
      "min_compile_secs": args.min_compile_secs,
      "machine": machine(), "prime": prime,
      "warm_cache_entries": _entries(warm), "samples": samples,
      "summary": summary,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(summary, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
