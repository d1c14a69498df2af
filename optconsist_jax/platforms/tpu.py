"""Cloud TPU hardware facts: every TPU number the package uses.

Peak flops for MFU, HBM for fit checks, ICI and DCN bandwidth for step-time
estimates, slice shapes for the planner, accelerator types and software
versions for the launcher. Imports without jax (the launcher reads these on
machines without it).
"""

from __future__ import annotations

import dataclasses
import math
import re

# Sources:
#   [v4]  cloud.google.com/tpu/docs/v4 ("System architecture"): 275 TFLOP/s bf16,
#         32 GiB HBM2 at 1200 GB/s, 3D torus.
#   [v5e] cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at
#         819 GB/s, ICI 1600 Gbit/s per chip, 4 ICI ports (2D torus), data
#         center network 6.4 Tbit/s per 256-chip pod (25 Gbit/s per chip).
#   [v5p] cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at
#         2765 GB/s, bidirectional ICI 1200 GB/s per chip (4800 Gbit/s one
#         way), 3D torus, DCN 50 Gbit/s per chip.
#   [v6e] cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at
#         1640 GB/s, ICI 3584 Gbit/s per chip, 4 ICI ports (2D torus), data
#         center network 25.6 Tbit/s per 256-chip pod (100 Gbit/s per chip).
#   [v2/v3] cloud.google.com/tpu/docs/system-architecture-tpu-vm: v2 45 and v3
#         123 TFLOP/s bf16 per chip, 16 and 32 GiB HBM per chip.
#   [book] J. Austin et al., "How to Scale Your Model" (2025),
#         jax-ml.github.io/scaling-book, part 2 "TPUs": per-link ICI bandwidth
#         (v4 4.5e10 B/s one way), wraparound links only on full-cube (v4/v5p,
#         axes of 4 or more within whole cubes) or full-pod (v5e/v6e, axes of
#         16) slices, and the ring collective cost model the estimator uses.
#
# "ICI bandwidth" on the Cloud TPU pages is the one-way total over all of a
# chip's ports; the per-link one-way figure here is that total over the ports
# (v4: [book]).

GB = 1e9


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """Per-chip facts of one TPU generation.

  Attributes:
    name: generation (v2, v3, v4, v5p, v5e, v6e).
    peak_bf16_flops: dense bf16 peak flop/s per chip.
    hbm_gib: HBM per chip in GiB.
    hbm_bytes_per_s: HBM bandwidth per chip (None: not used/unknown).
    ici_ports: ICI links per chip (2 per torus dimension).
    ici_link_bytes_per_s: one-way bandwidth of one ICI link.
    torus_dims: dimensions of the ICI torus (2 or 3).
    wrap_min: a slice axis of at least this many chips has wraparound links.
    dcn_bytes_per_s: data-center network bandwidth per chip (multi-slice).
    device_kinds: substrings of jax `device_kind` that name this chip.
    source: where the numbers come from (see the module docstring).
  """

  name: str
  peak_bf16_flops: float
  hbm_gib: float
  hbm_bytes_per_s: float | None
  ici_ports: int | None
  ici_link_bytes_per_s: float | None
  torus_dims: int
  wrap_min: int
  dcn_bytes_per_s: float | None
  device_kinds: tuple[str, ...]
  source: str


CHIPS: dict[str, TpuChip] = {c.name: c for c in (
    TpuChip("v2", 45e12, 16.0, None, None, None, 2, 32, None, ("TPU v2",),
            "[v2/v3]"),
    TpuChip("v3", 123e12, 32.0, None, None, None, 2, 32, None, ("TPU v3",),
            "[v2/v3]"),
    TpuChip("v4", 275e12, 32.0, 1200 * GB, 6, 45 * GB, 3, 4, None,
            ("TPU v4",), "[v4], ICI link [book]"),
    TpuChip("v5p", 459e12, 95.0, 2765 * GB, 6, 4800e9 / 8 / 6, 3, 4,
            50e9 / 8, ("TPU v5p", "TPU v5"), "[v5p]"),
    TpuChip("v5e", 197e12, 16.0, 819 * GB, 4, 1600e9 / 8 / 4, 2, 16,
            6.4e12 / 8 / 256, ("TPU v5 lite", "TPU v5e"), "[v5e]"),
    TpuChip("v6e", 918e12, 32.0, 1640 * GB, 4, 3584e9 / 8 / 4, 2, 16,
            25.6e12 / 8 / 256, ("TPU v6",), "[v6e]"),
)}


def chip_for_device_kind(device_kind: str) -> TpuChip | None:
  """The chip a jax `device.device_kind` names (None: not a known TPU)."""
  kind = device_kind.lower()
  # Longest names first: "TPU v5 lite" before "TPU v5".
  pairs = sorted(((k, c) for c in CHIPS.values() for k in c.device_kinds),
                 key=lambda kc: -len(kc[0]))
  for key, chip in pairs:
    if key.lower() in kind:
      return chip
  return None


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A Cloud TPU slice the planner can compile for.

  Attributes:
    name: accelerator type (v5p-8: the number counts TensorCores on v4/v5p,
      chips on v5e/v6e).
    chip: the generation's TpuChip.
    shape: chips along each torus axis (libtpu's topology, e.g. (2, 2, 1)).
    chip_config: "megacore" (v4, v5p: one device per chip) or "default".
  """

  name: str
  chip: TpuChip
  shape: tuple[int, ...]
  chip_config: str

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    prefix = {"v5p": "v5", "v4": "v4", "v5e": "v5e", "v6e": "v6e"}
    return f"{prefix[self.chip.name]}:{'x'.join(map(str, self.shape))}"

  def wraps(self, axis: int) -> bool:
    """Whether torus axis `axis` has wraparound links ([book])."""
    return self.shape[axis] >= self.chip.wrap_min


def _slice(name: str, shape: tuple[int, ...]) -> TpuSlice:
  gen = name.split("-")[0]
  return TpuSlice(name, CHIPS[gen], shape,
                  "megacore" if gen in ("v4", "v5p") else "default")


# Slice shapes from the Cloud TPU pages' configuration tables.
SLICES: dict[str, TpuSlice] = {s.name: s for s in (
    _slice("v4-8", (2, 2, 1)), _slice("v4-16", (2, 2, 2)),
    _slice("v4-32", (2, 2, 4)), _slice("v4-128", (4, 4, 4)),
    _slice("v5p-8", (2, 2, 1)), _slice("v5p-16", (2, 2, 2)),
    _slice("v5p-32", (2, 2, 4)), _slice("v5p-64", (2, 4, 4)),
    _slice("v5p-128", (4, 4, 4)),
    _slice("v5e-4", (2, 2)), _slice("v5e-8", (2, 4)),
    _slice("v5e-16", (4, 4)), _slice("v5e-32", (4, 8)),
    _slice("v5e-64", (8, 8)), _slice("v5e-256", (16, 16)),
    _slice("v6e-4", (2, 2)), _slice("v6e-8", (2, 4)),
    _slice("v6e-16", (4, 4)), _slice("v6e-256", (16, 16)),
)}


def tpu_slice(name: str) -> TpuSlice:
  """The slice called `name`; unknown names list the known ones."""
  if name not in SLICES:
    raise ValueError(f"unknown TPU slice {name!r}; known: {sorted(SLICES)}")
  return SLICES[name]


def parse_topology(name: str) -> tuple[int, TpuSlice] | None:
  """'v5p-8' -> (1, slice); '2xv5p-8' (2 slices over DCN) -> (2, slice).

  None when `name` is not a known TPU slice (e.g. cpu-N).
  """
  m = re.fullmatch(r"(?:(\d+)x)?(.+)", name)
  slices = int(m.group(1) or 1)
  if m.group(2) not in SLICES or slices < 1:
    return None
  return slices, SLICES[m.group(2)]


# ----------------------------------------------------------------------------
# Accelerator types as gcloud names them (the launcher). Software versions
# from the Cloud TPU page "TPU software versions": v6e -> v2-alpha-tpuv6e,
# v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite, v4 and older ->
# tpu-ubuntu2204-base.


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One Cloud TPU generation as gcloud sees it.

  Attributes:
    chip: the generation's TpuChip (HBM, peak flops, ...).
    type_prefix: prefix of the gcloud accelerator type (v5e is `v5litepod`).
    runtime_version: the TPU software version for JAX on this generation.
    suffix_unit: what the number after the prefix counts: "cores"
      (TensorCores, 2 per chip: v2/v3/v4/v5p) or "chips" (v5e, v6e).
    cores_per_chip: TensorCores per chip.
    devices_per_chip: JAX devices per chip (1 for v4/v5p megacore, 2 for
      v2/v3, 1 for v5e/v6e).
    chips_per_host: chips attached to one TPU VM host in a multi-host slice.
    max_single_host_chips: largest slice that is a single host.
    sizes: valid numbers after the prefix.
  """

  chip: TpuChip
  type_prefix: str
  runtime_version: str
  suffix_unit: str
  cores_per_chip: int
  devices_per_chip: int
  chips_per_host: int
  max_single_host_chips: int
  sizes: tuple[int, ...]

  @property
  def name(self) -> str:
    return self.chip.name


def _multiples(step: int, top: int) -> tuple[int, ...]:
  return tuple(range(step, top + 1, step))


GENERATIONS: dict[str, TpuGeneration] = {g.name: g for g in (
    TpuGeneration(CHIPS["v2"], "v2", "tpu-ubuntu2204-base", "cores", 2, 2, 4,
                  4, (8, 32, 128, 256, 512)),
    TpuGeneration(CHIPS["v3"], "v3", "tpu-ubuntu2204-base", "cores", 2, 2, 4,
                  4, (8, 32, 64, 128, 256, 512, 1024, 2048)),
    TpuGeneration(CHIPS["v4"], "v4", "tpu-ubuntu2204-base", "cores", 2, 1, 4,
                  4, _multiples(8, 4096)),
    TpuGeneration(CHIPS["v5p"], "v5p", "v2-alpha-tpuv5", "cores", 2, 1, 4, 4,
                  _multiples(8, 12288)),
    TpuGeneration(CHIPS["v5e"], "v5litepod", "v2-alpha-tpuv5-lite", "chips",
                  1, 1, 4, 8, (1, 4, 8, 16, 32, 64, 128, 256)),
    TpuGeneration(CHIPS["v6e"], "v6e", "v2-alpha-tpuv6e", "chips", 1, 1, 4, 8,
                  (1, 4, 8, 16, 32, 64, 128, 256)),
)}

# Names people write that gcloud spells differently.
_PREFIX_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}


def _describe_sizes(gen: TpuGeneration) -> str:
  if len(gen.sizes) > 12:
    step = gen.sizes[0]
    return (f"{gen.type_prefix}-N (N = {gen.suffix_unit}, a multiple of {step}"
            f" from {gen.sizes[0]} to {gen.sizes[-1]})")
  return f"{gen.type_prefix}-{{{','.join(str(s) for s in gen.sizes)}}}"


def valid_accelerator_types() -> str:
  """A one-line description of every valid accelerator type."""
  parts = [_describe_sizes(g) for g in GENERATIONS.values()]
  return "; ".join(parts) + " (v5e-N is accepted for v5litepod-N)"


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A TPU slice shape, e.g. `v5p-16` = 8 v5p chips on 2 hosts."""

  accelerator_type: str  # canonical gcloud spelling
  generation: TpuGeneration
  size: int

  @property
  def chips(self) -> int:
    if self.generation.suffix_unit == "cores":
      return self.size // self.generation.cores_per_chip
    return self.size

  @property
  def num_devices(self) -> int:
    return self.chips * self.generation.devices_per_chip

  @property
  def num_hosts(self) -> int:
    if self.chips <= self.generation.max_single_host_chips:
      return 1
    return self.chips // self.generation.chips_per_host


def accelerator(accelerator_type: str) -> Accelerator:
  """Parses and validates an accelerator type ("v5p-16", "v5e-32", ...).

  Raises:
    ValueError: naming the bad type and listing the valid ones.
  """
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type.strip().lower())
  if m:
    prefix = _PREFIX_ALIASES.get(m.group(1), m.group(1))
    size = int(m.group(2))
    for gen in GENERATIONS.values():
      if gen.type_prefix == prefix and size in gen.sizes:
        return Accelerator(f"{prefix}-{size}", gen, size)
  raise ValueError(
      f"unknown accelerator type {accelerator_type!r}; valid types: "
      f"{valid_accelerator_types()}")
