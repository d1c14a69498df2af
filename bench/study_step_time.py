"""Step times of the small reproduction's modes, side by side (one machine).

For each mode of configs/small_consistency.py: a pretraining run of each
base optimizer and one AdamW finetuning run (the mode's model, tokenizer,
sequence lengths and batch), `--steps` steps each through the trainer
(`train.loop.train`; the figure is `TrainResult.perf["step_time_s"]`, the
steady-state mean after the first step), then the eval job on the
finetuned checkpoint and its base with the mode's eval sizes (update probes
off). The machine may be shared: compare modes within one run (the JSON
records the load average around it).

Run: .venv/bin/python bench/study_step_time.py [--modes quick,standard]
Writes bench/results/study_step_time.json (`--out`) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import study_setup

REPO = pathlib.Path(__file__).resolve().parent.parent


def measure(mode: str, steps: int) -> dict:
  # deferred: jax and the package load after argument parsing (--help).
  from optconsist_jax.evaluate import watch  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import reproduce  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import study  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import config as config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import loop  # pylint: disable=g-import-not-at-top
  d = study_setup.mode_config(mode)
  d["eval"]["probes"] = False
  rc = study.ReproConfig.from_dict(d)
  out = {}
  for opt in rc.pretrain.optimizers:
    c = study.pretrain_run_config(rc, opt, 0)
    c["train"].update(num_steps=steps + 1)
    with tempfile.TemporaryDirectory() as w:
      r = loop.train(config_types.ExperimentConfig.from_dict(c), w)
    out[f"pretrain_{opt}_step_s"] = r.perf["step_time_s"]
  with tempfile.TemporaryDirectory() as w:
    small = study_setup.base_and_finetune(rc, w, 2, steps + 1, 1e-4)
    run, files = small.run, small.files
    out["finetune_step_s"] = small.finetune.perf["step_time_s"]
    retention = reproduce.write_retention_data(rc, w)
    t = time.perf_counter()
    watch.evaluate_workdir(run.workdir, reproduce.eval_config(
        rc, run, files["test"], True, retention))
    out["eval_base_and_final_s (incl. compile)"] = time.perf_counter() - t
  out["sizes"] = {"model": dict(rc.model), "tokenizer": rc.tokenizer_path
                  or "shipped (2048)", "finetune_seq_len": rc.finetune.seq_len,
                  "math_examples": rc.eval.math_examples,
                  "retention_docs": rc.eval.retention_docs,
                  "retention_unit": rc.eval.retention_unit}
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--modes", default="quick,standard")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--out", default=str(REPO / "bench" / "results" /
                                      "study_step_time.json"))
  args = p.parse_args()
  res = {"command": "python bench/study_step_time.py --modes " + args.modes
                    + f" --steps {args.steps}",
         "loadavg_start": os.getloadavg(), "cpu_count": os.cpu_count()}
  for mode in args.modes.split(","):
    res[mode] = measure(mode, args.steps)
    print(mode, json.dumps(res[mode]), flush=True)
  res["loadavg_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(res, fh, indent=1)
  print(json.dumps(res, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
