r"""The 7B fit table: AOT plans (optconsist_jax.tools.plan) + expected time per epoch.

  .venv/bin/python bench/tpu_fit.py --out bench/results/tpu_fit.md \
      --optimizers adamw,muon,lora --topologies v4-32,v5p-16,v5e-32,v6e-16

Each (topology, optimizer) is compiled ahead of time for the TPU topology on
this CPU (libtpu), with the settings of configs/llama2_7b_metamath.py: fsdp
mesh, seq 1024, global batch 768 in 24 micro-batches, fp32 params, bf16
compute, scan + full remat. Results are appended to a JSON-lines file as they
come, so an interrupted run keeps what it compiled; the markdown is rewritten
from all of them.

Expected time per epoch = tokens per epoch x training flops per token /
(chips x peak bf16 flop/s per chip x MFU). Flops per token are
`LlamaConfig.flops_per_token(1024)` (6 x matmul params + causal attention, as
the trainer's MFU counts them); LoRA does no weight gradients for the frozen
base, so 2/3 of that (+ the adapters, negligible); Muon adds its Newton-Schulz
iterations per step (5 x (4 m^2 n + 2 m^3) per matrix: X X^T, the quintic
polynomial and its product with X; Jordan et al. 2024, "Muon"), spread
over the chips. MFU is an assumption (--mfu), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from optconsist_jax.platforms import tpu
from optconsist_jax.model import preset

TOKENS_PER_EPOCH = 103e6  # MetaMathQA, 395K examples (Biderman et al. 2024)
SEQ_LEN = 1024
GLOBAL_BATCH = 768
GRAD_ACCUM = 24  # configs/llama2_7b_metamath.py default


def muon_ns_flops_per_step(cfg) -> float:
  """Newton-Schulz flops of one Muon step over every hidden matrix."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  shapes = [(d, cfg.num_heads * h), (d, cfg.num_kv_heads * h),
            (d, cfg.num_kv_heads * h), (cfg.num_heads * h, d),
            (d, f), (d, f), (f, d)]
  total = 0.0
  for a, b in shapes:
    m, n = min(a, b), max(a, b)
    total += 5 * (4 * m * m * n + 2 * m * m * m)
  return cfg.num_layers * total


def flops_per_token(optimizer: str) -> float:
  cfg = preset("llama2_7b")
  full = cfg.flops_per_token(SEQ_LEN)
  if optimizer == "lora":
    return full * 2 / 3
  if optimizer == "muon":
    return full + muon_ns_flops_per_step(cfg) / (GLOBAL_BATCH * SEQ_LEN)
  return full


def epoch_hours(topology: str, optimizer: str, mfu: float) -> float:
  acc = tpu.accelerator(topology)
  flops = TOKENS_PER_EPOCH * flops_per_token(optimizer)
  return flops / (acc.chips * acc.generation.chip.peak_bf16_flops * mfu) / 3600


def run_plans(topologies, optimizers, jsonl: str, lora_rank: int):
  from optconsist_jax.tools.plan import aot as planner  # pylint: disable=g-import-not-at-top
  done = set()
  if os.path.exists(jsonl):
    with open(jsonl) as f:
      for line in f:
        r = json.loads(line)
        if r.get("peak_gib") is not None:
          done.add((r["topology"], r["optimizer"]))
  for t in topologies:
    for o in optimizers:
      if (t, o) in done:
        continue
      spec = planner.PlanSpec(model="llama2_7b", mesh="fsdp", topology=t,
                           seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH,
                           grad_accum_steps=GRAD_ACCUM, optimizer=o,
                           lora_rank=lora_rank)
      start = time.perf_counter()
      try:
        r = planner.plan(spec)
        row = {**r.row(), "trainable_params": r.trainable_params}
      except Exception as e:  # pylint: disable=broad-except
        row = {"topology": t, "optimizer": o, "peak_gib": None,
               "error": f"{type(e).__name__}: {str(e)[:300]}"}
      row["wall_s"] = time.perf_counter() - start
      print(json.dumps(row), flush=True)
      with open(jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")


def markdown(topologies, optimizers, jsonl: str, mfu: float,
             lora_rank: int) -> str:
  rows = {}
  if os.path.exists(jsonl):
    with open(jsonl) as f:
      for line in f:
        r = json.loads(line)
        rows[(r["topology"], r["optimizer"])] = r
  head = ("| slice | chips x HBM/chip | optimizer | mesh (data x fsdp x tensor)"
          " | per-chip peak HBM (AOT) | fits | collectives GiB/step |"
          f" h/epoch @ {mfu:.0%} MFU | h for 11 epochs |")
  lines = [head, "|" + "---|" * 9]
  for t in topologies:
    acc = tpu.accelerator(t)
    for o in optimizers:
      r = rows.get((t, o), {})
      name = f"lora r{lora_rank}" if o == "lora" else o
      if r.get("peak_gib") is not None:
        peak = f"{r['peak_gib']:.1f} GiB"
        fits = "yes" if r["fits"] else "**no**"
        mesh = r["mesh"]
        coll = f"{r['collective_gib']:.0f}"
      else:
        peak = ("not compiled" if not r else
                f"compile failed: {r.get('error', '')[:80]}")
        fits, mesh, coll = "?", f"fsdp 1x{acc.num_devices}x1", "?"
      h = epoch_hours(t, o, mfu)
      lines.append(
          f"| {t} | {acc.chips} x {acc.generation.chip.hbm_gib:g} GiB |"
          f" {name} | {mesh} | {peak} | {fits} | {coll} | {h:.2f} |"
          f" {11 * h:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topologies", default="v4-32,v5p-16,v5e-32,v6e-16")
  p.add_argument("--optimizers", default="adamw,muon,lora")
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--jsonl", default="bench/results/tpu_fit.jsonl")
  p.add_argument("--out", default=None, help="write the markdown table here")
  p.add_argument("--no_compile", action="store_true",
                 help="only rebuild the table from --jsonl")
  args = p.parse_args(argv)
  topologies = [t for t in args.topologies.split(",") if t]
  optimizers = [o for o in args.optimizers.split(",") if o]
  if not args.no_compile:
    run_plans(topologies, optimizers, args.jsonl, args.lora_rank)
  table = markdown(topologies, optimizers, args.jsonl, args.mfu,
                   args.lora_rank)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
