r"""Measured layout sweep: run each candidate layout on the devices at hand.

  python -m optconsist_jax.tools.layouts --config configs/tiny_metamath.py \
      --layouts 1x8x1,2x4x1,1x4x2:2:dots --steps 5 --out results/layouts

For each layout `DATAxFSDPxTENSOR[:ACCUM[:REMAT]]` (mesh axis sizes with the
`fsdp_tp` rules; gradient-accumulation steps and remat policy default to the
config's) the training config (configs/*.py with the same `--config.x.y=`
overrides as optconsist_jax.train) gets that mesh; the real train step is
compiled, run once to warm up and then `--steps` times on synthetic token
batches from a fixed seed (random-init weights; no data files, no
checkpoints). Written to `--out` (by process 0 only, so it works unchanged on
a multi-host slice where every host runs the same command):

  layouts.json   one record per layout: measured step time (median),
                 tokens/s/chip, MFU (where the device's peak is known), peak
                 device memory (`memory_stats()`, where the backend reports
                 it), collective bytes per step from the compiled HLO, and the
                 planner's roofline estimate for the same step
                 (optconsist_jax.tools.plan.step_time; TPUs only)
  layouts.md     the same as a table
  layouts.png    measured (and estimated) step time per layout

An existing output directory with results is an error unless --overwrite.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from optconsist_jax.train import config as config_types
from optconsist_jax import metrics as metrics_lib
from optconsist_jax import sharding
from optconsist_jax.train import setup as train_setup
from optconsist_jax.train import step as step_lib
from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import step_time
from optconsist_jax.platforms import tpu as tpu_facts

FILES = ("layouts.json", "layouts.md", "layouts.png")


@dataclasses.dataclass(frozen=True)
class Layout:
  data: int
  fsdp: int
  tensor: int
  accum: int | None = None
  remat: str | None = None

  def label(self) -> str:
    extra = "".join(f":{x}" for x in (self.accum, self.remat) if x is not None)
    return f"{self.data}x{self.fsdp}x{self.tensor}{extra}"


def parse_layouts(text: str) -> list[Layout]:
  """'1x8x1,2x4x1:2:dots' -> Layouts; bad entries name themselves."""
  out = []
  for item in [x.strip() for x in text.split(",") if x.strip()]:
    parts = item.split(":")
    try:
      sizes = [int(v) for v in parts[0].split("x")]
      if len(sizes) != 3 or len(parts) > 3:
        raise ValueError
      accum = int(parts[1]) if len(parts) > 1 and parts[1] else None
    except ValueError:
      raise ValueError(f"--layouts entry {item!r}: expected"
                       " DATAxFSDPxTENSOR[:ACCUM[:REMAT]], e.g. 1x4x2:2:dots"
                       ) from None
    out.append(Layout(*sizes, accum=accum,
                      remat=parts[2] if len(parts) > 2 else None))
  if not out:
    raise ValueError("--layouts is empty")
  return out


def layout_config(config: dict[str, Any], layout: Layout
                  ) -> config_types.ExperimentConfig:
  """The training config dict with this layout's mesh, accum and remat."""
  d = json.loads(json.dumps(config, default=list))
  d["mesh"] = {"preset": "fsdp_tp", "data": layout.data, "fsdp": layout.fsdp,
               "tensor": layout.tensor}
  if layout.accum is not None:
    d.setdefault("train", {})["grad_accum_steps"] = layout.accum
  if layout.remat is not None:
    d.setdefault("model", {})["remat_policy"] = layout.remat
  # The trainer fills total_steps=0 from the data; any value runs alike.
  for g in (d.get("optim") or {}).get("groups", {}).values():
    if isinstance(g, dict) and isinstance(g.get("schedule"), dict):
      g["schedule"]["total_steps"] = g["schedule"].get("total_steps") or 1000
  return config_types.ExperimentConfig.from_dict(d)


def _synthetic_batch(config, mesh, seed: int):
  """This process's rows of one global batch of random tokens."""
  rows = config.data.global_batch_size // jax.process_count()
  t = config.data.seq_len
  rng = np.random.default_rng(seed + jax.process_index())
  tokens = rng.integers(0, config.model.vocab_size, (rows, t + 1),
                        dtype=np.int32)
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((rows, t), np.float32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32),
                                        (rows, t)).copy(),
           "segment_ids": np.ones((rows, t), np.int32)}
  return step_lib.global_batch(local, mesh, config.mesh.rules)


def _local_tpu_slice(devices) -> tpu_facts.TpuSlice | None:
  """The TPU slice these devices form (None: not a known TPU)."""
  chip = tpu_facts.chip_for_device_kind(devices[0].device_kind)
  if chip is None or not hasattr(devices[0], "coords"):
    return None
  dims = chip.torus_dims
  shape = tuple(max(d.coords[a] for d in devices) + 1 for a in range(dims))
  return tpu_facts.TpuSlice(f"local {chip.name}", chip, shape, "default")


def _peak_memory() -> int | None:
  peaks = []
  for d in jax.local_devices():
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure(config: dict[str, Any], layout: Layout, steps: int,
            seed: int = 0) -> dict[str, Any]:
  """Compiles and times one layout; a record for the table."""
  exp = layout_config(config, layout)
  mesh = sharding.make_mesh(exp.mesh)
  train_setup.preflight(dataclasses.replace(
      exp, init_from=dataclasses.replace(exp.init_from, path=None)), mesh)
  s = train_setup.setup(exp, mesh)
  state = s.builder.init(s.tx)
  fn = step_lib.make_train_step(
      s.graphdef, s.tx, mesh=mesh, rules=s.rules, state_shardings=s.shardings,
      grad_accum_steps=exp.train.grad_accum_steps)
  batch = _synthetic_batch(exp, mesh, seed)
  t0 = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  stats = hlo_stats.collectives(compiled.as_text())
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  n = mesh.devices.size
  tokens = exp.data.global_batch_size * exp.data.seq_len
  tok_s = tokens / step_s
  peak = metrics_lib.peak_flops(mesh.devices.flat[0])
  mfu = metrics_lib.mfu(exp.model.flops_per_token(exp.data.seq_len), tok_s, n,
                        peak)
  est = None
  tpu = _local_tpu_slice(list(mesh.devices.flat))
  if tpu is not None:
    coords = [tuple(d.coords[:tpu.chip.torus_dims])
              + (getattr(d, "slice_index", 0) or 0,)
              for d in mesh.devices.flat]
    lora = exp.lora is not None
    est = step_time.estimate(
        exp.model, seq_len=exp.data.seq_len,
        global_batch=exp.data.global_batch_size, collectives=stats, tpu=tpu,
        device_coords=coords, trainable_fraction=0.0 if lora else 1.0)
  return {
      "layout": layout.label(), "mesh": dict(mesh.shape),
      "grad_accum_steps": exp.train.grad_accum_steps,
      "remat": exp.model.remat_policy, "devices": n,
      "device_kind": mesh.devices.flat[0].device_kind,
      "steps": steps, "step_s": step_s, "step_s_all": times,
      "tokens_per_step": tokens, "tokens_per_s": tok_s,
      "tokens_per_s_per_chip": tok_s / n, "mfu": mfu,
      "peak_memory_bytes": _peak_memory(), "compile_s": compile_s,
      "collective_bytes": stats.total_bytes,
      "loss": float(jax.device_get(m["loss"])) if "loss" in m else None,
      "estimate": None if est is None else est.row(),
      "assumptions": None if est is None else est.assumptions.describe(),
  }


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def markdown(records: Sequence[dict[str, Any]]) -> str:
  head = ("| layout (data x fsdp x tensor[:accum[:remat]]) | accum | remat |"
          " step s | tokens/s/chip | MFU | peak memory GiB |"
          " collectives GiB/step | est. step s | est. bound | est. MFU |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in records:
    e = r["estimate"] or {}
    peak = r["peak_memory_bytes"]
    lines.append(
        f"| {r['layout']} | {r['grad_accum_steps']} | {r['remat']} |"
        f" {r['step_s']:.4g} | {r['tokens_per_s_per_chip']:.4g} |"
        f" {_num(r['mfu'], '.1%')} |"
        f" {_num(None if peak is None else peak / 2**30, '.2f')} |"
        f" {r['collective_bytes'] / 2**30:.4g} |"
        f" {_num(e.get('step_s'), '.4g')} | {e.get('bound', '-')} |"
        f" {_num(e.get('mfu'), '.1%')} |")
  first = records[0] if records else {}
  lines += ["", f"{first.get('devices')} x {first.get('device_kind')};"
            f" median of {first.get('steps')} steps after one warm-up step;"
            " synthetic tokens, random init."]
  if first.get("assumptions"):
    lines.append("Estimate " + first["assumptions"] + ".")
  return "\n".join(lines)


def bar_chart(records: Sequence[dict[str, Any]], path: str) -> None:
  # deferred: matplotlib loads only when a chart is drawn.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  # deferred: pyplot after the Agg backend is chosen.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = [r["layout"] for r in records]
  x = np.arange(len(records))
  measured = [r["step_s"] for r in records]
  est = [(r["estimate"] or {}).get("step_s") for r in records]
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(records)), 3.5))
  width = 0.4 if any(e is not None for e in est) else 0.6
  ax.bar(x, measured, width, label="measured")
  if any(e is not None for e in est):
    ax.bar(x + width, [e or 0 for e in est], width, label="roofline estimate")
    ax.legend()
  ax.set_xticks(x + (width / 2 if width == 0.4 else 0), labels, rotation=20)
  ax.set_ylabel("step time (s)")
  ax.set_title(f"{records[0]['devices']} x {records[0]['device_kind']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(records: Sequence[dict[str, Any]], out: str,
          overwrite: bool = False) -> list[str]:
  """Writes the JSON, markdown and chart (process 0 only); their paths."""
  paths = [os.path.join(out, f) for f in FILES]
  if jax.process_index() != 0:
    return paths
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{existing[0]} exists; pass --overwrite or choose"
                          " another --out")
  os.makedirs(out, exist_ok=True)
  with open(paths[0], "w") as f:
    json.dump({"records": list(records), "loadavg": os.getloadavg()}, f,
              indent=1)
  with open(paths[1], "w") as f:
    f.write(markdown(records) + "\n")
  bar_chart(records, paths[2])
  return paths


def check_output(out: str, overwrite: bool) -> None:
  """Refuses, before any compile, to overwrite earlier results."""
  existing = [os.path.join(out, f) for f in FILES
              if os.path.exists(os.path.join(out, f))]
  if existing and not overwrite and jax.process_index() == 0:
    raise FileExistsError(f"{existing[0]} exists; pass --overwrite or choose"
                          " another --out")


# ----------------------------------------------------------------------------
# Command line.

_LAYOUTS = flags.DEFINE_string(
    "layouts", None, "comma-separated DATAxFSDPxTENSOR[:ACCUM[:REMAT]]")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per layout")
_OUT = flags.DEFINE_string("out", "results/layouts", "output directory")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "replace results already in --out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tpu_facts.maybe_initialize_distributed()
  config = flags.FLAGS.config.to_dict()
  try:
    layouts = parse_layouts(_LAYOUTS.value or "")
    check_output(_OUT.value, _OVERWRITE.value)
  except (ValueError, FileExistsError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(2)
  records = []
  for i, layout in enumerate(layouts):
    print(f"[{i + 1}/{len(layouts)}] {layout.label()}: compiling and running"
          f" {_STEPS.value} steps", flush=True)
    try:
      r = measure(config, layout, _STEPS.value)
    except ValueError as e:
      print(f"  skipped: {e}", flush=True)
      continue
    records.append(r)
    print(f"  step {r['step_s']:.4g} s, {r['tokens_per_s_per_chip']:.4g}"
          " tokens/s/chip", flush=True)
  if not records:
    print("ERROR: no layout ran", file=sys.stderr)
    sys.exit(1)
  paths = write(records, _OUT.value, _OVERWRITE.value)
  if jax.process_index() == 0:
    print(markdown(records))
    print("outputs: " + ", ".join(paths))


if __name__ == "__main__":
  # deferred: the --config flag exists only when run as a program.
  from ml_collections import config_flags as _cf  # pylint: disable=g-import-not-at-top
  _cf.DEFINE_config_file("config", None,
                         "Experiment config file (configs/*.py[:arg]).",
                         lock_config=True)
  flags.mark_flags_as_required(["config", "layouts"])
  app.run(main)
