"""The study's evaluate stage with 1 and 2 processes, side by side.

Builds standard mode's model (a base pretrained `--steps` steps and one
AdamW finetuning run of it, a checkpoint at its end), copies the run
`--jobs` times, then evaluates the copies through the study's own
`experiments.eval_pool.evaluate_runs` with 1 and with 2 worker processes,
alternating (A B A B, `--repeats` each), with the update probes off (the
matrix mode's eval: greedy decoding and LM loss) and on (standard's). Each
pass starts from no records and counts everything the stage pays: the
workers' start-up and compiles included. The JSON records the load average
around each pass and how busy all cores were during it (/proc/stat, the
workers included), so a pass on a loaded machine shows as one.

Run: .venv/bin/python bench/eval_workers.py
Writes bench/results/eval_workers.json (`--out`) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time

import machine_load
import study_setup

REPO = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", default="standard")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--jobs", type=int, default=12)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=str(REPO / "bench" / "results" /
                                      "eval_workers.json"))
  args = p.parse_args()
  # deferred: jax and the package load after argument parsing (--help).
  from optconsist_jax import platforms  # pylint: disable=g-import-not-at-top
  platforms.select_default()
  from optconsist_jax.experiments import eval_pool  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import reproduce  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import study  # pylint: disable=g-import-not-at-top

  res = {"command": f"python bench/eval_workers.py --mode {args.mode}"
                    f" --steps {args.steps} --jobs {args.jobs}"
                    f" --repeats {args.repeats}",
         "cpu_count": os.cpu_count(), "cpu": machine_load.cpu_model(),
         "passes": []}
  with tempfile.TemporaryDirectory() as w:
    d = study_setup.mode_config(args.mode)
    rc = study.ReproConfig.from_dict(d)
    small = study_setup.base_and_finetune(rc, w, args.steps, args.steps, 3e-4)
    base, ft, files, ft_dir = (small.base, small.run.config, small.files,
                               small.run.workdir)
    retention = reproduce.write_retention_data(rc, w)
    copies = []
    for j in range(args.jobs):
      copies.append(os.path.join(w, f"copy{j}"))
      shutil.copytree(ft_dir, copies[-1])

    for probes in (False, True):
      rc_p = study.ReproConfig.from_dict({**d, "eval": {**d["eval"],
                                                        "probes": probes}})
      for rep in range(args.repeats):
        for workers in (1, 2):
          jobs = []
          for j, c in enumerate(copies):
            shutil.rmtree(os.path.join(c, "eval"), ignore_errors=True)
            run = study.Run(f"copy{j}", c, dict(base="adamw", method="adamw",
                                               lr=3e-4, seed=0), ft, base)
            jobs.append(eval_pool.Job(run.name, c, reproduce.eval_config(
                rc_p, run, files["test"], False, retention)))
          load0, busy0 = os.getloadavg()[0], machine_load.cpu_busy_seconds()
          t = time.perf_counter()
          done = list(eval_pool.evaluate_runs(jobs, workers))
          wall = time.perf_counter() - t
          busy = (machine_load.cpu_busy_seconds() - busy0) / (
              wall * os.cpu_count())
          row = {"probes": probes, "workers": workers, "repeat": rep,
                 "wall_s": wall, "s_per_checkpoint": wall / len(done),
                 "cores_busy": busy, "loadavg_before": load0,
                 "loadavg_after": os.getloadavg()[0]}
          res["passes"].append(row)
          print(json.dumps(row), flush=True)
  summary = {}
  for probes in (False, True):
    walls = {k: [r["wall_s"] for r in res["passes"]
                 if r["probes"] == probes and r["workers"] == k]
             for k in (1, 2)}
    summary[f"probes={probes}"] = {
        "median_wall_s_1": statistics.median(walls[1]),
        "median_wall_s_2": statistics.median(walls[2]),
        "speedup_2_over_1": (statistics.median(walls[1]) /
                             statistics.median(walls[2]))}
  res["summary"] = summary
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(res, fh, indent=1)
  print(json.dumps(summary, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
