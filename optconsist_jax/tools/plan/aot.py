"""Ahead-of-time compile of the real train step for a TPU topology, on a CPU.

`plan(PlanSpec(...))` compiles optconsist_jax.train.step for a Cloud TPU
topology without a TPU: `jax.experimental.topologies.get_topology_desc` with
libtpu (`pip install -c constraints.txt libtpu`, the `test` extra) gives the
topology's devices, the state and batch are ShapeDtypeStructs with shardings
(nothing is allocated), and `jit(...).lower(...).compile()` runs the TPU
compiler. The PlanResult holds per-chip HBM (`compiled.memory_analysis()`)
against the chip's capacity and the collectives of the optimized HLO per step
(optconsist_jax.tools.plan.hlo_stats). The command line is
optconsist_jax.tools.plan.

Peak HBM is estimated as arguments + outputs - aliased (donated) + temporaries,
the same accounting XLA uses for its own out-of-memory check. The topology
"cpu-N" compiles for N local CPU devices instead (tests).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import re
import time
from typing import Any

from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import step_time
from optconsist_jax.platforms import tpu as tpu_facts

GIB = 1024**3
# A replicated optimizer-state leaf larger than this per chip is flagged.
REPLICATED_WARN_BYTES = 64 * 2**20


def topology_devices(name: str) -> tuple[list[Any], float | None]:
  """Devices of a TPU topology (or `cpu-N`: N local CPU devices) and HBM GiB."""
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
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
  if parsed is None:
    raise ValueError(f"unknown topology {name!r}; known:"
                     f" {sorted(tpu_facts.SLICES)}, NxTOPOLOGY (N slices over"
                     " DCN) and cpu-N")
  num_slices, t = parsed
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        "TPU topologies need libtpu: .venv/bin/pip install -c constraints.txt"
        " libtpu")
  # Several libtpu users on one machine (tests, other planners) would fight
  # over /tmp/libtpu_lockfile; compiling needs no exclusive chip access.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # No TPU VM metadata here; name this host so libtpu does not complain.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # deferred: jax, after the libtpu environment above.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=t.libtpu_name, chip_config_name=t.chip_config,
      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  devices = list(desc.devices)
  if len(devices) != t.chips * num_slices:
    raise RuntimeError(f"topology {t.name}: libtpu gave {len(devices)} devices,"
                       f" expected {t.chips * num_slices}")
  return devices, t.chip.hbm_gib


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """One layout/optimizer/topology to compile.

  Attributes:
    model: model preset name of either family (model/architecture.py:
      llama2_7b, moonlight_16b_a3b, ...), a dict for
      architecture.config_from_dict, or a LlamaConfig / DeepseekV3Config.
    mesh: mesh preset name, a dict for MeshConfig.from_dict or a MeshConfig.
    topology: a TPU slice (tools/tpu.py SLICES, optionally Nx for N slices)
      or cpu-N.
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
    remat_policy: the model config's remat_policy; None keeps it.
    scan_layers: the model config's scan_layers; None keeps it.
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
  collectives: hlo_stats.CollectiveStats | None  # None: the compiler ran out of HBM
  compile_seconds: float
  trainable_params: int
  error: str | None = None
  # Torus coordinates (+ slice index) of each logical device (TPU only).
  device_coords: list[tuple[int, ...]] | None = None
  # Optimizer-state bytes per chip, and (path, bytes per chip) of each
  # replicated optimizer-state leaf over REPLICATED_WARN_BYTES.
  opt_state_bytes: int = 0
  replicated_opt_leaves: list[tuple[str, int]] = dataclasses.field(
      default_factory=list)
  # The optimizer update's per-chip work (step_time.optimizer_work).
  optimizer_work: step_time.OptimizerWork | None = None

  def row(self) -> dict[str, Any]:
    s = self.spec
    return {
        "topology": s.topology, "mesh": _mesh_label(s.mesh, self.mesh_shape),
        "optimizer": s.optimizer, "accum": self.grad_accum_steps,
        "args_gib": self.argument_bytes / GIB,
        "temp_gib": self.temp_bytes / GIB, "peak_gib": self.peak_bytes / GIB,
        "hbm_gib": self.hbm_gib, "fits": self.fits,
        "opt_state_gib": self.opt_state_bytes / GIB,
        "replicated_opt_leaves": [list(x) for x in self.replicated_opt_leaves],
        **{f"{k}_gib": (None if self.collectives is None
                        else self.collectives.bytes[k] / GIB)
           for k in hlo_stats.COLLECTIVE_KINDS},
        "collective_gib": (None if self.collectives is None
                           else self.collectives.total_bytes / GIB),
        "compile_s": self.compile_seconds,
    }


def opt_state_per_chip(opt_state: Any, mesh_size: int
                       ) -> tuple[int, list[tuple[str, int]]]:
  """(bytes per chip, replicated leaves over REPLICATED_WARN_BYTES).

  `opt_state`: ShapeDtypeStructs carrying their shardings. A leaf counts as
  replicated when its sharding keeps it whole on every chip of a mesh of
  more than one chip.
  """
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.sharding import path_name  # pylint: disable=g-import-not-at-top
  total, flagged = 0, []
  for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    b = int(_shard_bytes(x))
    total += b
    if (mesh_size > 1 and b > REPLICATED_WARN_BYTES
        and x.sharding.is_fully_replicated):
      flagged.append((path_name(path), b))
  return total, flagged


def _mesh_label(mesh: Any, shape: dict[str, int]) -> str:
  """'fsdp 1x8x1', with extra rules: 'dp_fsdp 2x4x1 expert=data'."""
  rules = ()
  if isinstance(mesh, str):
    name = mesh
  elif isinstance(mesh, dict):
    name = mesh.get("preset", "custom")
    rules = mesh.get("extra_rules") or ()
  else:
    name = "config"
    rules = getattr(mesh, "extra_rules", ())
  extra = "".join(
      f" {n}={'+'.join(a) if isinstance(a, (tuple, list)) else a}"
      for n, a in rules)
  return f"{name} {shape['data']}x{shape['fsdp']}x{shape['tensor']}{extra}"


def model_config(spec: PlanSpec):
  """The model config a spec compiles (its dtype/remat overrides applied).

  A preset name of either family (model/architecture.py: `llama2_7b`,
  `moonlight_16b_a3b`, ...), a dict (`architecture.config_from_dict`: a
  LlamaConfig's or a DeepseekV3Config's keys) or a config object.
  """
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.model import architecture  # pylint: disable=g-import-not-at-top
  if isinstance(spec.model, str):
    cfg = architecture.preset(spec.model)
  elif isinstance(spec.model, dict):
    cfg = architecture.config_from_dict(spec.model)
  else:
    cfg = spec.model
  overrides = {k: getattr(spec, k) for k in ("param_dtype", "dtype",
                                             "remat_policy", "scan_layers",
                                             "attention_impl")
               if getattr(spec, k) is not None}
  return cfg.replace(**overrides)


# The name before DeepSeek-V3 configs were planned (bench/plan_calibration.py).
llama_config = model_config


def _mesh_config(spec: PlanSpec):
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  if isinstance(spec.mesh, sharding.MeshConfig):
    return spec.mesh
  if isinstance(spec.mesh, str):
    return sharding.MeshConfig.preset(spec.mesh)
  return sharding.MeshConfig.from_dict(dict(spec.mesh))


def _optim_config(spec: PlanSpec):
  """The spec's OptimConfig (its preset unless `optim_config` is given)."""
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax import optim  # pylint: disable=g-import-not-at-top
  optim_config = (optim.presets.preset(spec.optimizer)
                  if spec.optim_config is None
                  else optim.OptimConfig.from_dict(spec.optim_config))
  return optim_config.resolve_total_steps(1000)


def _state_builder(spec: PlanSpec, config, mesh, rules):
  """(tx, state.StateBuilder) for the spec's optim config.

  The optim config is `spec.optim_config`, else the preset
  `optim.presets.preset(spec.optimizer)`; schedules of the run's length
  (total_steps 0) get a stand-in length, which compiles alike. LoRA adapters
  (`spec.lora_config`, or rank `spec.lora_rank` for the `lora` preset) are
  added as the trainer adds them.
  """
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax import optim  # pylint: disable=g-import-not-at-top
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.model import lora  # pylint: disable=g-import-not-at-top
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  optim_config = _optim_config(spec)
  lora_config = spec.lora_config
  if lora_config is None and spec.optimizer == "lora":
    lora_config = lora.LoRAConfig(rank=spec.lora_rank,
                                  alpha=2.0 * spec.lora_rank)
  trainable, transform = state_lib.lora_pieces(lora_config, seed=1)
  builder = state_lib.StateBuilder(config, mesh, rules,
                                   trainable=trainable, transform=transform)
  return optim.build(optim_config, builder.abstract_params, mesh=mesh), builder


def plan(spec: PlanSpec, hlo_path: str | None = None) -> PlanResult:
  """Compiles the train step for `spec` and measures it.

  Args:
    spec: what to compile.
    hlo_path: if set, the optimized HLO text is written there (gzip when the
      name ends in .gz), to re-count or inspect collectives later.
  """
  # deferred: jax, which the plan CLI configures first (XLA_FLAGS).
  import jax  # pylint: disable=g-import-not-at-top
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.train import step as train_step  # pylint: disable=g-import-not-at-top

  devices, hbm_gib = topology_devices(spec.topology)
  mesh_config = _mesh_config(spec)
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = mesh_config.rules
  config = model_config(spec)
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

  tx, builder = _state_builder(spec, config, mesh, rules)
  state, shardings = builder.abstract_state(tx)
  step = train_step.make_train_step(
      builder.graphdef, tx, mesh=mesh, rules=rules, state_shardings=shardings,
      grad_accum_steps=accum)
  batch = train_step.abstract_batch(spec.global_batch, spec.seq_len, mesh,
                                    rules)
  trainable_params = sum(x.size for x in jax.tree.leaves(state.params))
  opt_bytes, replicated = opt_state_per_chip(state.opt_state, mesh.size)
  opt = dict(opt_state_bytes=opt_bytes, replicated_opt_leaves=replicated,
             optimizer_work=step_time.optimizer_work(
                 _optim_config(spec), state.params, state.opt_state))
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
        trainable_params=trainable_params, error=str(e).splitlines()[0][:300],
        **opt)
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
      collectives=hlo_stats.collectives(hlo_text), compile_seconds=seconds,
      trainable_params=trainable_params, device_coords=coords, **opt)


def step_estimate(r: PlanResult,
                  assumptions: step_time.Assumptions | None = None
                  ) -> step_time.StepEstimate | None:
  """Roofline step time of a compiled plan (None: not a TPU slice or OOM)."""
  parsed = tpu_facts.parse_topology(r.spec.topology)
  if r.collectives is None or parsed is None:
    return None
  lora = r.spec.optimizer == "lora" or r.spec.lora_config is not None
  return step_time.estimate(
      model_config(r.spec), seq_len=r.spec.seq_len,
      global_batch=r.spec.global_batch, collectives=r.collectives,
      tpu=parsed[1], device_coords=r.device_coords,
      trainable_fraction=0.0 if lora else 1.0, optimizer=r.optimizer_work,
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


_shard_bytes = step_time.shard_bytes


def spec_from_config(config: Any, topology: str | None = None,
                     **overrides) -> PlanSpec:
  """The PlanSpec of a training config (configs/*.py get_config()).

  `config` is an ExperimentConfig or what `ExperimentConfig.from_dict`
  reads (a ConfigDict or dict): its model, mesh, optim, lora, data.seq_len,
  data.global_batch_size and train.grad_accum_steps; the model's own dtypes
  and remat policy are kept. `overrides` replace PlanSpec fields (e.g.
  grad_accum_steps).
  """
  # deferred: imports jax, which the plan CLI configures first.
  from optconsist_jax.train import config as config_types  # pylint: disable=g-import-not-at-top
  if not isinstance(config, config_types.ExperimentConfig):
    config = config_types.ExperimentConfig.from_dict(
        config.to_dict() if hasattr(config, "to_dict") else config)
  spec = PlanSpec(
      model=config.model, mesh=config.mesh,
      topology=topology or PlanSpec.topology,
      seq_len=config.data.seq_len,
      global_batch=config.data.global_batch_size,
      grad_accum_steps=config.train.grad_accum_steps,
      optimizer="lora" if config.lora else config.optim.label(),
      param_dtype=None, dtype=None, remat_policy=None, scan_layers=None,
      optim_config=config.optim, lora_config=config.lora)
  return dataclasses.replace(spec, **overrides)


