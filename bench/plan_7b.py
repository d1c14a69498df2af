r"""Planner table for Llama-2-7B finetuning on small Cloud TPU slices.

Compiles the real train step ahead of time (optconsist_jax.tools.plan) for every
topology x layout x optimizer below and writes one markdown table:

  .venv/bin/python bench/plan_7b.py [--optimizer adamw,lora] \
      [--topology v4-8,v5p-8,v5e-16,v6e-8] [--mesh fsdp,fsdp_tp]

Settings: sequence 1024, global batch 768 (Biderman et al. 2024, arXiv
2405.09673), split into
micro-batches of `--per_chip_batch` rows per chip with gradient accumulation,
params and AdamW moments in fp32, bf16 compute, scan over layers with full
remat. Results are appended to bench/results/plan_7b.jsonl as each compile
finishes (a compile takes minutes on two CPU cores), then the table is
rewritten from all rows in that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import __main__ as plan_lib
from optconsist_jax.tools.plan import aot as planner
from optconsist_jax.platforms import tpu as tpu_facts

RESULTS = os.path.join(os.path.dirname(__file__), "results")
JSONL = os.path.join(RESULTS, "plan_7b.jsonl")
MARKDOWN = os.path.join(RESULTS, "plan_7b.md")


def _num(x) -> str:
  return "-" if x is None else f"{x:.1f}"


def _table(rows: list[dict]) -> str:
  head = ("| topology | chips | mesh (data x fsdp x tensor) | optimizer |"
          " micro-batch/chip x accum | args GiB | temp GiB | peak GiB/chip |"
          " HBM GiB | fits | all-gather GiB | reduce-scatter GiB |"
          " all-reduce GiB | all-to-all GiB | coll.-permute GiB |"
          " collectives GiB/step | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  order = {t: i for i, t in enumerate(tpu_facts.SLICES)}
  rows = sorted(rows, key=lambda r: (order.get(r["topology"], 99), r["mesh"],
                                     r["optimizer"]))
  for r in rows:
    fits = {True: "yes", False: "**no**", None: "n/a"}[r["fits"]]
    lines.append(
        f"| {r['topology']} | {r['chips']} | {r['mesh']} | {r['optimizer']} |"
        f" {r['per_chip_batch']} x {r['accum']} | {r['args_gib']:.2f} |"
        f" {r['temp_gib']:.2f} | {r['peak_gib']:.2f} | {r['hbm_gib']:.0f} |"
        f" {fits} | "
        + " | ".join(_num(r[k + "_gib"]) for k in hlo_stats.COLLECTIVE_KINDS)
        + f" | {_num(r['collective_gib'])} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


NOTES = """\
Llama-2-7B (6.74B params), sequence 1024, global batch 768 sequences per
optimizer step as in "LoRA Learns Less and Forgets Less" (Biderman et al.,
TMLR 2024). That
batch does not fit in one pass on these slices, so each step runs
`grad accum` micro-batches of `micro-batch/chip` x chips rows (lax.scan inside
the jitted step). Params and optimizer state fp32, compute bf16, scan over the
32 layers with full remat. LoRA: rank 16 on q,k,v,o,gate,up,down, AdamW on the
adapters only, base weights frozen (fp32).

Columns: per-chip HBM from `compiled.memory_analysis()` (args = params + opt
state + batch shard; temp = XLA temporaries: grad accumulator, gathered
weights, activations; peak = args + outputs - donated aliases + temp),
against the chip's HBM; collectives per optimizer step from the compiled HLO,
as the size of the full tensor each op moves (all-gather output,
reduce-scatter input, all-reduce operand), ops in the layer scan and the
accumulation loop multiplied by their trip counts. A ring collective moves
about (n-1)/n of that per chip over ICI. On v5e and v6e the compiler turns
many weight all-gathers into windowed-einsum loops of collective-permutes
(each counted at its shard's size), so compare the total column across chip
generations rather than the per-kind columns. Where the TPU compiler itself
refuses the program (RESOURCE_EXHAUSTED), temp is the figure from its error
message, args are computed from the shardings, and collectives are "-".
"""


def _versions() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return ", ".join(f"{name} {metadata.version(name)}"
                   for name in ("jax", "jaxlib", "libtpu"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v4-8,v5p-8,v5e-16,v6e-8")
  p.add_argument("--mesh", default="fsdp,fsdp_tp")
  p.add_argument("--optimizer", default="adamw,lora")
  p.add_argument("--per_chip_batch", type=int, default=2)
  p.add_argument("--model", default="llama2_7b")
  p.add_argument("--fresh", action="store_true",
                 help="discard earlier rows in plan_7b.jsonl")
  p.add_argument("--hlo_dir", default=None,
                 help="also save each compiled HLO (gzip) here")
  p.add_argument("--table_only", action="store_true",
                 help="only rewrite plan_7b.md from plan_7b.jsonl")
  args = p.parse_args(argv)
  os.makedirs(RESULTS, exist_ok=True)
  if args.fresh and os.path.exists(JSONL):
    os.remove(JSONL)
  for topology in ([] if args.table_only else args.topology.split(",")):
    for mesh in args.mesh.split(","):
      for optimizer in args.optimizer.split(","):
        spec = planner.PlanSpec(
            model=args.model, mesh=mesh, topology=topology, seq_len=1024,
            global_batch=768, per_chip_batch=args.per_chip_batch,
            optimizer=optimizer, lora_rank=16, param_dtype="float32",
            dtype="bfloat16", remat_policy="full", scan_layers=True)
        start = time.time()
        try:
          hlo = (None if args.hlo_dir is None else os.path.join(
              args.hlo_dir, f"{topology}_{mesh}_{optimizer}.hlo.gz"))
          if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
          r = planner.plan(spec, hlo_path=hlo)
        except Exception as e:  # pylint: disable=broad-except
          print(f"{topology} {mesh} {optimizer}: FAILED {type(e).__name__}:"
                f" {str(e)[:500]}", flush=True)
          continue
        print(plan_lib.report(r), f"\n(wall {time.time() - start:.0f} s)\n",
              flush=True)
        row = {**r.row(), "chips": math.prod(r.mesh_shape.values()),
               "per_chip_batch": args.per_chip_batch,
               "collective_counts": (r.collectives and r.collectives.count),
               "loops_without_trip_count": (
                   r.collectives and r.collectives.loops_without_trip_count),
               "error": r.error,
               "spec": dataclasses.asdict(spec)}
        with open(JSONL, "a") as f:
          f.write(json.dumps(row) + "\n")
  rows = [json.loads(line) for line in open(JSONL)] if os.path.exists(
      JSONL) else []
  with open(MARKDOWN, "w") as f:
    f.write("# Planner: Llama-2-7B finetuning on Cloud TPU slices\n\n")
    f.write("Produced on a CPU-only machine (libtpu AOT compile;"
            f" {_versions()}) by\n\n")
    f.write("```\n.venv/bin/python bench/plan_7b.py --fresh --topology "
            "v4-8,v5p-8,v5e-16,v6e-8 --mesh fsdp,fsdp_tp --optimizer "
            "adamw,lora\n```\n\n")
    f.write(NOTES + "\n")
    f.write(_table(rows) + "\n")
  print(_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
