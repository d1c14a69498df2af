"""The eval plan's report and command line (tools/plan/eval_plan.py plans).

`python -m optconsist_jax.tools.plan --eval --config configs/X_eval.py
--model PRESET --topology T` compiles the eval job's programs and probes for
topology T and prints a table per program (per-chip HBM: the program's own
peak, what the job holds beside it, their sum against the chip's HBM) and a
verdict: the largest residency, its headroom and the largest probe.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

from optconsist_jax.tools.plan import eval_plan
from optconsist_jax.tools.plan.eval_plan import EvalPlanResult
from optconsist_jax.tools.plan.eval_plan import ProgramResult

GIB = eval_plan.GIB


def describe(r: ProgramResult) -> str:
  """One line: a program's peak and the phase's HBM per chip."""
  return (f"{r.name}: peak {r.peak_bytes / GIB:.2f} GiB/chip, with what the"
          f" job holds {r.combined_bytes / GIB:.2f} GiB"
          + (" (references estimated)" if r.refs_estimated else "")
          + (f" (same compile as {r.reused})" if r.reused else
             f" (compiled in {r.compile_seconds:.1f} s)"))


def markdown_table(r: EvalPlanResult) -> str:
  """One row per program: per-chip GiB and whether the phase fits."""
  head = ("| program | phase | compiled for | args GiB | out GiB | temp GiB |"
          " peak GiB | + held by job GiB | combined GiB | HBM GiB | fits |"
          " compile s |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for p in r.programs:
    row = p.row(r.hbm_gib)
    fits = {True: "yes", False: "**no**", None: "n/a"}[row["fits"]]
    comp = f"= {p.reused}" if p.reused else f"{p.compile_seconds:.0f}"
    lines.append(
        f"| {p.name} | {p.phase} | {p.shapes} | {row['args_gib']:.2f} |"
        f" {row['out_gib']:.2f} | {row['temp_gib']:.2f} |"
        f" {row['peak_gib']:.2f} | {row['resident_other_gib']:.2f} |"
        f" {row['combined_gib']:.2f} |"
        f" {'-' if r.hbm_gib is None else f'{r.hbm_gib:.0f}'} | {fits} |"
        f" {comp} |")
  return "\n".join(lines)


def summary(r: EvalPlanResult) -> str:
  """The verdict: the largest residency, its headroom, the top probe."""
  big = r.largest()
  chips = math.prod(r.mesh_shape.values())
  lines = [(f"{r.spec.topology}: {chips} chips, eval mesh {r.mesh_shape};"
            f" one model's state {r.param_bytes / GIB:.2f} GiB/chip")]
  probes = [p for p in r.programs if p.phase == "probes"]
  if probes:
    top = max(probes, key=lambda p: p.combined_bytes)
    lines.append(f"largest probe: {top.name}, {top.combined_bytes / GIB:.2f}"
                 f" GiB/chip with what the job holds (peak of the program"
                 f" {top.peak_bytes / GIB:.2f})")
  evals = [p for p in r.programs if p.phase == "eval"]
  if evals:
    top = max(evals, key=lambda p: p.combined_bytes)
    lines.append(f"largest eval program: {top.name},"
                 f" {top.combined_bytes / GIB:.2f} GiB/chip with the probes'"
                 " base held")
  cap = ("" if r.hbm_gib is None else
         f" of {r.hbm_gib:.0f} GiB: headroom"
         f" {r.hbm_gib - big.combined_bytes / GIB:.2f} GiB/chip,"
         f" fits: {'yes' if r.fits() else 'NO'}")
  lines.append(f"largest combined residency: {big.name},"
               f" {big.combined_bytes / GIB:.2f} GiB/chip{cap}")
  return "\n".join(lines)


def add_arguments(p) -> None:
  """The eval plan's flags on the plan CLI's parser."""
  g = p.add_argument_group(
      "eval plan (--eval): the eval job's programs and probes; --config is"
      " then an eval config (configs/*_eval.py), --model with --param_dtype,"
      " --dtype and --remat the run's model")
  g.add_argument("--eval", action="store_true",
                 help="plan the eval job and its probes instead of training")
  g.add_argument("--no_probes", action="store_true",
                 help="with --eval: the evals only")
  g.add_argument("--only", default="",
                 help="with --eval: comma-separated program name prefixes"
                 " (lm_loss, multiple_choice, math_prefill, math_decode,"
                 " probe_reference, probe_update, probe_second_order,"
                 " probe_activations)")


def main(args, config: Any) -> int:
  """`python -m optconsist_jax.tools.plan --eval`: plan, print, write."""
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.model import architecture  # pylint: disable=g-import-not-at-top
  model = architecture.preset(args.model)
  model = model.replace(**{k: v for k, v in (
      ("param_dtype", args.param_dtype), ("dtype", args.dtype),
      ("remat_policy", args.remat), ("attention_impl", args.attention))
                           if v is not None})
  only = tuple(x.strip() for x in args.only.split(",") if x.strip())
  with contextlib.ExitStack() as stack:
    rows = stack.enter_context(open(args.json, "w")) if args.json else None
    results = _plan_all(args, config, model, only, rows)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.writelines(f"{markdown_table(r)}\n\n{summary(r)}\n\n"
                   for r in results)
  print("eval plan written to " + (", ".join(
      x for x in (args.markdown, args.json) if x) or "stdout only"))
  return 0


def _plan_all(args, config, model, only, rows) -> list[EvalPlanResult]:
  """Plans each --topology; each row goes to `rows` as it is measured."""
  results = []
  for t in [x.strip() for x in args.topology.split(",") if x.strip()]:
    spec = eval_plan.EvalPlanSpec(model=model, eval_config=config,
                                  topology=t, probes=not args.no_probes)
    print(f"# eval plan: {args.model} on {t}", flush=True)

    def progress(p, hbm, t=t):
      print(describe(p), flush=True)
      if rows is not None:  # Each row as it comes: a long plan can stop.
        rows.write(json.dumps({"topology": t, "model": args.model,
                               **p.row(hbm)}) + "\n")
        rows.flush()
    r = eval_plan.plan_eval(spec, only=only, progress=progress)
    results.append(r)
    print(markdown_table(r))
    print(summary(r), flush=True)
  return results
