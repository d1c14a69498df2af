"""Seeds as one vmapped population vs one run after another: wall time.

P members (different `train.seed`, `data.seed` and peak learning rate) of the
small reproduction's first quick model (configs/small_consistency.py's
causal mode: hidden 96, 3 layers, the 2,048-piece tokenizer, seq 96, batch
16; mesh preset `dp`, epoch-end checkpoints written
synchronously, as optconsist_jax.experiments.reproduce trains them) are
trained on generated MetaMathQA-format problems, either sequentially
(`train.train` per member) or as one population
(`optconsist_jax.train.population.train_population`, one compiled
program). Both are timed end to end (setup, compilation, data, steps,
checkpoints), in a fresh temporary directory each time, interleaved A B A B
so that a change in the machine's load hits both; each timed region records
the load (bench/machine_load.py: the share of all cores busy outside this
process, and the 1-minute load average).

Run: python bench/population.py [--members 3,12 --reps 2 --method adamw]
Writes bench/results/population.json and prints it. The machine may be
shared: compare figures within one run, and look at `other_load`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile

from absl import flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import machine_load  # pylint: disable=g-import-not-at-top,wrong-import-position

# Peak learning rates of the members, cycled (from the first quick mode's
# finetuning grid for AdamW and Muon; LoRA's for lora).
LRS = {"adamw": (3e-4, 1e-3), "muon": (3e-4, 1e-3), "lora": (1e-3, 3e-3)}


def _module(path: pathlib.Path, name: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def member_configs(p: int, method: str, examples: int, epochs: int):
  """P finetuning-like run configs of that model, differing in seeds/LR."""
  from optconsist_jax.train.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  from optconsist_jax.optim import presets  # pylint: disable=g-import-not-at-top
  quick = _module(REPO / "configs" / "small_consistency.py",
                  "small_consistency").get_config("causal")
  f = quick.finetune
  out = []
  for k in range(p):
    d = dict(
        model=dict(quick.model), mesh=dict(preset="dp"),
        optim=presets.preset(method,
                             peak_lr=LRS[method][k % len(LRS[method])]
                             ).to_dict(),
        data=dict(format="synthetic", synthetic_examples=examples,
                  seq_len=f.seq_len, global_batch_size=f.global_batch_size,
                  seed=k),
        train=dict(num_epochs=epochs, num_steps=0, seed=k, log_every=10,
                   stats_every=50, progress_every_secs=1000.0,
                   parameter_overview=False),
        checkpoint=dict(every_steps=1_000_000, keep=1, keep_epochs=True,
                        async_save=False))
    if method == "lora":
      d["lora"] = dict(rank=f.lora_rank, alpha=f.lora_alpha, dropout=0.0)
    out.append(ExperimentConfig.from_dict(d))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--members", default="3,12",
                 help="population sizes, comma-separated")
  p.add_argument("--reps", type=int, default=2,
                 help="A B pairs per population size")
  p.add_argument("--method", choices=sorted(LRS), default="adamw")
  p.add_argument("--examples", type=int, default=400,
                 help="generated problems per member (sets steps/epoch)")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--out", default=str(REPO / "bench" / "results" /
                                      "population.json"))
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()
  import jax  # pylint: disable=g-import-not-at-top
  from optconsist_jax import train  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import population  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  rows = []
  for size in [int(x) for x in args.members.split(",")]:
    configs = member_configs(size, args.method, args.examples, args.epochs)
    for rep in range(args.reps):
      for mode in ("sequential", "population"):
        with tempfile.TemporaryDirectory() as tmp:
          dirs = [os.path.join(tmp, f"m{k}") for k in range(size)]
          with machine_load.Meter() as meter:
            if mode == "sequential":
              results = [train.train(c, w) for c, w in zip(configs, dirs)]
            else:
              results = population.train_population(configs, dirs)
        steps = sum(r.step for r in results)
        row = {"members": size, "rep": rep, "mode": mode,
               "member_steps": steps,
               "final_losses": [round(r.losses[r.step], 4) for r in results],
               **{k: round(v, 4) if isinstance(v, float) else v
                  for k, v in meter.result.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)

  summary = []
  for size in sorted({r["members"] for r in rows}):
    secs = {m: [r["seconds"] for r in rows
                if r["members"] == size and r["mode"] == m]
            for m in ("sequential", "population")}
    seq, pop = (statistics.median(secs["sequential"]),
                statistics.median(secs["population"]))
    summary.append({"members": size, "sequential_s": seq, "population_s": pop,
                    "speedup": seq / pop, "samples": secs})
  out = {"device": jax.devices()[0].device_kind,
         "num_devices": jax.device_count(),
         "machine": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(),
         "nice": os.nice(0),
         "load_average_before": load_before,
         "load_average_at_end": os.getloadavg(),
         "method": args.method,
         "note": ("seconds: wall time of all P members end to end (setup,"
                  " compile, steps, epoch checkpoints); speedup = median"
                  " sequential / median population; other_load: share of all"
                  " cores busy outside this process during the region"
                  " (> 0.1 means a noisy sample)"),
         "command": ("python bench/population.py"
                     f" --members {args.members} --reps {args.reps}"
                     f" --method {args.method} --examples {args.examples}"
                     f" --epochs {args.epochs}"),
         "summary": summary, "runs": rows}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
