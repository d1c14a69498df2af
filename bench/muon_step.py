"""Muon vs AdamW train step, the `stacked` layout, NS/backward schedule.

Three parts (`--parts`, default timing), each merged into
bench/results/muon_step.json under its own keys with its command:

timing: one jitted step = forward + backward + clip + optimizer update, fp32,
  the same batch for both optimizers (optim.presets.preset("adamw") /
  preset("muon"), Muon on the q,k,v,o,gate,up,down kernels with 5 fp32
  Newton-Schulz steps, AdamW on the rest) on ~100M `llama_100m`. Beside the
  measured times it prints the analytic Newton-Schulz share of the step's
  flops: NS costs 4 m m n + 2 m m m per iteration per m x n (m <= n) matrix,
  the step ~ 6 N T + attention (LlamaConfig.flops_per_token). The share is
  also given for Llama-2-7B at the Biderman et al. batch (768 x 1024
  tokens), where NS is a small fraction.
layout: the Muon update of `tiny_gqa`'s hidden matrices with 3, 5 and 8
  layers on 8 devices (fsdp, fsdp x tensor, data x fsdp): per-device NS
  flops max/mean from the balanced plan (`optim.muon.stacked_plan`) and
  without balancing (every group padded to a multiple of the devices), the
  all-to-all bytes per device from the compiled HLO
  (tools/plan/hlo_stats.py) over the ideal (each device's share of every
  matrix, once each way). Needs 8 devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8.
schedule: the compiled CPU HLO of a `tiny_gqa` train step with Muon (scanned
  or unrolled layers, with or without global-norm clipping): where the
  Newton-Schulz loops sit in the entry computation's sequential schedule
  relative to the backward pass (ops named transpose(jvp(...))), and how
  many backward ops each NS loop does not depend on.

Run: .venv/bin/python bench/muon_step.py [--batch 2 --seq 128 --iters 2]
     .venv/bin/python bench/muon_step.py --parts schedule
     XLA_FLAGS=--xla_force_host_platform_device_count=8 \
       .venv/bin/python bench/muon_step.py --parts layout
Writes bench/results/muon_step.json (other parts' keys kept) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optconsist_jax import optim
from optconsist_jax.model import Llama, preset
from optconsist_jax.model.config import LlamaConfig
from optconsist_jax.model.llama import abstract_model
from optconsist_jax.optim import muon as muon_lib
from optconsist_jax.sharding import leaf_shardings
from optconsist_jax.tools.plan import hlo_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "muon_step.json")


def ns_flops(config: LlamaConfig, steps: int = 5) -> float:
  """Newton-Schulz flops of one Muon step over the hidden matrices."""
  d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
  shapes = ([(d, config.num_heads * h)] * 2 + [(d, config.num_kv_heads * h)] * 2
            + [(d, f)] * 3)
  per_layer = sum(4 * min(a, b) ** 2 * max(a, b) + 2 * min(a, b) ** 3
                  for a, b in shapes)
  return float(steps * per_layer * config.num_layers)


def share(config: LlamaConfig, tokens: int, seq: int) -> float:
  ns = ns_flops(config)
  return ns / (ns + config.flops_per_token(seq) * tokens)


def time_step(model_config, optim_config, batch, seq, warmup, iters):
  model = Llama(model_config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.build(optim_config, params)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, model_config.vocab_size,
                                    (batch, seq + 1)), jnp.int32)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.perf_counter()
  for _ in range(warmup):
    params, opt_state, loss = step(params, opt_state)
    loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  return {"step_s_median": statistics.median(times), "step_s": times,
          "warmup_s": compile_s, "final_loss": float(loss)}


LAYOUTS = {
    # mesh shape, axis names, logical name -> mesh axis
    "fsdp": ((8,), ("fsdp",), {"embed": "fsdp"}),
    "fsdp_x_tensor": ((4, 2), ("fsdp", "tensor"),
                      {"embed": "fsdp", "heads": "tensor",
                       "kv_heads": "tensor", "mlp": "tensor"}),
    "data_x_fsdp": ((2, 4), ("data", "fsdp"), {"embed": "fsdp"}),
}


def hidden_matrices(num_layers: int, layout: str):
  """tiny_gqa's [L, in, out] hidden kernels placed on an 8-device mesh."""
  config = preset("tiny_gqa").replace(num_layers=num_layers)
  state = nnx.state(abstract_model(config), nnx.Param)
  specs = jax.tree_util.tree_flatten_with_path(
      nnx.get_partition_spec(state), is_leaf=lambda x: isinstance(x, P))[0]
  shape, axes, rules = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, axes,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  rng = np.random.default_rng(0)
  params = {}
  for (path, leaf), (_, spec) in zip(
      jax.tree_util.tree_flatten_with_path(state)[0], specs):
    name = "/".join(str(k.key) for k in path
                    if isinstance(k, jax.tree_util.DictKey))
    if name.startswith("layers/") and len(leaf.shape) == 3:
      sharding = NamedSharding(mesh, P(*(rules.get(n) for n in spec)))
      params[name] = jax.device_put(
          rng.normal(size=leaf.shape).astype(np.float32), sharding)
  return mesh, params


def layout_figures(num_layers: int, layout: str) -> dict:
  mesh, params = hidden_matrices(num_layers, layout)
  shardings = leaf_shardings(params)
  plan = muon_lib.stacked_plan(params, shardings)
  tx = muon_lib.muon(0.1, mesh=mesh, shardings=shardings)
  compiled = jax.jit(tx.update).lower(params, tx.init(params)).compile()
  hlo = compiled.as_text()
  stats = hlo_stats.collectives(hlo)
  ideal_bytes = 2 * sum(x.size * x.dtype.itemsize
                        for x in params.values()) / mesh.size
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "matrices": {k.split("/")[-2]: int(x.shape[0]) for k, x in
                   params.items()},
      "group_counts_per_device": [[int(c) for c in g.counts]
                                  for g in plan.groups],
      "ns_flops_max_over_mean_balanced": plan.max_over_mean,
      "ns_flops_max_over_mean_padded_unbalanced": (plan.padded_flops
                                                   / plan.ideal_flops),
      "ns_flops_all_slots_over_mean": plan.slot_flops / plan.ideal_flops,
      "all_to_all_padding_balanced": plan.moved_over_needed,
      "all_to_all_padding_unbalanced": plan.padded_moved_over_needed,
      "ns_flops_per_device_ideal": plan.ideal_flops,
      "ns_flops_per_device_max": max(plan.device_flops.values()),
      "all_to_all_ops": stats.count["all-to-all"],
      "all_to_all_bytes_per_device_hlo": stats.bytes["all-to-all"],
      "ideal_bytes_per_device": ideal_bytes,
      "all_to_all_bytes_over_ideal": stats.bytes["all-to-all"] / ideal_bytes,
      "other_collective_bytes_per_device_hlo": stats.total_bytes
      - stats.bytes["all-to-all"],
      "hlo_conditionals": len(re.findall(r"\bconditional\(", hlo)),
      "flops_per_device_cost_analysis": float(cost["flops"]),
  }


def schedule_overlap(hlo: str) -> dict:
  """Where the NS loops sit among the backward ops of the entry schedule.

  Backward ops: op_name containing `transpose(jvp` (JAX's names for the
  VJP); NS loops: entry `while` ops outside the forward/backward (Muon's
  scan over its coefficient table). XLA's CPU schedule is the order of the
  entry computation in the compiled (`is_scheduled=true`) module.
  """
  body = hlo.split("\nENTRY ", 1)[1].split("\n}\n", 1)[0].splitlines()[1:]
  instr = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)"
                     r"\((.*)$")
  order, deps, kind = [], {}, {}
  for line in body:
    m = instr.match(line)
    if not m:
      continue
    name, op, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ""
    deps[name] = set(re.findall(r"%([\w.\-]+)", rest.split("), ")[0]))
    order.append(name)
    if "transpose(jvp" in op_name:
      kind[name] = "backward"
    elif op == "while" and "jvp" not in op_name:
      kind[name] = "ns"
  pos = {n: i for i, n in enumerate(order)}

  def ancestors(n):
    seen, todo = set(), [n]
    while todo:
      for d in deps.get(todo.pop(), ()):
        if d not in seen:
          seen.add(d)
          todo.append(d)
    return seen

  bwd = [n for n in order if kind.get(n) == "backward"]
  ns = [n for n in order if kind.get(n) == "ns"]
  first_ns = min(pos[n] for n in ns)
  return {
      "entry_ops": len(order), "backward_ops": len(bwd), "ns_loops": len(ns),
      "last_backward_op_at": max(pos[n] for n in bwd),
      "first_ns_loop_at": first_ns,
      "backward_ops_scheduled_after_first_ns_loop": sum(
          pos[b] > first_ns for b in bwd),
      "backward_ops_independent_of_each_ns_loop": [
          sum(b not in ancestors(n) for b in bwd) for n in ns],
  }


def schedule_figures(scan_layers: bool, clip: bool) -> dict:
  config = preset("tiny_gqa").replace(scan_layers=scan_layers)
  model = Llama(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.build(optim.presets.preset(
      "muon", total_steps=10, clip_norm=1.0 if clip else None), params)
  tokens = jnp.zeros((2, 17), jnp.int32)

  def step(params, opt_state):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  hlo = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  return schedule_overlap(hlo)


def timing_figures(args) -> dict:
  config = preset(args.preset)
  tokens = args.batch * args.seq
  results = {}
  for name in ("adamw", "muon"):
    cfg = optim.presets.preset(name, total_steps=100)
    results[name] = time_step(config, cfg, args.batch, args.seq, args.warmup,
                              args.iters)
    print(name, results[name], flush=True)
  seven_b = preset("llama2_7b")
  return {
      "benchmark": "train step (fwd+bwd+update), Muon vs AdamW, fp32",
      "preset": args.preset, "params": config.num_params(),
      "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens,
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
      "adamw": results["adamw"], "muon": results["muon"],
      "muon_over_adamw": (results["muon"]["step_s_median"]
                          / results["adamw"]["step_s_median"]),
      "ns_flops_per_step": ns_flops(config),
      "train_flops_per_step": config.flops_per_token(args.seq) * tokens,
      "ns_flop_share_analytic": share(config, tokens, args.seq),
      "llama2_7b_ns_flop_share_at_768x1024": share(seven_b, 768 * 1024, 1024),
      "command": f"python bench/muon_step.py --parts timing --preset {args.preset} "
                 f"--batch {args.batch} --seq {args.seq} --warmup {args.warmup} --iters {args.iters}",
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="timing",
                      help="comma-separated: timing, layout, schedule")
  parser.add_argument("--preset", default="llama_100m")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args()
  parts = [p for p in args.parts.split(",") if p]
  unknown = set(parts) - {"timing", "layout", "schedule"}
  if unknown:
    sys.exit(f"--parts: unknown {sorted(unknown)}; expected timing, layout, "
             "schedule")
  if "layout" in parts and jax.device_count() < 8:
    sys.exit(f"--parts layout needs 8 devices, found {jax.device_count()}: "
             "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  out = {}
  if os.path.exists(RESULT):
    with open(RESULT) as f:
      out = json.load(f)
  out.update({"cpu_count": os.cpu_count(), "machine": platform.machine(),
              "jax": jax.__version__})
  if "timing" in parts:
    out.update(timing_figures(args))
  if "layout" in parts:
    figures = {}
    for layers in (3, 5, 8):
      for layout in LAYOUTS:
        key = f"{layers}_layers/{layout}"
        figures[key] = layout_figures(layers, layout)
        print("layout", key, {k: v for k, v in figures[key].items()
                              if "over" in k}, flush=True)
    out["layout"] = {
        "what": "Muon update of tiny_gqa's hidden matrices, `stacked`, 8 "
                "devices; flop ratios from the plan, bytes from compiled HLO",
        "figures": figures,
        "command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                   "python bench/muon_step.py --parts layout"}
  if "schedule" in parts:
    figures = {}
    for scan in (True, False):
      for clip in (True, False):
        key = (f"{'scanned' if scan else 'unrolled'}_layers/"
               f"{'clip' if clip else 'no_clip'}")
        figures[key] = schedule_figures(scan, clip)
        print("schedule", key, figures[key], flush=True)
    out["schedule"] = {
        "what": "tiny_gqa train step with the muon preset, 1 CPU device: "
                "NS loops vs backward ops in the compiled entry schedule",
        "figures": figures,
        "command": "python bench/muon_step.py --parts schedule"}
  out["load_average_1_5_15_min"] = list(os.getloadavg())
  os.makedirs(os.path.dirname(RESULT), exist_ok=True)
  with open(RESULT, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))
  print(f"wrote {RESULT}")


if __name__ == "__main__":
  main()
