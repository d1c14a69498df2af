"""Collectives in optimized HLO text: how many run per step and their bytes.

Reads the text of a compiled XLA executable (`compiled.as_text()`): every
all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute
(sync, async `-start`, or fused as TPU emits them), weighted by the trip
counts of the while loops around them (scan over layers, gradient
accumulation), grouped by the devices they run over, plus multi-slice
transfers over the data-center network (megascale `send`s). Bytes are the
size of the full (unsharded-over-the-group) tensor per op: the output of an
all-gather, the input of a reduce-scatter, the operand of an all-reduce,
all-to-all or collective-permute. The opcodes and their async forms are
XLA's (openxla.org/xla/operation_semantics).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np


# ----------------------------------------------------------------------------
# Replica groups in HLO text.

_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)?\}")


def first_replica_group(attrs: str) -> tuple[int, ...]:
  """Device ids of the first replica group in an HLO op's attributes.

  Reads the three spellings XLA prints: explicit `{{0,1},{2,3}}`, iota
  `[G,S]<=[dims]T(perm)` (ids = iota(dims) transposed by perm, reshaped to
  G groups of S) and `mesh['a'=2,'b'=4] {'b'}` (groups along the named mesh
  axes). Returns () when there is none (all devices, or a
  collective-permute's source-target pairs).
  """
  m = _IOTA.search(attrs)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return tuple(int(i) for i in ids.reshape(groups, size)[0])
  m = _MESH.search(attrs)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    chosen = re.findall(r"'([^']+)'", m.group(2))
    rest = [i for i, a in enumerate(names) if a not in chosen]
    order = rest + [names.index(a) for a in chosen]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(order)
    return tuple(int(i) for i in
                 ids.reshape(-1, math.prod(sizes[names.index(a)]
                                           for a in chosen))[0])
  m = _LIST.search(attrs)
  if m and m.group(1):
    first = m.group(1).split("}")[0].strip("{")
    return tuple(int(i) for i in first.split(",") if i)
  return ()


# ----------------------------------------------------------------------------
# Collectives.

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
  pairs), for the step-time estimate (optconsist_jax.tools.plan.step_time).
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
    key = (kind, first_replica_group(attrs))
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

