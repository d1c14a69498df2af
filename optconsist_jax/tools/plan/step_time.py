"""Roofline estimate of a training step's time from its flops and collectives.

Compute: the step's flops over the chips' peak. The flops are analytic:
6 x matmul params x tokens plus the attention score/value products (PaLM's
MFU accounting, Chowdhery et al. 2022, appendix B; `LlamaConfig.
flops_per_token`), plus what rematerialization recomputes in the backward
pass (the block forward but its down projection for `full`, the attention
products for
`dots_no_batch`, nothing for `dots`/`none`). A test checks the total against
XLA's own count (`compiled.cost_analysis()`) on an unrolled small model.

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
the maximum of the two, 0 = their sum). Memory-bound work (optimizer update,
elementwise ops) and per-op latency are not modelled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optconsist_jax.platforms import tpu as tpu_facts

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
  """Flops per token that the remat policy recomputes in the backward pass."""
  c = model_config
  d, h = c.hidden_size, c.head_dim
  attention_fwd = 4 * c.num_layers * seq_len * c.num_heads * h
  block_matmul = c.num_layers * (
      d * h * (2 * c.num_heads + 2 * c.num_kv_heads)
      + 3 * d * c.intermediate_size)
  # Full remat re-runs the block forward except its last matmul (down
  # projection): the backward needs that matmul's input, not its output.
  down = c.num_layers * d * c.intermediate_size
  return {"none": 0.0, "dots": 0.0, "dots_no_batch": float(attention_fwd),
          "full": 2.0 * (block_matmul - down) + attention_fwd}[c.remat_policy]


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
# The estimate.


@dataclasses.dataclass(frozen=True)
class Assumptions:
  mxu_efficiency: float = MXU_EFFICIENCY
  ici_efficiency: float = ICI_EFFICIENCY
  overlap: float = OVERLAP
  epoch_tokens: float = EPOCH_TOKENS

  def describe(self) -> str:
    return (f"assumptions: matmuls at {self.mxu_efficiency:.0%} of peak bf16,"
            f" ICI/DCN links at {self.ici_efficiency:.0%} of their bandwidth,"
            f" {self.overlap:.0%} of the shorter of compute and"
            " communication hidden under the longer; memory-bound work and"
            " per-op latency not modelled; epoch ="
            f" {self.epoch_tokens / 1e6:.0f}M tokens")


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  """Roofline step time of one plan."""

  flops: StepFlops
  compute_s: float
  comm_s: dict[str, float]  # per collective kind
  step_s: float
  bound: str  # "compute" or "communication"
  mfu: float  # model flops / (step time x chips x peak): an upper bound
  tokens_per_step: int
  hours_per_epoch: float
  assumptions: Assumptions

  @property
  def comm_total_s(self) -> float:
    return sum(self.comm_s.values())

  def row(self) -> dict[str, Any]:
    return {"compute_s": self.compute_s, "comm_s": self.comm_total_s,
            **{f"{k}_s": v for k, v in self.comm_s.items()},
            "step_s": self.step_s, "bound": self.bound, "mfu": self.mfu,
            "tokens_per_step": self.tokens_per_step,
            "hours_per_epoch": self.hours_per_epoch,
            "model_flops": self.flops.model,
            "recompute_flops": self.flops.recompute}

  def describe(self) -> str:
    comm = ", ".join(f"{k} {v:.3f}" for k, v in self.comm_s.items() if v)
    return "\n".join([
        f"estimated step {self.step_s:.3f} s ({self.bound}-bound): compute"
        f" {self.compute_s:.3f} s ({self.flops.total:.3e} flops, of which"
        f" remat recompute {self.flops.recompute:.3e}), communication"
        f" {self.comm_total_s:.3f} s ({comm or 'none'})",
        f"MFU bound {self.mfu:.1%}; {self.tokens_per_step / self.step_s:,.0f}"
        f" tokens/s; {self.hours_per_epoch:.2f} h per epoch",
        self.assumptions.describe()])


def estimate(model_config, *, seq_len: int, global_batch: int,
             collectives: Any, tpu: tpu_facts.TpuSlice,
             device_coords: list[tuple[int, ...]] | None = None,
             trainable_fraction: float = 1.0,
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
  comm_total = sum(comm.values())
  step = (max(compute, comm_total)
          + (1.0 - a.overlap) * min(compute, comm_total))
  tokens = global_batch * seq_len
  return StepEstimate(
      flops=flops, compute_s=compute, comm_s=comm, step_s=step,
      bound="compute" if compute >= comm_total else "communication",
      mfu=flops.model / (step * peak), tokens_per_step=tokens,
      hours_per_epoch=a.epoch_tokens / tokens * step / 3600,
      assumptions=a)
