r"""Ahead-of-time fit and communication report for TPU topologies, on a CPU.

Compiles the real train step (optconsist_jax.train_step) for a Cloud TPU
topology without a TPU: `jax.experimental.topologies.get_topology_desc` with
libtpu (`pip install -c constraints.txt libtpu`, the `test` extra) gives the topology's devices, the
state and batch are ShapeDtypeStructs with shardings (nothing is allocated),
and `jit(...).lower(...).compile()` runs the TPU compiler. From the compiled
executable it reports per-chip HBM (`compiled.memory_analysis()`) against the
chip's capacity and the collectives in the optimized HLO, per step.

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
import gzip
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Any

from optconsist_jax import errors
from optconsist_jax import paths
from optconsist_jax.tools import search
from optconsist_jax.tools import step_time
from optconsist_jax.tools import tpu as tpu_facts

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice as libtpu names it.

  Attributes:
    name: Cloud TPU accelerator type (v5p-8: the number counts TensorCores on
      v4/v5p, chips on v5e/v6e).
    libtpu_name: `<chip>:<shape>` for get_topology_desc.
    chip_config: "megacore" (v4, v5p: one device per chip) or "default".
    chips: number of chips (= JAX devices).
    hbm_gib: HBM per chip.
  """

  name: str
  libtpu_name: str
  chip_config: str
  chips: int
  hbm_gib: float


# Slices and their HBM per chip from the one TPU facts table
# (optconsist_jax.tools.tpu, which cites the Cloud TPU pages).
TOPOLOGIES: dict[str, Topology] = {
    s.name: Topology(s.name, s.libtpu_name, s.chip_config, s.chips,
                     s.chip.hbm_gib)
    for s in tpu_facts.SLICES.values()}


def topology_devices(name: str) -> tuple[list[Any], float | None]:
  """Devices of a TPU topology (or `cpu-N`: N local CPU devices) and HBM GiB."""
  import jax  # pylint: disable=g-import-not-at-top
  if name.startswith("cpu-"):
    n = int(name.split("-", 1)[1])
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(
          f"topology {name!r}: only {len(devices)} CPU devices; set XLA_FLAGS="
          f"--xla_force_host_platform_device_count={n}")
    return devices[:n], None
  parsed = tpu_facts.parse_topology(name)
  if parsed is None or parsed[1].name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)}"
                     ", NxTOPOLOGY (N slices over DCN) and cpu-N")
  num_slices, name = parsed[0], parsed[1].name
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        "TPU topologies need libtpu: .venv/bin/pip install -c constraints.txt"
        " libtpu")
  # Several libtpu users on one machine (tests, other planners) would fight
  # over /tmp/libtpu_lockfile; compiling needs no exclusive chip access.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # No TPU VM metadata here; name this host so libtpu does not complain.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  t = TOPOLOGIES[name]
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=t.libtpu_name, chip_config_name=t.chip_config,
      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  devices = list(desc.devices)
  if len(devices) != t.chips * num_slices:
    raise RuntimeError(f"topology {name}: libtpu gave {len(devices)} devices,"
                       f" expected {t.chips * num_slices}")
  return devices, t.hbm_gib


# ----------------------------------------------------------------------------
# Collectives in optimized HLO text.

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
                "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_INSTR = re.compile(
    r"^\s+(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")


def _type_bytes(type_str: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(type_str):
    size = _DTYPE_BYTES.get(dtype, 1)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _kind(opcode: str) -> str | None:
  op = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  if op == "all-reduce-scatter":
    return "reduce-scatter"
  if op == "ragged-all-to-all":
    return "all-to-all"
  return op if op in COLLECTIVE_KINDS else None


def _operands(rest: str) -> list[str]:
  """Names of the operands in `a, b), attrs...` (the text after `op(`)."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    if ch in "({":
      depth += 1
    elif ch in ")}":
      depth -= 1
      if depth == 0:
        end = i
        break
  return re.findall(r"%([\w.\-]+)", rest[:end])


@dataclasses.dataclass
class CollectiveStats:
  """Per kind: number of ops executed per step and their bytes.

  `groups` splits the same ops by the devices they run over:
  {(kind, first replica group as device ids): [count, bytes]}, the group
  empty where the HLO names none (collective-permute: its source-target
  pairs), for the step-time estimate (optconsist_jax.tools.step_time).
  """

  count: dict[str, int]
  bytes: dict[str, float]
  loops_without_trip_count: int
  groups: dict[tuple[str, tuple[int, ...]], list[float]] = dataclasses.field(
      default_factory=dict)
  # Multi-slice: collectives across slices, which XLA emits as megascale
  # `send`s over the data-center network: {kind: [count, bytes per chip]}.
  dcn: dict[str, list[float]] = dataclasses.field(default_factory=dict)

  @property
  def total_bytes(self) -> float:
    return sum(self.bytes.values())


def collectives(hlo_text: str) -> CollectiveStats:
  """Counts collectives in optimized HLO text, weighting loop bodies by trips.

  TPU fuses reduce-scatters into `fusion(..., calls=%all-reduce-scatter...)`;
  such a fusion counts as one reduce-scatter of its operand's size. Async
  `-start` ops count once (their `-done` halves are skipped). TPU's async
  collectives are an `async-collective-start` fusion holding the collective,
  continuation fusions (`calls=%async_collective_fusion...`) and an
  `async-collective-done` fusion that repeat the op as they progress it: only
  the start is counted.
  """
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  types: dict[str, str] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if not line.startswith((" ", "\t", "}")) and line.rstrip().endswith("{"):
      m = _HEADER.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      name, type_str, opcode, rest = m.groups()
      comps[current].append((name, type_str, opcode, rest))
      types[name] = type_str
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  def trip_count(rest: str) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
    if m:
      return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", rest)
    if not cond or cond.group(1) not in comps:
      return None
    consts = [int(m.group(1)) for _, t, op, r in comps[cond.group(1)]
              if op == "constant" and t.startswith(("s32", "s64", "u32"))
              for m in [re.match(r"(-?\d+)\)", r)] if m]
    has_lt = any(op == "compare" and "direction=LT" in r
                 for _, _, op, r in comps[cond.group(1)])
    return consts[0] if has_lt and len(consts) == 1 else None

  count = {k: 0 for k in COLLECTIVE_KINDS}
  nbytes = {k: 0.0 for k in COLLECTIVE_KINDS}
  groups: dict[tuple[str, tuple[int, ...]], list[float]] = {}
  dcn: dict[str, list[float]] = {}
  unknown = [0]

  def add(kind: str, mult: int, size: float, attrs: str, comp: str | None):
    count[kind] += mult
    nbytes[kind] += mult * size
    if comp is not None and "replica_groups=" not in attrs:
      # A fused collective: its replica groups are on the op inside.
      attrs = next((r for _, _, _, r in comps.get(comp, ())
                    if "replica_groups=" in r), attrs)
    key = (kind, step_time.first_replica_group(attrs))
    entry = groups.setdefault(key, [0, 0.0])
    entry[0] += mult
    entry[1] += mult * size

  def visit(comp: str, mult: int, depth: int = 0):
    if depth > 64:
      return
    for name, type_str, opcode, rest in comps.get(comp, ()):
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      if opcode == "fusion" and called and (
          name.startswith("async-collective-done")
          or called.group(1).startswith("async_collective_fusion")):
        continue  # continuations of an async collective counted at its start
      if opcode == "fusion" and called:
        kind = next((_kind(k) for k in ("all-reduce-scatter", *COLLECTIVE_KINDS)
                     if called.group(1).startswith(k)), None)
        if kind:
          size = max(_type_bytes(type_str),
                     sum(_type_bytes(types.get(o, "")) for o in _operands(rest)))
          add(kind, mult, size, rest, called.group(1))
          continue
        visit(called.group(1), mult, depth + 1)
        continue
      if opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        trips = trip_count(rest)
        if trips is None:
          unknown[0] += 1
          trips = 1
        if body:
          visit(body.group(1), mult * trips, depth + 1)
        continue
      if opcode in ("call", "async-start") and called:
        visit(called.group(1), mult, depth + 1)
        continue
      if opcode == "conditional":
        for branch in re.findall(r"%([\w.\-]+)",
                                 rest.split("branch_computations=")[-1]
                                 .split("}")[0]):
          visit(branch, mult, depth + 1)
        continue
      megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', rest)
      if opcode == "send" and megascale:
        entry = dcn.setdefault(megascale.group(1).lower().replace("_", "-"),
                               [0, 0.0])
        entry[0] += mult
        entry[1] += mult * _type_bytes(type_str)
        continue
      kind = _kind(opcode)
      if kind is None:
        continue
      out = _type_bytes(type_str)
      operand = sum(_type_bytes(types.get(o, "")) for o in _operands(rest))
      if opcode.endswith("-start") and type_str.startswith("("):
        out = max(out - operand, 0.0)  # the tuple also holds the operands
      add(kind, mult, max(out, operand), rest, None)

  visit(entry, 1)
  return CollectiveStats(count, nbytes, unknown[0], groups, dcn)


# ----------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """One layout/optimizer/topology to compile.

  Attributes:
    model: model preset name (optconsist_jax.model.preset) or a dict for
      LlamaConfig.from_dict.
    mesh: mesh preset name or a dict for MeshConfig.from_dict.
    topology: a TOPOLOGIES key or cpu-N.
    seq_len: tokens per row.
    global_batch: rows per optimizer step.
    grad_accum_steps: micro-batches per step; None = from per_chip_batch.
    per_chip_batch: rows per chip per micro-batch (used when
      grad_accum_steps is None).
    optimizer: the optimizer preset (`optim.presets.preset(optimizer)`):
      adamw, muon, muon_gspmd (Muon with the gspmd Newton-Schulz strategy),
      muon_contrib (optax.contrib.muon on the hidden matrices), lora (AdamW
      on LoRA adapters, base frozen), or any optimizer name (an Optax name,
      `pkg.module:function`) on every parameter; also the report's label.
    lora_rank: LoRA rank (alpha = 2 x rank).
    param_dtype: parameter (and optimizer state) dtype; None keeps the
      model config's.
    dtype: compute dtype; None keeps the model config's.
    remat_policy: LlamaConfig.remat_policy; None keeps the model config's.
    scan_layers: LlamaConfig.scan_layers; None keeps the model config's.
    attention_impl: LlamaConfig.attention_impl (e.g. splash, the TPU Pallas
      kernel a TPU run would use); None keeps the model config's.
    optim_config: an OptimConfig (or dict) used instead of the preset
      (`optimizer` is then only the label).
    lora_config: a LoRAConfig (or dict); given, the run is LoRA.
  """

  model: Any = "llama2_7b"
  mesh: Any = "fsdp"
  topology: str = "v5p-8"
  seq_len: int = 1024
  global_batch: int = 768
  grad_accum_steps: int | None = None
  per_chip_batch: int = 4
  optimizer: str = "adamw"
  lora_rank: int = 16
  param_dtype: str | None = "float32"
  dtype: str | None = "bfloat16"
  remat_policy: str | None = "full"
  scan_layers: bool | None = True
  attention_impl: str | None = None
  optim_config: Any = None
  lora_config: Any = None


@dataclasses.dataclass
class PlanResult:
  spec: PlanSpec
  mesh_shape: dict[str, int]
  grad_accum_steps: int
  hbm_gib: float | None
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  peak_bytes: int
  fits: bool | None
  collectives: CollectiveStats | None  # None: the compiler ran out of HBM
  compile_seconds: float
  trainable_params: int
  error: str | None = None
  # Torus coordinates (+ slice index) of each logical device (TPU only).
  device_coords: list[tuple[int, ...]] | None = None

  def row(self) -> dict[str, Any]:
    s = self.spec
    return {
        "topology": s.topology, "mesh": _mesh_label(s.mesh, self.mesh_shape),
        "optimizer": s.optimizer, "accum": self.grad_accum_steps,
        "args_gib": self.argument_bytes / GIB,
        "temp_gib": self.temp_bytes / GIB, "peak_gib": self.peak_bytes / GIB,
        "hbm_gib": self.hbm_gib, "fits": self.fits,
        **{f"{k}_gib": (None if self.collectives is None
                        else self.collectives.bytes[k] / GIB)
           for k in COLLECTIVE_KINDS},
        "collective_gib": (None if self.collectives is None
                           else self.collectives.total_bytes / GIB),
        "compile_s": self.compile_seconds,
    }


def _mesh_label(mesh: Any, shape: dict[str, int]) -> str:
  name = mesh if isinstance(mesh, str) else mesh.get("preset", "custom")
  return f"{name} {shape['data']}x{shape['fsdp']}x{shape['tensor']}"


def _model_config(spec: PlanSpec):
  from optconsist_jax.model import LlamaConfig, preset  # pylint: disable=g-import-not-at-top
  cfg = (preset(spec.model) if isinstance(spec.model, str)
         else LlamaConfig.from_dict(dict(spec.model)))
  overrides = {k: getattr(spec, k) for k in ("param_dtype", "dtype",
                                             "remat_policy", "scan_layers",
                                             "attention_impl")
               if getattr(spec, k) is not None}
  return cfg.replace(**overrides)


def _mesh_config(spec: PlanSpec):
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  if isinstance(spec.mesh, str):
    return sharding.MeshConfig.preset(spec.mesh)
  return sharding.MeshConfig.from_dict(dict(spec.mesh))


def _optimizer(spec: PlanSpec, model_config, mesh, rules):
  """(tx, trainable filter, model_transform) for the spec's optim config.

  The optim config is `spec.optim_config`, else the preset
  `optim.presets.preset(spec.optimizer)`; schedules of the run's length
  (total_steps 0) get a stand-in length, which compiles alike. LoRA adapters
  (`spec.lora_config`, or rank `spec.lora_rank` for the `lora` preset) are
  added as train.py adds them.
  """
  from optconsist_jax import optim  # pylint: disable=g-import-not-at-top
  from optconsist_jax import train_step  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import lora  # pylint: disable=g-import-not-at-top
  optim_config = (optim.presets.preset(spec.optimizer)
                  if spec.optim_config is None
                  else optim.OptimConfig.from_dict(spec.optim_config))
  optim_config = optim_config.resolve_total_steps(1000)
  lora_config = spec.lora_config
  if lora_config is None and spec.optimizer == "lora":
    lora_config = lora.LoRAConfig(rank=spec.lora_rank,
                                  alpha=2.0 * spec.lora_rank)
  trainable, transform = train_step.lora_pieces(lora_config, seed=1)
  params = train_step.abstract_params(model_config, mesh, rules,
                                      trainable=trainable,
                                      model_transform=transform)
  return optim.build(optim_config, params, mesh=mesh), trainable, transform


def plan(spec: PlanSpec, hlo_path: str | None = None) -> PlanResult:
  """Compiles the train step for `spec` and measures it.

  Args:
    spec: what to compile.
    hlo_path: if set, the optimized HLO text is written there (gzip when the
      name ends in .gz), to re-count or inspect collectives later.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax import train_step  # pylint: disable=g-import-not-at-top

  devices, hbm_gib = topology_devices(spec.topology)
  mesh_config = _mesh_config(spec)
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = mesh_config.rules
  model_config = _model_config(spec)
  batch_shards = sharding.axes_size(
      mesh, sharding.logical_to_spec(("act_batch",), rules)[0])
  accum = spec.grad_accum_steps
  if accum is None:
    micro = spec.per_chip_batch * len(devices)
    if spec.global_batch % micro:
      raise ValueError(
          f"global_batch={spec.global_batch} is not a multiple of"
          f" per_chip_batch x chips = {micro}")
    accum = spec.global_batch // micro
  if spec.global_batch % accum or (spec.global_batch // accum) % batch_shards:
    raise ValueError(
        f"global_batch={spec.global_batch} / grad_accum_steps={accum} must be a"
        f" multiple of the {batch_shards} batch shards")

  tx, trainable, transform = _optimizer(spec, model_config, mesh, rules)
  graphdef, state, shardings = train_step.create_train_state(
      model_config, tx, mesh, rules, trainable=trainable,
      model_transform=transform, abstract=True)
  step = train_step.make_train_step(graphdef, tx, mesh=mesh, rules=rules,
                                    state_shardings=shardings,
                                    grad_accum_steps=accum)
  batch = train_step.abstract_batch(spec.global_batch, spec.seq_len, mesh,
                                    rules)
  trainable_params = sum(x.size for x in jax.tree.leaves(state.params))
  start = time.perf_counter()
  try:
    compiled = step.lower(state, batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = _parse_oom(str(e))
    if oom is None:
      raise
    # The TPU compiler refuses programs that do not fit; report what it said.
    args = int(sum(_shard_bytes(x) for x in jax.tree.leaves((state, batch))))
    return PlanResult(
        spec=spec, mesh_shape=dict(mesh.shape), grad_accum_steps=accum,
        hbm_gib=hbm_gib, argument_bytes=args, output_bytes=0, alias_bytes=0,
        temp_bytes=int(oom), peak_bytes=int(args + oom), fits=False,
        collectives=None, compile_seconds=time.perf_counter() - start,
        trainable_params=trainable_params, error=str(e).splitlines()[0][:300])
  seconds = time.perf_counter() - start
  hlo_text = compiled.as_text()
  if hlo_path:
    opener = gzip.open if hlo_path.endswith(".gz") else open
    with opener(hlo_path, "wt") as f:
      f.write(hlo_text)
  coords = None
  parsed = tpu_facts.parse_topology(spec.topology)
  if parsed is not None:
    dims = len(parsed[1].shape)
    coords = [tuple(d.coords[:dims]) + (getattr(d, "slice_index", 0) or 0,)
              for d in mesh.devices.flat]
  mem = compiled.memory_analysis()
  args = int(mem.argument_size_in_bytes)
  out = int(mem.output_size_in_bytes)
  alias = int(mem.alias_size_in_bytes)
  temp = int(mem.temp_size_in_bytes)
  peak = args + out - alias + temp
  fits = None if hbm_gib is None else peak <= hbm_gib * GIB
  return PlanResult(
      spec=spec, mesh_shape=dict(mesh.shape), grad_accum_steps=accum,
      hbm_gib=hbm_gib, argument_bytes=args, output_bytes=out,
      alias_bytes=alias, temp_bytes=temp, peak_bytes=peak, fits=fits,
      collectives=collectives(hlo_text), compile_seconds=seconds,
      trainable_params=trainable_params, device_coords=coords)


def step_estimate(r: PlanResult,
                  assumptions: step_time.Assumptions | None = None
                  ) -> step_time.StepEstimate | None:
  """Roofline step time of a compiled plan (None: not a TPU slice or OOM)."""
  parsed = tpu_facts.parse_topology(r.spec.topology)
  if r.collectives is None or parsed is None:
    return None
  lora = r.spec.optimizer == "lora" or r.spec.lora_config is not None
  return step_time.estimate(
      _model_config(r.spec), seq_len=r.spec.seq_len,
      global_batch=r.spec.global_batch, collectives=r.collectives,
      tpu=parsed[1], device_coords=r.device_coords,
      trainable_fraction=0.0 if lora else 1.0,
      assumptions=assumptions or step_time.Assumptions())


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_oom(message: str) -> float | None:
  """Bytes of temporaries from the TPU compiler's out-of-memory error."""
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message:
    return None
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])", message)
  if m is None:
    m = re.search(r"requires? ([\d.]+)([KMGT])", message)
  return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def _shard_bytes(x) -> float:
  """Bytes of one device's shard of a ShapeDtypeStruct with a sharding."""
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return math.prod(shape) * x.dtype.itemsize


def plan_from_config(config: Any, topology: str | None = None,
                     **overrides) -> PlanResult:
  """Plans the run a training config (configs/*.py get_config()) describes."""
  return plan(spec_from_config(config, topology, **overrides))


def spec_from_config(config: Any, topology: str | None = None,
                     **overrides) -> PlanSpec:
  """The PlanSpec of a training config (configs/*.py get_config()).

  Reads config.model (LlamaConfig dict), config.mesh (MeshConfig dict),
  config.optim (OptimConfig dict), config.lora (present: a LoRA run),
  config.data.seq_len, config.data.global_batch_size and
  config.train.grad_accum_steps; the model's own dtypes and remat policy are
  kept. `overrides` replace PlanSpec fields (e.g. grad_accum_steps).
  """
  def get(path, default=None):
    cur = config
    for part in path.split("."):
      if cur is None:
        return default
      cur = cur.get(part) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur

  def plain(x):
    return x.to_dict() if hasattr(x, "to_dict") else x

  from optconsist_jax import optim  # pylint: disable=g-import-not-at-top
  d = PlanSpec()
  lora_config = plain(get("lora"))
  optim_config = plain(get("optim"))
  label = d.optimizer
  if optim_config:
    optim_config = optim.OptimConfig.from_dict(optim_config)
    label = optim_config.label()
  spec = PlanSpec(
      model=plain(get("model", d.model)),
      mesh=plain(get("mesh", d.mesh)),
      topology=topology or d.topology,
      seq_len=int(get("data.seq_len", d.seq_len)),
      global_batch=int(get("data.global_batch_size", d.global_batch)),
      grad_accum_steps=int(get("train.grad_accum_steps", 1)),
      optimizer="lora" if lora_config else label,
      param_dtype=None, dtype=None, remat_policy=None, scan_layers=None,
      optim_config=optim_config, lora_config=lora_config)
  return dataclasses.replace(spec, **overrides)


# ----------------------------------------------------------------------------
# Output.


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}"


def _human(n: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def markdown_table(results: Sequence[PlanResult]) -> str:
  """One row per plan: HBM per chip, fit, and collective GiB per step."""
  head = ("| topology | mesh (data x fsdp x tensor) | optimizer | grad accum |"
          " args GiB | temp GiB | peak GiB | HBM GiB | fits |"
          " all-gather GiB | reduce-scatter GiB | all-reduce GiB |"
          " all-to-all GiB | coll.-permute GiB | collectives GiB/step |")
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in results:
    row = r.row()
    fits = {True: "yes", False: "**no**", None: "n/a"}[row["fits"]]
    lines.append(
        f"| {row['topology']} | {row['mesh']} | {row['optimizer']} |"
        f" {row['accum']} | {_gib(row['args_gib'])} | {_gib(row['temp_gib'])} |"
        f" {_gib(row['peak_gib'])} | {_gib(row['hbm_gib'])} | {fits} | "
        + " | ".join(_gib(row[f"{k}_gib"]) for k in COLLECTIVE_KINDS)
        + f" | {_gib(row['collective_gib'])} |")
  return "\n".join(lines)


def report(r: PlanResult) -> str:
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
  ]
  if c is None:
    lines.append(f"the TPU compiler ran out of HBM (temporaries from its"
                 f" message; arguments computed): {r.error}")
    return "\n".join(lines)
  lines.append("collectives per step (count, bytes of the full tensors):")
  for k in COLLECTIVE_KINDS:
    lines.append(f"  {k:20s} {c.count[k]:8d} {_human(c.bytes[k]):>12s}")
  for k, (n, b) in c.dcn.items():
    lines.append(f"  {'DCN ' + k:20s} {n:8.0f} {_human(b):>12s} per chip")
  if c.loops_without_trip_count:
    lines.append(f"  ({c.loops_without_trip_count} while loops had no trip"
                 " count; their collectives are counted once)")
  est = step_estimate(r)
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


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m optconsist_jax.tools.plan", description=__doc__.split("\n")[0])
  p.add_argument("--config", help="configs/*.py with get_config(arg):"
                 " FILE or FILE:ARG; plans that run (with --topology,"
                 " optionally --grad_accum_steps)")
  p.add_argument("--model", default="llama2_7b", help="model preset")
  p.add_argument("--mesh", default="fsdp",
                 help="mesh preset(s), comma-separated")
  p.add_argument("--mesh_shape", default=None,
                 help="data,fsdp,tensor sizes (one may be -1), overriding the"
                 " preset's")
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
    overrides = ({} if args.grad_accum_steps is None else
                 {"grad_accum_steps": args.grad_accum_steps})
    if args.attention:
      overrides["attention_impl"] = args.attention
    results = []
    for t in _csv(args.topology):
      hlo = (os.path.join(args.hlo_dir, f"{t}_config.hlo.gz")
             if args.hlo_dir else None)
      results.append(plan(spec_from_config(config, t, **overrides),
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
    combos = list(itertools.product(_csv(args.topology), _csv(args.mesh),
                                    _csv(args.optimizer)))
    if not args.compare:
      combos = combos[:1]
    for topology, mesh, optimizer in combos:
      mesh_spec = ({"preset": mesh, **mesh_override} if mesh_override
                   else mesh)
      specs.append(PlanSpec(
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
        r = plan(s, hlo_path=hlo)
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
        f.write(json.dumps({**r.row(), "collective_counts": counts}) + "\n")
  return 0


if __name__ == "__main__":
  errors.run(main, absl=False)
