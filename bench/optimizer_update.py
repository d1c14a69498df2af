"""Muon update alone on 8 fake CPU devices: stacked vs gspmd vs optax.contrib.

The param tree is the hidden matrices of a Llama-shaped model (q,k,v,o,gate,
up,down stacked on [L, in, out]), placed with FSDP (embed -> fsdp) or
FSDP x tensor (embed -> fsdp; heads, kv_heads, mlp -> tensor) NamedShardings.
Three jitted updates, same momentum / NS / scale:
  stacked:  optconsist_jax Muon, strategy='stacked' (all-to-all, local NS)
  gspmd:    optconsist_jax Muon, strategy='gspmd' (NS in param sharding)
  optax:    optax.contrib.muon (every leaf as L matrices, dims -2, -1)
For each: median wall time of --iters updates, and from the compiled module
per-device flops (cost_analysis), temp memory (memory_analysis) and the
bytes produced by collectives per device (result shapes of all-to-all,
all-reduce, all-gather, reduce-scatter, collective-permute in the HLO). Flops
are given twice: XLA's cost_analysis (which counts a while-loop body once, so
it undercounts our rolled NS loop 5x against optax's unrolled one) and the
dot flops read from the HLO with loop bodies counted once per trip. Fake devices share this machine's cores, so
repeated work shows as wall time.

Run: .venv/bin/python bench/optimizer_update.py [--hidden 256 --mlp 688
  --layers 8 --heads 8 --iters 3]
Writes bench/results/optimizer_update.json and prints a table.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from optconsist_jax.optim import muon as muon_lib  # noqa: E402
from optconsist_jax.sharding import leaf_shardings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "optimizer_update.json")
LAYOUTS = {
    "fsdp": ((8,), ("fsdp",), {"embed": "fsdp"}),
    "fsdp_x_tensor": ((4, 2), ("fsdp", "tensor"),
                      {"embed": "fsdp", "heads": "tensor",
                       "kv_heads": "tensor", "mlp": "tensor"}),
}
COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter",
               "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1,
          "f64": 8, "s8": 1, "u8": 1}


def hidden_matrices(hidden, mlp, layers, heads, kv_heads):
  head_dim = hidden // heads
  return {
      "layers/attn/q_proj/kernel": ((layers, hidden, heads * head_dim),
                                    ("embed", "heads")),
      "layers/attn/k_proj/kernel": ((layers, hidden, kv_heads * head_dim),
                                    ("embed", "kv_heads")),
      "layers/attn/v_proj/kernel": ((layers, hidden, kv_heads * head_dim),
                                    ("embed", "kv_heads")),
      "layers/attn/o_proj/kernel": ((layers, heads * head_dim, hidden),
                                    ("heads", "embed")),
      "layers/mlp/gate_proj/kernel": ((layers, hidden, mlp), ("embed", "mlp")),
      "layers/mlp/up_proj/kernel": ((layers, hidden, mlp), ("embed", "mlp")),
      "layers/mlp/down_proj/kernel": ((layers, mlp, hidden), ("mlp", "embed")),
  }


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _BYTES:
      total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",")
                                            if d] or [1]))
  return total


def _parse(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps, name, lines, entry = {}, None, [], None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, lines = m.group(1), []
      if line.startswith("ENTRY"):
        entry = name
    elif line.startswith("}") and name:
      comps[name] = lines
      name = None
    elif name:
      lines.append(line)
  return comps, entry


def hlo_costs(hlo: str) -> dict[str, float]:
  """Per-device collective bytes by kind and dot flops, loops unrolled.

  XLA's cost_analysis counts a while body once; here a body counts
  known_trip_count times.
  """
  comps, entry = _parse(hlo)

  def walk(comp, seen=()):
    out = dict.fromkeys((*COLLECTIVES, "dot_flops"), 0.0)
    if comp in seen or comp not in comps:
      return out
    shapes = {}
    for line in comps[comp]:
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)",
                   line)
      if not m:
        continue
      name, shape, op, rest = m.groups()
      shapes[name] = shape
      base_op = op.replace("-start", "")
      if base_op in COLLECTIVES:
        out[base_op] += _shape_bytes(shape)
      if op == "dot":
        lhs = re.match(r"%?([\w.\-]+)", rest).group(1)
        dims = [int(d) for d in re.findall(r"\[([\d,]*)\]",
                                           shapes.get(lhs, "[]"))[0].split(",")
                if d] if lhs in shapes else []
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        k = np.prod([dims[int(i)] for i in contract.group(1).split(",")
                     if i]) if contract and dims else 1
        res = re.search(r"\[([\d,]*)\]", shape).group(1)
        out["dot_flops"] += 2.0 * k * np.prod(
            [int(d) for d in res.split(",") if d] or [1])
      trips = 1
      if op == "while":
        t = re.search(r"known_trip_count[^0-9]*(\d+)", rest)
        trips = int(t.group(1)) if t else 1
      for callee in re.findall(
          r"(?:to_apply|body|calls|branch_computations)=\{?%?([\w.\-]+)",
          rest):
        sub = walk(callee, seen + (comp,))
        for key in out:
          out[key] += trips * sub[key]
    return out

  return walk(entry)


def run(kind, layout, spec_tree, iters):
  shape, axes, rules = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, axes,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  rng = np.random.default_rng(0)
  params, grads = {}, {}
  for k, (s, names) in spec_tree.items():
    sharding = NamedSharding(mesh, P(None, *(rules.get(n) for n in names)))
    params[k] = jax.device_put(rng.normal(size=s).astype(np.float32),
                               sharding)
    grads[k] = jax.device_put(rng.normal(size=s).astype(np.float32), sharding)
  if kind == "optax":
    tx = optax.contrib.muon(
        0.01, muon_weight_dimension_numbers=lambda p: jax.tree.map(
            lambda _: optax.contrib.MuonDimensionNumbers(-2, -1), p))
  else:
    tx = muon_lib.muon(0.01, strategy=kind, mesh=mesh,
                       shardings=leaf_shardings(params))
  state = tx.init(params)
  update = jax.jit(tx.update)
  compiled = update.lower(grads, state, params).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = update(grads, state, params)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(update(grads, state, params))
    times.append(time.perf_counter() - t0)
  costs = hlo_costs(compiled.as_text())
  coll = {k: int(costs[k]) for k in COLLECTIVES}
  return {"wall_s_median": statistics.median(times), "wall_s": times,
          "per_device_dot_flops_hlo": costs["dot_flops"],
          "per_device_flops_cost_analysis": float(cost.get("flops",
                                                           float("nan"))),
          "temp_bytes_per_device": int(getattr(mem, "temp_size_in_bytes", -1)),
          "collective_bytes_per_device": coll,
          "collective_bytes_total_per_device": sum(coll.values())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--mlp", type=int, default=688)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--layouts", default="fsdp,fsdp_x_tensor")
  args = parser.parse_args()
  spec_tree = hidden_matrices(args.hidden, args.mlp, args.layers, args.heads,
                              args.kv_heads)
  matrix_bytes = sum(4 * int(np.prod(s)) for s, _ in spec_tree.values())
  ns_total = 0.0
  for s, _ in spec_tree.values():
    m, n = sorted(s[1:])
    ns_total += 5 * s[0] * (4 * m * m * n + 2 * m ** 3)
  results = {}
  for layout in args.layouts.split(","):
    for kind in ("stacked", "gspmd", "optax"):
      r = run(kind, layout, spec_tree, args.iters)
      results[f"{layout}/{kind}"] = r
      print(f"{layout:14s} {kind:8s} {r['wall_s_median']*1e3:9.1f} ms "
            f"{r['per_device_dot_flops_hlo']/1e9:8.3f} GFLOP/dev "
            f"{r['temp_bytes_per_device']/2**20:8.1f} MiB temp "
            f"{r['collective_bytes_total_per_device']/2**20:8.2f} MiB coll",
            flush=True)
    base = results[f"{layout}/stacked"]
    for kind in ("gspmd", "optax"):
      results[f"{layout}/{kind}"]["stacked_speedup"] = (
          results[f"{layout}/{kind}"]["wall_s_median"]
          / base["wall_s_median"])
  out = {
      "benchmark": "Muon update alone, 8 fake CPU devices, fp32",
      "shapes": {k: s for k, (s, _) in spec_tree.items()},
      "routed_matrix_bytes": matrix_bytes,
      "routed_matrix_bytes_over_8": matrix_bytes / 8,
      "ns_flops_total_analytic": ns_total,
      "ns_flops_per_device_ideal": ns_total / 8,
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "results": results,
      "command": ("python bench/optimizer_update.py --hidden {} --mlp {} "
                  "--layers {} --heads {} --kv_heads {} --iters {}").format(
                      args.hidden, args.mlp, args.layers, args.heads,
                      args.kv_heads, args.iters),
  }
  os.makedirs(os.path.dirname(RESULT), exist_ok=True)
  with open(RESULT, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps({k: v for k, v in out.items() if k != "results"},
                   indent=2))


if __name__ == "__main__":
  main()
