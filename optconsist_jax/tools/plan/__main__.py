r"""Ahead-of-time fit and communication report for TPU topologies, on a CPU.

Compiles the real train step for a Cloud TPU topology without a TPU
(optconsist_jax.tools.plan.aot) and reports per-chip HBM against the chip's
capacity, the collectives in the optimized HLO per step
(optconsist_jax.tools.plan.hlo_stats) and a roofline step time
(optconsist_jax.tools.plan.step_time).

  python -m optconsist_jax.tools.plan --model llama2_7b --mesh fsdp \
      --topology v5p-8 --seq_len 1024 --global_batch 768 --per_chip_batch 4
  python -m optconsist_jax.tools.plan --compare --model llama2_7b \
      --mesh fsdp,fsdp_tp --optimizer adamw,lora --topology v4-8,v5p-8

Peak HBM is estimated as arguments + outputs - aliased (donated) + temporaries,
the same accounting XLA uses for its own out-of-memory check. Collective bytes
are the size of the full (unsharded-over-the-group) tensor per op: the output of
an all-gather, the input of a reduce-scatter, the operand of an all-reduce,
all-to-all or collective-permute; ops inside while loops (scan over layers,
gradient accumulation) are multiplied by the loop's trip count, read from
XLA's known_trip_count or, failing that, from the loop condition's
`counter < constant` (the report says how many loops had no trip count).
The topology "cpu-N" compiles for N local CPU devices instead (tests).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import sys

from optconsist_jax import errors
from optconsist_jax import paths
from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import aot as planner
from optconsist_jax.tools.plan import eval_report
from optconsist_jax.tools.plan import search

GIB = planner.GIB


# ----------------------------------------------------------------------------
# Output.


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}"


def _human(n: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def markdown_table(results: Sequence[planner.PlanResult]) -> str:
  """One row per plan: HBM per chip, fit, collective GiB per step, the
  roofline step time (step_time.estimate), the optimizer update's share of
  it and the step's overhead over AdamW's on the same topology and mesh.

  Then a warning line for each replicated optimizer-state leaf over
  aot.REPLICATED_WARN_BYTES per chip.
  """
  head = ("| topology | mesh (data x fsdp x tensor) | optimizer | grad accum |"
          " args GiB | temp GiB | peak GiB | HBM GiB | fits |"
          " all-gather GiB | reduce-scatter GiB | all-reduce GiB |"
          " all-to-all GiB | coll.-permute GiB | collectives GiB/step |"
          " opt state GiB/chip | step s | optimizer s (share) |"
          " over AdamW |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  est = [planner.step_estimate(r) for r in results]
  adamw = {(r.spec.topology, r.row()["mesh"]): e.step_s
           for r, e in zip(results, est)
           if e is not None and r.spec.optimizer == "adamw"}
  for r, e in zip(results, est):
    row = r.row()
    base = adamw.get((r.spec.topology, row["mesh"]))
    timing = ("- | - | -" if e is None else
              f"{e.step_s:.2f} | {e.optimizer_total_s:.3f}"
              f" ({e.optimizer_total_s / e.step_s:.1%}) | "
              + ("-" if base is None else f"{e.step_s / base - 1:+.1%}"))
    fits = {True: "yes", False: "**no**", None: "n/a"}[row["fits"]]
    lines.append(
        f"| {row['topology']} | {row['mesh']} | {row['optimizer']} |"
        f" {row['accum']} | {_gib(row['args_gib'])} | {_gib(row['temp_gib'])} |"
        f" {_gib(row['peak_gib'])} | {_gib(row['hbm_gib'])} | {fits} | "
        + " | ".join(_gib(row[f"{k}_gib"]) for k in hlo_stats.COLLECTIVE_KINDS)
        + f" | {_gib(row['collective_gib'])} | {_gib(row['opt_state_gib'])} |"
        f" {timing} |")
  lines.extend(_replicated_warnings(results))
  return "\n".join(lines)


def _replicated_warnings(results: Sequence[planner.PlanResult]) -> list[str]:
  out = []
  for r in results:
    for path, size in r.replicated_opt_leaves:
      out.append(
          f"\nWARNING: {r.spec.topology} {r.spec.optimizer}: optimizer-state"
          f" leaf {path} is replicated, {_human(size)} per chip (over"
          f" {_human(planner.REPLICATED_WARN_BYTES)}); give the family a spec"
          " hook (docs/optimizers.md)")
  return out


def report(r: planner.PlanResult) -> str:
  """Detailed text for one plan."""
  s, c = r.spec, r.collectives
  lines = [
      f"topology {s.topology}: {math.prod(r.mesh_shape.values())} chips, mesh {r.mesh_shape}, optimizer {s.optimizer}, trainable"
      f" params {r.trainable_params:,}",
      f"batch {s.global_batch} x {s.seq_len} tokens in {r.grad_accum_steps}"
      f" micro-batches of {s.global_batch // r.grad_accum_steps};"
      f" compiled in {r.compile_seconds:.1f} s",
      "per-chip HBM: arguments {}  outputs {}  aliased {}  temporaries {}"
      "  peak {}  capacity {}  fits: {}".format(
          *(_human(x) for x in (r.argument_bytes, r.output_bytes,
                                r.alias_bytes, r.temp_bytes, r.peak_bytes)),
          "-" if r.hbm_gib is None else _human(r.hbm_gib * GIB),
          {True: "yes", False: "NO", None: "n/a"}[r.fits]),
      f"optimizer state: {_human(r.opt_state_bytes)} per chip",
  ]
  lines += [w.strip() for w in _replicated_warnings([r])]
  if c is None:
    lines.append(f"the TPU compiler ran out of HBM (temporaries from its"
                 f" message; arguments computed): {r.error}")
    return "\n".join(lines)
  lines.append("collectives per step (count, bytes of the full tensors):")
  for k in hlo_stats.COLLECTIVE_KINDS:
    lines.append(f"  {k:20s} {c.count[k]:8d} {_human(c.bytes[k]):>12s}")
  for k, (n, b) in c.dcn.items():
    lines.append(f"  {'DCN ' + k:20s} {n:8.0f} {_human(b):>12s} per chip")
  if c.loops_without_trip_count:
    lines.append(f"  ({c.loops_without_trip_count} while loops had no trip"
                 " count; their collectives are counted once)")
  est = planner.step_estimate(r)
  if est is not None:
    lines.append(est.describe())
  return "\n".join(lines)


def _configure_platform(topologies: Sequence[str]) -> None:
  """Before jax starts: CPU backend only; enough fake CPU devices for cpu-N.

  The planner never runs on an accelerator; TPU topologies come from libtpu's
  topology description, not from attached chips.
  """
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  n = max([int(t.split("-", 1)[1]) for t in topologies
           if t.startswith("cpu-")] or [0])
  flags = os.environ.get("XLA_FLAGS", "")
  if n > 1 and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={n}").strip()


def _csv(s: str) -> list[str]:
  return [x.strip() for x in s.split(",") if x.strip()]


def parse_rules(text: str) -> tuple[tuple[str, object], ...]:
  """'expert=data,expert_mlp=none' -> (('expert', 'data'),
  ('expert_mlp', None)); 'a=x+y' maps onto both mesh axes."""
  rules = []
  for item in _csv(text):
    name, sep, axes = item.partition("=")
    if not sep or not name.strip():
      raise errors.UserError(f"--extra_rules {text!r}: {item!r} is not"
                             " NAME=AXIS[+AXIS] (AXIS none: replicated)")
    parts = tuple(a.strip() for a in axes.split("+") if a.strip())
    value = (None if parts in ((), ("none",)) else
             parts[0] if len(parts) == 1 else parts)
    rules.append((name.strip(), value))
  return tuple(rules)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m optconsist_jax.tools.plan", description=__doc__.split("\n")[0])
  p.add_argument("--config", help="configs/*.py with get_config(arg):"
                 " FILE or FILE:ARG; plans that run (with --topology,"
                 " optionally --grad_accum_steps)")
  p.add_argument("--model", default="llama2_7b",
                 help="model preset of either family (model/architecture.py:"
                 " llama2_7b, qwen3_8b, moonlight_16b_a3b, ...)")
  p.add_argument("--mesh", default="fsdp",
                 help="mesh preset(s), comma-separated")
  p.add_argument("--mesh_shape", default=None,
                 help="data,fsdp,tensor sizes (one may be -1), overriding the"
                 " preset's")
  p.add_argument("--extra_rules", default=None,
                 help="sharding rules put before the table, for every --mesh:"
                 " NAME=AXIS[+AXIS],... (AXIS none: replicated), e.g."
                 " expert=data for experts split over the data axis (expert"
                 " parallelism; sharding.py)")
  p.add_argument("--topology", default="v5p-8",
                 help="TPU topology(ies) (comma-separated) or cpu-N")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--global_batch", type=int, default=768)
  p.add_argument("--per_chip_batch", type=int, default=4,
                 help="rows per chip per micro-batch; sets grad accumulation")
  p.add_argument("--grad_accum_steps", type=int, default=None)
  p.add_argument("--optimizer", default="adamw",
                 help="optimizer preset: adamw|muon|muon_gspmd|muon_contrib|"
                 "lora or any optimizer name (an Optax name such as lion,"
                 " pkg.module:function), comma-separated for --compare")
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--param_dtype", default="float32")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="full")
  p.add_argument("--attention", default=None,
                 help="LlamaConfig.attention_impl: xla (the model's default),"
                 " splash (TPU Pallas kernel), cudnn or auto")
  p.add_argument("--compare", action="store_true",
                 help="plan every topology x mesh x optimizer, print a table")
  p.add_argument("--markdown", help="also write the table to this file")
  p.add_argument("--json", help="also write the results as JSON lines here")
  p.add_argument("--hlo_dir", default=None,
                 help="write each compiled step's optimized HLO here"
                 " (TOPOLOGY_MESH_OPTIMIZER.hlo.gz)")
  search.add_arguments(p)
  eval_report.add_arguments(p)
  args = p.parse_args(argv)
  args.markdown, args.json, args.hlo_dir = (
      paths.resolve(x) for x in (args.markdown, args.json, args.hlo_dir))
  if args.search:
    _configure_platform([args.topology])
    return search.main(args)
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
  if args.config:
    file, sep, arg = args.config.partition(":")
    args.config = paths.resolve(file) + sep + arg
  _configure_platform(_csv(args.topology))

  specs = []
  if args.eval and not args.config:
    return eval_report.main(args, None)
  if args.config:
    path, _, arg = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("plan_config", path)
    if spec is None:
      raise errors.UserError(f"--config {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    with errors.user_input(f"--config {args.config}"):
      spec.loader.exec_module(module)
      if not hasattr(module, "get_config"):
        raise errors.UserError(f"--config {path}: has no get_config()")
      config = module.get_config(arg) if arg else module.get_config()
    if args.eval:
      return eval_report.main(args, config)
    overrides = ({} if args.grad_accum_steps is None else
                 {"grad_accum_steps": args.grad_accum_steps})
    if args.attention:
      overrides["attention_impl"] = args.attention
    with errors.user_input(f"--config {args.config}"):
      base = planner.spec_from_config(config, **overrides)
    results = []
    for t in _csv(args.topology):
      hlo = (os.path.join(args.hlo_dir, f"{t}_config.hlo.gz")
             if args.hlo_dir else None)
      results.append(planner.plan(dataclasses.replace(base, topology=t),
                                  hlo_path=hlo))
    for r in results:
      print(report(r), flush=True)
      print(flush=True)
  else:
    mesh_override = {}
    if args.mesh_shape:
      sizes = [int(x) for x in _csv(args.mesh_shape)]
      if len(sizes) != 3:
        raise errors.UserError(f"--mesh_shape={args.mesh_shape!r}: expected"
                         " data,fsdp,tensor")
      mesh_override = dict(zip(("data", "fsdp", "tensor"), sizes))
    if args.extra_rules:
      mesh_override["extra_rules"] = parse_rules(args.extra_rules)
    combos = list(itertools.product(_csv(args.topology), _csv(args.mesh),
                                    _csv(args.optimizer)))
    if not args.compare:
      combos = combos[:1]
    for topology, mesh, optimizer in combos:
      mesh_spec = ({"preset": mesh, **mesh_override} if mesh_override
                   else mesh)
      specs.append(planner.PlanSpec(
          model=args.model, mesh=mesh_spec, topology=topology,
          seq_len=args.seq_len, global_batch=args.global_batch,
          grad_accum_steps=args.grad_accum_steps,
          per_chip_batch=args.per_chip_batch, optimizer=optimizer,
          lora_rank=args.lora_rank, param_dtype=args.param_dtype,
          dtype=args.dtype, remat_policy=args.remat,
          attention_impl=args.attention))
    results = []
    for s in specs:
      hlo = None
      if args.hlo_dir:
        mesh_name = s.mesh if isinstance(s.mesh, str) else s.mesh["preset"]
        hlo = os.path.join(args.hlo_dir,
                           f"{s.topology}_{mesh_name}_{s.optimizer}.hlo.gz")
      try:
        r = planner.plan(s, hlo_path=hlo)
      except Exception as e:  # pylint: disable=broad-except
        if not args.compare:
          raise
        print(f"# {s.topology} {s.mesh} {s.optimizer}: FAILED: "
              f"{type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        continue
      results.append(r)
      print(report(r), flush=True)
      print(flush=True)
  table = markdown_table(results)
  print(table)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  if args.json:
    with open(args.json, "w") as f:
      for r in results:
        counts = None if r.collectives is None else r.collectives.count
        est = planner.step_estimate(r)
        f.write(json.dumps({**r.row(), **(est.row() if est else {}),
                            "collective_counts": counts}) + "\n")
  return 0


if __name__ == "__main__":
  errors.run(main, absl=False)
