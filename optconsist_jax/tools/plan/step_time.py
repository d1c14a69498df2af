"""Roofline estimate of a training step's time from its flops and collectives.

Compute: the step's flops over the chips' peak. The flops are analytic:
6 x matmul params x tokens plus the attention score/value products (PaLM's
MFU accounting, Chowdhery et al. 2022, appendix B; `LlamaConfig.
flops_per_token`), plus what rematerialization recomputes in the backward
pass (the block forward but its down projection for `full`, the attention
products for
`dots_no_batch`, nothing for `dots`/`none`). For a mixture of experts
(`DeepseekV3Config.flops_per_token`) the matmul params are the activated
ones, as DeepSeek-V3 (arXiv 2412.19437, sec. 1 and 3.4) counts its 37B of
671B: the router, the top-k routed and the shared experts, attention, the
head; MLA's score/value products use the query/key width (nope + rope) and
the value width. A test checks the total against XLA's own count
(`compiled.cost_analysis()`) on unrolled small models (a Llama, and a
DeepSeek-V3 whose every expert is active, so the dense expert reference
computes exactly the activated work).

Communication: every collective of the compiled step (counted by
`optconsist_jax.tools.plan.hlo_stats.collectives` with loop trip counts, and split
by the devices each runs over) costs the ring-algorithm time over the ICI
links of the torus axes its replica group spans ("How to Scale Your Model",
part 3 "Sharded matrices"): with B the bytes of the full tensor and n chips in
the group,

  all-gather, reduce-scatter   (n - 1) / n * B / W
  all-reduce                   2 * (n - 1) / n * B / W
  all-to-all                   (n - 1) / n * B * max(1, n / 4) / W
  collective-permute           B / link   (one link, one direction)

where W = sum over the spanned torus axes of link x (2 with wraparound, 1
without: a ring on an open line uses each link once each way). Across slices
XLA emits megascale transfers (`send`s over the data-center network) of each
chip's part b: a ring over the s slices, (s - 1) / s (twice for all-reduce)
x b / DCN bandwidth. (A replica group that itself spans slices is costed
hierarchically the same way, with b = B / chips of the group per slice.)

Assumptions (printed with every estimate): matmuls reach `mxu_efficiency` of
the peak, links `ici_efficiency` of their bandwidth; `overlap` of the shorter
of compute and communication hides under the longer (XLA's async
collectives overlap FSDP gathers with the layer compute; 1 = step time is
the maximum of the two, 0 = their sum). Elementwise work of the model and
per-op latency are not modelled.

Optimizer update (`OptimizerWork`, from the plan's state): it runs once per
step, after gradient accumulation, when no layer compute is left to hide it
under, so its time is added to the overlapped compute/communication time:

  matmuls      the busiest chip's optimizer matmul flops at `mxu_efficiency`
               of the bf16 peak. Muon (`stacked`): ns_steps x (4 m m n +
               2 m m m) per m x n (m <= n) matrix the chip orthogonalizes in
               `optim.muon.stacked_plan` (the same for every coefficient
               schedule: each step is X X^T, A A, (bA + cAA) X; `gspmd`:
               the total over the chips, a lower bound). float32
               NS iterates run at JAX's DEFAULT matmul precision, which on
               TPU "performs float32 computations in bfloat16" (one pass;
               HIGH takes 3 bf16 passes, HIGHEST 6: `jax.lax.Precision`),
               so `ns_matmul_passes` = 1. PSGD Kron: preconditioning and
               preconditioner-update matmuls at psgdax's precisions
               (tools/plan/kron_flops.py). AdamW, Lion, Adafactor: none.
  HBM          a floor: every parameter and state leaf read and written
               once, every gradient read once (twice with global-norm
               clipping, whose norm must be complete before any update),
               per chip, over the chip's HBM bandwidth.
  all-to-all   Muon's stacked all-to-alls (the update's only large
               collectives): slots x m x n float32 per chip and group, each
               way, costed as above and moved out of the overlapped
               communication into the serial optimizer time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from optconsist_jax.platforms import tpu as tpu_facts
from optconsist_jax.tools.plan import kron_flops

# Defaults of the assumptions; bench/results/plan_calibration.md compares the
# estimate with published MaxText MFU at these values.
MXU_EFFICIENCY = 0.85
ICI_EFFICIENCY = 0.8
OVERLAP = 1.0
# MetaMathQA (395K examples) packed, as bench/tpu_fit.py counts it.
EPOCH_TOKENS = 103e6


# ----------------------------------------------------------------------------
# Flops.


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Flops of one optimizer step over all chips.

  Attributes:
    model: forward + backward (6ND + attention): the MFU numerator.
    recompute: what remat recomputes on top.
  """

  model: float
  recompute: float

  @property
  def total(self) -> float:
    return self.model + self.recompute


def recompute_flops_per_token(model_config, seq_len: int) -> float:
  """Flops per token that the remat policy recomputes in the backward pass.

  From the config's own training count (`flops_per_token`, 6 x matmul params
  a token goes through + 3 x the attention products' forward), so a mixture
  of experts recomputes only its activated experts: the attention products'
  forward is (flops_per_token(T) - flops_per_token(0)) / 3, the block
  matmuls flops_per_token(0) / 6 less the head.
  """
  c = model_config
  attention_fwd = (c.flops_per_token(seq_len) - c.flops_per_token(0)) / 3
  block_matmul = c.flops_per_token(0) / 6 - c.hidden_size * c.vocab_size
  # Full remat re-runs the block forward except its last matmul (down
  # projection): the backward needs that matmul's input, not its output.
  down = c.hidden_size * _unweighted_down_width(c)
  return {"none": 0.0, "dots": 0.0, "dots_no_batch": float(attention_fwd),
          "full": 2.0 * (block_matmul - down) + attention_fwd}[c.remat_policy]


def _unweighted_down_width(c) -> int:
  """Sum over layers of the down projections' input width whose output the
  backward pass does not need.

  A dense layer's intermediate_size; in a DeepSeek-V3 MoE layer the shared
  experts' n_shared_experts x moe_intermediate_size only: a routed expert's
  output is multiplied by its routing weight, whose gradient needs that
  output, so full remat recomputes the routed down projections too (a Llama
  config has no MoE layers).
  """
  moe_layers = getattr(c, "num_moe_layers", 0)
  width = (c.num_layers - moe_layers) * c.intermediate_size
  if moe_layers:
    width += moe_layers * c.n_shared_experts * c.moe_intermediate_size
  return width


def step_flops(model_config, seq_len: int, global_batch: int,
               trainable_fraction: float = 1.0) -> StepFlops:
  """Analytic flops of one step of `global_batch` rows of `seq_len` tokens.

  `trainable_fraction` < 1 (LoRA: frozen base) drops the weight-gradient
  matmuls of frozen weights: 2/3 of the matmul work remains (forward and
  input gradients), as bench/tpu_fit.py counts LoRA.
  """
  tokens = global_batch * seq_len
  model = model_config.flops_per_token(seq_len) * tokens
  if trainable_fraction < 1.0:
    model *= 2.0 / 3.0
  return StepFlops(model, recompute_flops_per_token(model_config, seq_len)
                   * tokens)


# ----------------------------------------------------------------------------
# Communication.


@dataclasses.dataclass(frozen=True)
class Group:
  """Where a replica group lies: chips per torus axis spanned, slices."""

  size: int
  axes: tuple[int, ...]  # torus axes (indices) the group spans
  slices: int


def locate_group(ids: tuple[int, ...], coords: list[tuple[int, ...]] | None,
                 tpu: tpu_facts.TpuSlice, num_devices: int) -> Group:
  """Torus axes and slices a group of logical device ids spans.

  `coords[i]` = (torus coordinates..., slice index) of logical device i
  (the order of the mesh's devices). Without coordinates the group is
  assumed to fill the torus axes in order (what mesh_utils does for one
  mesh axis).
  """
  if not ids:
    ids = tuple(range(num_devices))
  n = len(ids)
  if coords:
    pts = [coords[i] for i in ids]
    dims = len(tpu.shape)
    axes = tuple(a for a in range(dims) if len({p[a] for p in pts}) > 1)
    slices = len({p[dims] for p in pts}) if len(pts[0]) > dims else 1
    return Group(n, axes, slices)
  axes, covered = [], 1
  for a, size in enumerate(tpu.shape):
    if covered >= n:
      break
    if size > 1:
      axes.append(a)
      covered *= size
  return Group(n, tuple(axes), 1)


def collective_seconds(kind: str, nbytes: float, group: Group,
                       tpu: tpu_facts.TpuSlice,
                       ici_efficiency: float = ICI_EFFICIENCY) -> float:
  """Time of collectives moving `nbytes` (full-tensor bytes) over `group`."""
  chip = tpu.chip
  link = chip.ici_link_bytes_per_s * ici_efficiency
  if kind == "collective-permute":
    return nbytes / link
  n = group.size
  if n <= 1:
    return 0.0
  s = max(group.slices, 1)
  n_ici = n // s
  w = sum(link * (2 if tpu.wraps(a) else 1) for a in group.axes) or link
  factor = 2.0 if kind == "all-reduce" else 1.0
  t = 0.0
  if n_ici > 1:
    ring = (n_ici - 1) / n_ici * nbytes / w
    t += ring * (max(1.0, n_ici / 4) if kind == "all-to-all" else factor)
  if s > 1:
    if chip.dcn_bytes_per_s is None:
      raise ValueError(f"no DCN bandwidth for {chip.name} in the TPU table")
    t += factor * (s - 1) / s * nbytes / n_ici / (
        chip.dcn_bytes_per_s * ici_efficiency)
  return t


# ----------------------------------------------------------------------------
# The optimizer update.


@dataclasses.dataclass(frozen=True)
class OptimizerWork:
  """Per-chip work of one optimizer update (module docstring).

  Attributes:
    matmul_flops: the busiest chip's optimizer matmul flops (Muon's NS).
    ns_matmul_dtype: the dtype of those matmuls' inputs (None: no matmuls).
    pass_flops: other matmul flops on the busiest chip, each times the bf16
      passes of the precision its optimizer sets (PSGD Kron, kron_flops.py):
      costed at the bf16 peak as they are, whatever `ns_matmul_passes`.
    hbm_bytes: bytes the update reads and writes per chip, at least.
    all_to_all: (per-chip operand bytes, devices) of each all-to-all the
      update runs, both directions (Muon's stacked groups).
    note: what was counted, for the report.
  """

  matmul_flops: float = 0.0
  ns_matmul_dtype: str | None = None
  pass_flops: float = 0.0
  hbm_bytes: float = 0.0
  all_to_all: tuple[tuple[float, int], ...] = ()
  note: str = ""


def shard_bytes(x) -> int:
  """Bytes of one device's shard of an array or ShapeDtypeStruct (the whole
  array when it has no sharding)."""
  s = getattr(x, "sharding", None)
  shape = s.shard_shape(x.shape) if s is not None else x.shape
  return math.prod(shape) * x.dtype.itemsize


def optimizer_work(optim_config: Any, params: Any, opt_state: Any
                   ) -> OptimizerWork:
  """The update's per-chip work for `params` and their `opt_state`.

  Args:
    optim_config: the OptimConfig (or dict) that built the optimizer.
    params: the trainable params, arrays or ShapeDtypeStructs with their
      NamedShardings (the plan's abstract state).
    opt_state: the optimizer state, likewise.
  """
  # deferred: jax and the optimizers, which the plan CLI configures first.
  import jax  # pylint: disable=g-import-not-at-top
  from optconsist_jax import optim  # pylint: disable=g-import-not-at-top
  from optconsist_jax.optim import muon as muon_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.optim import muon_stacked  # pylint: disable=g-import-not-at-top
  from optconsist_jax.sharding import leaf_shardings, path_name  # pylint: disable=g-import-not-at-top
  c = optim.OptimConfig.from_dict(optim_config)
  param_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(params))
  state_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(opt_state))
  grad_reads = 2 if c.clip_norm else 1
  hbm = 2 * param_bytes + grad_reads * param_bytes + 2 * state_bytes
  notes = [(f"HBM floor: params read+written, grads read x{grad_reads},"
            " state read+written")]
  flops, dtype, a2a, pass_flops = 0.0, None, [], 0.0
  assignment = optim.assign_groups(c, params)
  flat = {path_name(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  shardings = leaf_shardings(params)
  for name, g in c.groups.items():
    leaves = {k: x for k, x in flat.items() if assignment.get(k) == name}
    if not leaves:
      continue
    if g.optimizer in kron_flops.KRON_OPTIMIZERS:
      chips = max([s.mesh.size for k, s in shardings.items()
                   if k in leaves and s is not None] or [1])
      f, note = kron_flops.pass_flops(g.kwargs, leaves, chips)
      pass_flops += f
      notes.append(f"{name}: {note}")
      continue
    if g.optimizer != "muon":
      if "muon" in g.optimizer or "kron" in g.optimizer.lower():
        notes.append(f"{name} ({g.optimizer}): matmuls not counted")
      continue
    kw = g.kwargs
    steps = int(kw.get("ns_steps", 5))
    dtype = str(kw.get("ns_dtype", "float32"))
    sched = kw.get("ns_coefficients") or "quintic"
    sched = sched if isinstance(sched, str) else "custom table"
    meshes = {s.mesh for k, s in shardings.items()
              if k in leaves and s is not None and s.mesh.size > 1}
    if kw.get("strategy", "stacked") != "stacked" or not meshes:
      # gspmd (or one device): the whole work over the chips, a lower bound.
      total = sum(muon_stacked.ns_flops(*x.shape[-2:], steps)
                  * math.prod(x.shape[:-2]) for x in leaves.values())
      chips = max([m.size for m in meshes] or [1])
      flops += total / chips
      notes.append(f"{name}: Muon NS {steps} x {sched} in {dtype},"
                   f" {kw.get('strategy', 'stacked')}: total / {chips} chips")
      continue
    mesh = meshes.pop()
    plan = muon_lib.stacked_plan(
        leaves, {k: shardings[k] for k in leaves}, ns_steps=steps)
    flops += max(plan.device_flops.values())
    itemsize = 4  # the NS input: Muon's float32 momentum direction
    for gp in plan.groups:
      # Whole matrices after the exchange over the axes sharding their dims.
      a2a.append((float(gp.slots * gp.layout.m * gp.layout.n * itemsize),
                  muon_stacked.axes_size(
                      mesh, gp.layout.m_axes + gp.layout.n_axes)))
    notes.append(
        f"{name}: Muon NS {steps} x {sched} in {dtype}, stacked: busiest"
        f" chip {max(plan.device_flops.values()):.3e} flops (max/mean"
        f" {plan.max_over_mean:.3f})")
  return OptimizerWork(matmul_flops=flops, ns_matmul_dtype=dtype,
                       pass_flops=pass_flops, hbm_bytes=float(hbm),
                       all_to_all=tuple(x for x in a2a for _ in range(2)),
                       note="; ".join(notes))


# ----------------------------------------------------------------------------
# The estimate.


@dataclasses.dataclass(frozen=True)
class Assumptions:
  mxu_efficiency: float = MXU_EFFICIENCY
  ici_efficiency: float = ICI_EFFICIENCY
  overlap: float = OVERLAP
  epoch_tokens: float = EPOCH_TOKENS
  # bf16 passes per float32 NS matmul: 1 at JAX's DEFAULT precision on TPU,
  # 3 at HIGH, 6 at HIGHEST (jax.lax.Precision).
  ns_matmul_passes: int = 1

  def describe(self) -> str:
    return (f"assumptions: matmuls at {self.mxu_efficiency:.0%} of peak bf16,"
            f" ICI/DCN links at {self.ici_efficiency:.0%} of their bandwidth,"
            f" {self.overlap:.0%} of the shorter of compute and"
            " communication hidden under the longer; the optimizer update"
            " after them, not hidden: its matmuls (Muon NS, the busiest"
            f" chip's, {self.ns_matmul_passes} bf16 pass(es) per float32"
            " matmul; PSGD Kron's at psgdax's precisions, total / chips),"
            " its HBM floor at the full HBM bandwidth, its"
            " all-to-alls; the model's elementwise work and per-op latency"
            f" not modelled; epoch = {self.epoch_tokens / 1e6:.0f}M tokens")


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  """Roofline step time of one plan."""

  flops: StepFlops
  compute_s: float
  comm_s: dict[str, float]  # per collective kind (overlapped with compute)
  step_s: float
  bound: str  # "compute" or "communication"
  mfu: float  # model flops / (step time x chips x peak): an upper bound
  tokens_per_step: int
  hours_per_epoch: float
  assumptions: Assumptions
  # The optimizer update, serial after the overlapped part: "matmul",
  # "hbm", "all-to-all" seconds.
  optimizer_s: dict[str, float] = dataclasses.field(default_factory=dict)
  optimizer_note: str = ""

  @property
  def comm_total_s(self) -> float:
    return sum(self.comm_s.values())

  @property
  def optimizer_total_s(self) -> float:
    return sum(self.optimizer_s.values())

  def row(self) -> dict[str, Any]:
    return {"compute_s": self.compute_s, "comm_s": self.comm_total_s,
            **{f"{k}_s": v for k, v in self.comm_s.items()},
            "step_s": self.step_s, "bound": self.bound, "mfu": self.mfu,
            "tokens_per_step": self.tokens_per_step,
            "hours_per_epoch": self.hours_per_epoch,
            "model_flops": self.flops.model,
            "recompute_flops": self.flops.recompute,
            "optimizer_s": self.optimizer_total_s,
            **{f"optimizer_{k}_s": v for k, v in self.optimizer_s.items()}}

  def describe(self) -> str:
    comm = ", ".join(f"{k} {v:.3f}" for k, v in self.comm_s.items() if v)
    return "\n".join([
        f"estimated step {self.step_s:.3f} s ({self.bound}-bound): compute"
        f" {self.compute_s:.3f} s ({self.flops.total:.3e} flops, of which"
        f" remat recompute {self.flops.recompute:.3e}), communication"
        f" {self.comm_total_s:.3f} s ({comm or 'none'}), then the optimizer"
        f" update {self.optimizer_total_s:.3f} s ("
        + (", ".join(f"{k} {v:.3f}" for k, v in self.optimizer_s.items())
           or "not modelled") + ")"
        + (f"\n  optimizer: {self.optimizer_note}" if self.optimizer_note
           else ""),
        f"MFU bound {self.mfu:.1%}; {self.tokens_per_step / self.step_s:,.0f}"
        f" tokens/s; {self.hours_per_epoch:.2f} h per epoch",
        self.assumptions.describe()])


def estimate(model_config, *, seq_len: int, global_batch: int,
             collectives: Any, tpu: tpu_facts.TpuSlice,
             device_coords: list[tuple[int, ...]] | None = None,
             trainable_fraction: float = 1.0,
             optimizer: OptimizerWork | None = None,
             assumptions: Assumptions = Assumptions()) -> StepEstimate:
  """Roofline step time from the model and the compiled step's collectives.

  Args:
    model_config: the LlamaConfig compiled (remat_policy included).
    seq_len: tokens per row.
    global_batch: rows per optimizer step.
    collectives: `optconsist_jax.tools.plan.hlo_stats.CollectiveStats` of the step.
    tpu: the slice (one slice; `device_coords` carry slice indices).
    device_coords: torus coordinates (+ slice index) per logical device.
    trainable_fraction: < 1 for LoRA (see step_flops).
    optimizer: the update's per-chip work (`optimizer_work`); None: not
      modelled.
    assumptions: efficiency factors, overlap, tokens per epoch.
  """
  a = assumptions
  chips = len(device_coords) if device_coords else tpu.chips
  flops = step_flops(model_config, seq_len, global_batch, trainable_fraction)
  peak = chips * tpu.chip.peak_bf16_flops
  compute = flops.total / (peak * a.mxu_efficiency)
  comm: dict[str, float] = {}
  for (kind, ids), (_, nbytes) in collectives.groups.items():
    group = locate_group(tuple(ids), device_coords, tpu, chips)
    comm[kind] = comm.get(kind, 0.0) + collective_seconds(
        kind, nbytes, group, tpu, a.ici_efficiency)
  slices = len({c[-1] for c in device_coords}) if device_coords else 1
  if slices > 1:
    dcn_bw = tpu.chip.dcn_bytes_per_s
    if dcn_bw is None:
      raise ValueError(f"no DCN bandwidth for {tpu.chip.name} in the TPU table")
    for kind, (_, nbytes) in getattr(collectives, "dcn", {}).items():
      # Megascale transfers carry each chip's part: a ring over the slices.
      factor = 2.0 if kind == "all-reduce" else 1.0
      comm[f"DCN {kind}"] = comm.get(f"DCN {kind}", 0.0) + (
          factor * (slices - 1) / slices * nbytes
          / (dcn_bw * a.ici_efficiency))
  opt: dict[str, float] = {}
  if optimizer is not None:
    chip = tpu.chip
    # Passes apply to float32 inputs only; bf16 iterates take one.
    passes = (1 if optimizer.ns_matmul_dtype == "bfloat16"
              else a.ns_matmul_passes)
    opt["matmul"] = (optimizer.matmul_flops * passes
                     + optimizer.pass_flops) / (
        chip.peak_bf16_flops * a.mxu_efficiency)
    if chip.hbm_bytes_per_s is None:
      raise ValueError(f"no HBM bandwidth for {chip.name} in the TPU table")
    opt["hbm"] = optimizer.hbm_bytes / chip.hbm_bytes_per_s
    if optimizer.all_to_all:
      # Moved out of the overlapped collectives (the HLO counts them too).
      t = sum(collective_seconds(
          "all-to-all", b, locate_group(tuple(range(n)), device_coords, tpu,
                                        chips), tpu, a.ici_efficiency)
              for b, n in optimizer.all_to_all)
      comm["all-to-all"] = max(0.0, comm.get("all-to-all", 0.0) - t)
      opt["all-to-all"] = t
  comm_total = sum(comm.values())
  step = (max(compute, comm_total)
          + (1.0 - a.overlap) * min(compute, comm_total)
          + sum(opt.values()))
  tokens = global_batch * seq_len
  return StepEstimate(
      flops=flops, compute_s=compute, comm_s=comm, step_s=step,
      bound="compute" if compute >= comm_total else "communication",
      mfu=flops.model / (step * peak), tokens_per_step=tokens,
      hours_per_epoch=a.epoch_tokens / tokens * step / 3600,
      assumptions=a, optimizer_s=opt,
      optimizer_note="" if optimizer is None else optimizer.note)
