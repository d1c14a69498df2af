"""Training-loop throughput: step time, tokens/s and MFU of the whole loop.

Runs `optconsist_jax.train.train` (data pipeline, jitted step, deferred metric
fetch, clu writers; no periodic checkpoints) for the tiny config and for the
~100M `llama_100m` model on the generated MetaMathQA data, and records the
steady-state figures the loop itself measures (`TrainResult.perf`: steps after
the first, which includes compilation). MFU is reported where the device's
peak is known (metrics.PEAK_BF16_FLOPS; not for CPUs). On any device the run
also measures XLA's fp32 2048^3 matmul peak and reports each model's step time
against its matmul floor (step flops / that peak), the machine's load around
each run (os.getloadavg, and the share of all cores busy outside this process
from /proc/stat), and page faults and system seconds per step (getrusage).
The allocator is the one every command uses on CPU (--allocator tuned;
tcmalloc or glibc's default: bench/machine_load.py use_allocator).

Run: .venv/bin/python bench/train_loop.py [--steps-tiny 40 --steps-100m 4]
Writes bench/results/train_loop.json and prints it. The machine may be shared:
compare figures only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile

from absl import flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import machine_load  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(preset_overrides: dict, steps: int, batch: int, seq_len: int,
            device_dtype: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "tiny_metamath", REPO / "configs" / "tiny_metamath.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("adamw").to_dict()
  c["model"].update(preset_overrides, dtype=device_dtype)
  c["data"].update(global_batch_size=batch, seq_len=seq_len)
  c["train"].update(num_steps=steps, log_every=max(steps // 4, 1),
                    stats_every=0, parameter_overview=False)
  c["checkpoint"].update(every_steps=0, save_epoch_ends=False)
  return ExperimentConfig.from_dict(c)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps-tiny", type=int, default=40)
  p.add_argument("--steps-100m", type=int, default=4)
  p.add_argument("--dtype", default="float32",
                 help="compute dtype (bfloat16 on accelerators)")
  p.add_argument("--allocator", choices=machine_load.ALLOCATORS,
                 default="tuned",
                 help="tuned: glibc kept from unmapping, as every command"
                 " runs on CPU (default); tcmalloc: preloaded (installed);"
                 " default: glibc's defaults")
  p.add_argument("--out", default=str(REPO / "bench" / "results" /
                                      "train_loop.json"))
  args = p.parse_args()
  allocator_used = machine_load.use_allocator(args.allocator)
  flags.FLAGS.mark_as_parsed()
  import jax  # pylint: disable=g-import-not-at-top
  from optconsist_jax import train  # pylint: disable=g-import-not-at-top

  runs = [
      ("tiny_gqa", {"preset": "tiny_gqa", "vocab_size": 2048}, args.steps_tiny,
       16, 192),
      ("llama_100m", {"preset": "llama_100m", "vocab_size": 32000,
                      "max_position_embeddings": 1024},
       args.steps_100m, 4, 256),
  ]
  load_before = os.getloadavg()
  peak = machine_load.jax_matmul_peak()
  results = []
  for name, model, steps, batch, seq in runs:
    if steps < 1:
      continue
    cfg = _config(model, steps, batch, seq, args.dtype)
    with tempfile.TemporaryDirectory() as w, machine_load.Meter() as meter:
      r = train.train(cfg, w)
    m = meter.result
    flops = cfg.model.flops_per_token(seq) * batch * seq
    floor_s = flops / (peak["gflops"] * 1e9)
    row = {"model": name, "params": cfg.model.num_params(),
           "batch": batch, "seq_len": seq, "steps": steps,
           "compute_dtype": args.dtype, **r.perf,
           "flops_per_step": flops, "jax_matmul_floor_s": floor_s,
           "fraction_of_matmul_floor": (floor_s / r.perf["step_time_s"]
                                        if r.perf else None),
           "run_wall_s": m["seconds"],
           "minor_faults_per_step": m["minor_faults"] / steps,
           "system_s_per_step": m["system_s"] / steps,
           "other_load": m["other_load"],
           "first_loss": r.losses[min(r.losses)],
           "last_loss": r.losses[max(r.losses)]}
    print(json.dumps(row), flush=True)
    results.append(row)
  out = {"device": jax.devices()[0].device_kind,
         "num_devices": jax.device_count(),
         "machine": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(),
         "load_average_before": load_before,
         "load_average_at_end": os.getloadavg(),
         "ld_preload": os.environ.get("LD_PRELOAD", ""),
         "allocator": allocator_used,
         "jax_matmul_peak_gflops": peak["gflops"], "matmul_samples": peak,
         "note": ("other_load: share of all cores busy outside this process"
                  " during the run (shared machine: > 0.1 means noisy);"
                  " faults and system seconds per step include the first"
                  " (compiling) step"),
         "command": "python bench/train_loop.py "
                    f"--steps-tiny {args.steps_tiny} --steps-100m"
                    f" {args.steps_100m} --dtype {args.dtype}"
                    f" --allocator {args.allocator}",
         "runs": results}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
