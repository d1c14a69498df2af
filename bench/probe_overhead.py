r"""What the default update probes add to the quick study: probes off vs on.

  .venv/bin/python bench/probe_overhead.py --workdir workdirs/small_consistency \
      --rounds 2 --out bench/results/probe_overhead.json

Needs a finished quick workdir (`make demo`). Copies it twice, and per
sample clears the copy's eval results, fingerprints and report and reruns
`reproduce --config configs/small_consistency.py:quick` on it with
`--config.eval.probes=False` (A) or True (B), alternating A B A B: training
and memorization are done, so a sample is the eval stage (every checkpoint
and base), the fingerprints and the report. Each sample records wall and
CPU seconds of the process (getrusage of the child) and the load average;
the study's whole CPU time comes from the workdir's run_info.json
(stage_cpu_seconds), so the growth is stated against what the whole quick
study costs, not only its eval stage.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time


def _clear(wd: pathlib.Path) -> None:
  for pattern in ("runs/*/eval", "bases/*/eval", "report", "fingerprints"):
    for p in wd.glob(pattern):
      shutil.rmtree(p)


def sample(wd: pathlib.Path, probes: bool) -> dict:
  _clear(wd)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load, t0 = os.getloadavg()[0], time.time()
  subprocess.run([sys.executable, "-m", "optconsist_jax.experiments.reproduce",
                  "--config", "configs/small_consistency.py:quick",
                  "--workdir", str(wd), f"--config.eval.probes={probes}"],
                 check=True, stdout=subprocess.DEVNULL)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"probes": probes, "wall_s": time.time() - t0,
          "cpu_s": (after.ru_utime + after.ru_stime
                    - before.ru_utime - before.ru_stime),
          "load_start": load, "load_end": os.getloadavg()[0]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="workdirs/small_consistency",
                 help="a finished quick workdir (not modified)")
  p.add_argument("--copies", default="/tmp/probe_overhead",
                 help="where the two copies go")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--out", default="bench/results/probe_overhead.json")
  args = p.parse_args()
  src = pathlib.Path(args.workdir).resolve()
  info = json.loads((src / "run_info.json").read_text())
  copies = {}
  for arm in ("off", "on"):
    copies[arm] = pathlib.Path(args.copies) / arm
    if not copies[arm].exists():
      shutil.copytree(src, copies[arm], symlinks=True)
  rows = []
  for r in range(args.rounds):
    for arm in ("off", "on"):
      row = {"round": r, **sample(copies[arm], arm == "on")}
      rows.append(row)
      print(json.dumps(row), flush=True)
  cpu = {arm: [x["cpu_s"] for x in rows if x["probes"] == (arm == "on")]
         for arm in ("off", "on")}
  added = [b - a for a, b in zip(cpu["off"], cpu["on"])]
  study_cpu = sum(info["stage_cpu_seconds"].values())
  out = {"command": " ".join(["bench/probe_overhead.py"] + sys.argv[1:]),
         "cores": os.cpu_count(), "samples": rows,
         "probe_cpu_s_added": added, "quick_study_cpu_s": study_cpu,
         "growth_of_the_study": [a / (study_cpu - a) for a in added]}
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(f"probes add {min(added):.0f}-{max(added):.0f} CPU s to a"
        f" {study_cpu:.0f} CPU s study: +{min(out['growth_of_the_study']):.1%}"
        f" to +{max(out['growth_of_the_study']):.1%}; wrote {args.out}")


if __name__ == "__main__":
  main()
