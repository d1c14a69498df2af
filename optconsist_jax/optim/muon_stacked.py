"""Muon's `stacked` distribution: whole matrices per device, balanced.

Matrices of a Muon step that share a canonical (wide, m <= n) shape, dtype
and layout form a group. Each group is stacked [k, m_local, n_local] on every
device and moved with one all-to-all over all the mesh axes that shard the
matrix dims (the axes flattened into one device axis: source i's block of
slot s lands at block position i of slot s on its destination), so that
every device holds whole matrices and runs Newton-Schulz with no collective
inside the loop; the inverse all-to-all brings the results back. Mesh axes
that shard neither matrix dim nor the leading (layer) dims split the stack
by slicing (no communication) and are all-gathered at the end.

Balance. A group of k matrices over P devices gives every device k // P of
them; the k % P remainders of all groups that share the devices are placed
longest first (longest processing time, Graham 1969, "Bounds on
multiprocessing timing anomalies": plain LPT is within 4/3 of the optimal
maximum), each onto the least loaded device that has a free slot, or onto
the least loaded device overall when that shortens the step. The all-to-all
needs equal chunks, so a group occupies `slots` = the largest count on any
device; slots a device does not own carry zeros and skip the iteration
behind a `lax.cond` on the device's index. Devices thus execute their
planned flops (`StackedPlan.device_flops`); padding still costs all-to-all
bytes (`StackedPlan.moved_over_needed`). XLA's static cost analysis counts a
conditional as if it were taken, so the compiled per-device flops are the
`slot_flops` upper bound, not what a device executes.

Each NS iteration on an m x n wide matrix costs 4 m m n + 2 m m m flops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def ns_flops(m: int, n: int, steps: int = 1) -> int:
  """Flops of `steps` NS iterations on an m x n matrix (wide: m <= n taken):
  X X^T (2 m m n), A A (2 m m m), (bA + cAA) X (2 m m n)."""
  m, n = sorted((m, n))
  return steps * (2 * (2 * m * m * n) + 2 * m * m * m)


def axes_of(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def axes_size(mesh: Mesh | jax.sharding.AbstractMesh,
              axes: Sequence[str]) -> int:
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a group's wide m x n matrices lie on the mesh.

  m_axes / n_axes shard the wide matrix's rows / columns, lead_axes its
  leading (stacked layer) dims, rep_axes (size > 1, none of those) hold
  copies. `count` is the matrices per device before the all-to-all.
  """
  m: int
  n: int
  count: int
  m_axes: tuple[str, ...]
  n_axes: tuple[str, ...]
  rep_axes: tuple[str, ...]
  lead_axes: frozenset[str]

  @property
  def position_axes(self) -> tuple[str, ...]:
    """Axes whose mixed-radix index is a device's chunk of the stack."""
    return self.rep_axes + self.m_axes + self.n_axes


def layout(shape: Sequence[int], spec: Sequence[Any], mesh: Mesh,
           count: int) -> Layout:
  """The Layout of [..., rows, cols] matrices with PartitionSpec `spec`
  (padded to the rank), `count` of them per device."""
  tall = shape[-2] > shape[-1]
  m_entry, n_entry = (spec[-1], spec[-2]) if tall else (spec[-2], spec[-1])
  m_axes, n_axes = axes_of(m_entry), axes_of(n_entry)
  lead = frozenset(a for e in spec[:-2] for a in axes_of(e))
  used = set(m_axes) | set(n_axes) | lead
  rep = tuple(a for a in mesh.axis_names
              if a not in used and mesh.shape[a] > 1)
  m, n = sorted(shape[-2:])
  return Layout(m, n, count, m_axes, n_axes, rep, lead)


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """counts[p]: matrices device position p orthogonalizes (p = mixed-radix
  index over layout.position_axes); order: stack index at each of the
  split * slots positions of the padded stack, `count` for a zero pad."""
  layout: Layout
  counts: np.ndarray
  order: np.ndarray

  @property
  def slots(self) -> int:
    return int(self.counts.max())

  @property
  def split(self) -> int:
    return len(self.counts)

  @property
  def reordered(self) -> bool:
    return not np.array_equal(self.order, np.arange(self.layout.count))


@dataclasses.dataclass(frozen=True)
class StackedPlan:
  """Per-group plans and what each device does with them.

  device_flops: NS flops each device executes, by device id (mesh.devices);
  ideal_flops: the total over mesh.size; slot_flops: what a device would
  run if every slot, padding included, were orthogonalized (what XLA's cost
  analysis counts); padded_flops: per device with every group padded to a
  multiple of its devices and no balancing across groups (the scheme before
  this plan).
  """
  groups: list[GroupPlan]
  device_flops: dict[int, float]
  ideal_flops: float
  slot_flops: float
  padded_flops: float

  @property
  def max_over_mean(self) -> float:
    return max(self.device_flops.values()) / self.ideal_flops

  @property
  def moved_over_needed(self) -> float:
    """All-to-all elements per device (with padding) over the group's own
    (count * m * n / split); 1.0 when every count divides."""
    moved = sum(g.slots * g.layout.m * g.layout.n for g in self.groups)
    needed = sum(g.layout.count * g.layout.m * g.layout.n / g.split
                 for g in self.groups)
    return moved / needed if needed else 1.0

  @property
  def padded_moved_over_needed(self) -> float:
    """`moved_over_needed` with ceil(count / split) slots per group."""
    moved = sum(-(-g.layout.count // g.split) * g.layout.m * g.layout.n
                for g in self.groups)
    needed = sum(g.layout.count * g.layout.m * g.layout.n / g.split
                 for g in self.groups)
    return moved / needed if needed else 1.0


def _position(layout_: Layout, mesh: Mesh | jax.sharding.AbstractMesh,
              coords: dict[str, int]) -> int:
  p = 0
  for a in layout_.position_axes:
    p = p * mesh.shape[a] + coords[a]
  return p


def _devices(mesh: Mesh | jax.sharding.AbstractMesh):
  """(device id, {axis: index}) for every device of the mesh; an
  AbstractMesh (planning without devices) numbers them row-major."""
  sizes = tuple(mesh.shape[a] for a in mesh.axis_names)
  if isinstance(mesh, jax.sharding.AbstractMesh):
    ids = np.arange(int(np.prod(sizes))).reshape(sizes)
  else:
    ids = np.vectorize(lambda d: d.id, otypes=[np.int64])(mesh.devices)
  for idx in np.ndindex(*sizes):
    yield int(ids[idx]), dict(zip(mesh.axis_names, idx))


def plan(layouts: Sequence[Layout], mesh: Mesh | jax.sharding.AbstractMesh,
         steps: int) -> StackedPlan:
  """Balances the groups' NS flops over the devices (module docstring).

  Groups with the same lead axes share devices in the same way and are
  balanced together: k // split matrices per device, then the remainders
  longest first onto the least loaded device that still has a free slot
  (below ceil(k / split) or the group's slots so far), or onto the least
  loaded device overall when the free one would lengthen the step (raising
  the group's slots, i.e. its padded all-to-all bytes).
  """
  costs = [float(ns_flops(lay.m, lay.n, steps)) for lay in layouts]
  counts = [np.full(axes_size(mesh, lay.position_axes),
                    lay.count // axes_size(mesh, lay.position_axes), np.int64)
            for lay in layouts]
  domains: dict[frozenset[str], list[int]] = {}
  for g, lay in enumerate(layouts):
    domains.setdefault(lay.lead_axes, []).append(g)
  for members in domains.values():
    # Device key: coordinates on the axes that split this domain's stacks
    # (all its groups': a group whose matrices a size-1 axis shards has that
    # axis, one that no axis shards lacks it; DeepSeek-V3's kv_b_proj and
    # kv_a_proj_with_mqa on an fsdp mesh).
    axes = sorted({a for g in members for a in layouts[g].position_axes})
    keys = sorted({tuple(c[a] for a in axes) for _, c in _devices(mesh)})
    load = {k: 0.0 for k in keys}
    pos = {g: {k: _position(layouts[g], mesh, dict(zip(axes, k)))
               for k in keys} for g in members}
    for g in members:
      for k in keys:
        load[k] += counts[g][pos[g][k]] * costs[g]
    items = [(costs[g], g) for g in members
             for _ in range(layouts[g].count % len(counts[g]))]
    for cost, g in sorted(items, key=lambda t: (-t[0], t[1])):
      c = counts[g]
      # Slots the group pays for anyway (ceil(k / split), or more once
      # raised): a device below them costs no all-to-all bytes.
      free = max(-(-layouts[g].count // len(c)), int(c.max()))
      ranked = sorted((load[k], c[pos[g][k]], k) for k in keys)
      best = ranked[0][2]
      cheap = next(k for _, n, k in ranked if n < free)
      if load[cheap] + cost > max(load.values()) and load[best] < load[cheap]:
        cheap = best  # a slot more beats a longer step
      c[pos[g][cheap]] += 1
      load[cheap] += cost
  groups = []
  for lay, c in zip(layouts, counts):
    slots, offsets = int(c.max()), np.concatenate([[0], np.cumsum(c)])
    order = np.full((len(c), slots), lay.count, np.int64)
    for p in range(len(c)):
      order[p, :c[p]] = np.arange(offsets[p], offsets[p + 1])
    groups.append(GroupPlan(lay, c, order.reshape(-1)))
  device_flops = {
      d: sum(g.counts[_position(g.layout, mesh, coords)] * cost
             for g, cost in zip(groups, costs))
      for d, coords in _devices(mesh)}
  total = sum(lay.count * axes_size(mesh, tuple(lay.lead_axes)) * cost
              for lay, cost in zip(layouts, costs))
  slot_flops = sum(g.slots * cost for g, cost in zip(groups, costs))
  padded = sum(-(-g.layout.count // g.split) * cost
               for g, cost in zip(groups, costs))
  return StackedPlan(groups, device_flops, total / mesh.size, slot_flops,
                     padded)


def to_stack(xs: Sequence[jax.Array], talls: Sequence[bool]) -> jax.Array:
  """[..., rows, cols] arrays -> one [k, m, n] stack, transposing those
  marked tall (decided on global shapes: a local block may look tall)."""
  ws = [jnp.swapaxes(x, -1, -2) if t else x for x, t in zip(xs, talls)]
  return jnp.concatenate([w.reshape(-1, *w.shape[-2:]) for w in ws], axis=0)


def from_stack(stack: jax.Array, like: Sequence[jax.Array],
               talls: Sequence[bool]) -> list[jax.Array]:
  """Inverse of `to_stack`: the stack's first matrices back in the shapes
  of `like`."""
  out, start = [], 0
  for x, tall in zip(like, talls):
    k = int(np.prod(x.shape[:-2], dtype=np.int64))
    w = stack[start:start + k]
    start += k
    w = w.reshape(x.shape[:-2] + ((x.shape[-1], x.shape[-2]) if tall
                                  else x.shape[-2:]))
    out.append(jnp.swapaxes(w, -1, -2) if tall else w)
  return out


def _balanced_ns(stack, group: GroupPlan, ns):
  """NS on the slots this device owns; the others pass through (zeros)."""
  lo, hi = int(group.counts.min()), group.slots
  parts = [ns(stack[:lo])] if lo else []
  if hi > lo:
    owned = jnp.asarray(group.counts, jnp.int32)[
        jax.lax.axis_index(group.layout.position_axes)]
    for s in range(lo, hi):
      parts.append(jax.lax.cond(
          s < owned, ns, lambda x: x.astype(jnp.float32), stack[s:s + 1]))
  return jnp.concatenate(parts, axis=0)


def orthogonalize(xs: list[jax.Array], specs: list[tuple[Any, ...]],
                  group: GroupPlan, mesh: Mesh,
                  ns: Callable[[jax.Array], jax.Array]) -> list[jax.Array]:
  """Runs `ns` (wide [k, m, n] -> float32) on one group as planned.

  xs: the group's global arrays [..., rows, cols] with PartitionSpecs
  `specs` (one padded entry per dim), all of the group's layout.
  """
  lay = group.layout
  m_size, n_size = axes_size(mesh, lay.m_axes), axes_size(mesh, lay.n_axes)
  shard_axes = lay.m_axes + lay.n_axes
  shards, slots = m_size * n_size, group.slots
  # Decided on global shapes: a local block of a square matrix may be tall.
  talls = [x.shape[-2] > x.shape[-1] for x in xs]

  def local(*blocks):
    stack = to_stack(blocks, talls)
    k, mb, nb = stack.shape
    assert k == lay.count, (k, lay.count)
    if group.reordered:
      stack = jnp.concatenate([stack, jnp.zeros((1, mb, nb), stack.dtype)])
      stack = stack[group.order]
    if lay.rep_axes:
      # Devices that hold the same data each take a slice of the stack.
      stack = jax.lax.dynamic_slice_in_dim(
          stack, jax.lax.axis_index(lay.rep_axes) * shards * slots,
          shards * slots, axis=0)
    if shards > 1:
      # One all-to-all over all the sharding axes: piece i goes to device i
      # (mixed radix over m_axes + n_axes), which stitches the blocks.
      stack = jax.lax.all_to_all(stack.reshape(shards, slots, mb, nb),
                                 shard_axes, 0, 0, tiled=True)
      stack = stack.reshape(m_size, n_size, slots, mb, nb).transpose(
          2, 0, 3, 1, 4).reshape(slots, m_size * mb, n_size * nb)
    stack = _balanced_ns(stack, group, ns).astype(stack.dtype)
    if shards > 1:
      stack = stack.reshape(slots, m_size, mb, n_size, nb).transpose(
          1, 3, 0, 2, 4).reshape(shards, slots, mb, nb)
      stack = jax.lax.all_to_all(stack, shard_axes, 0, 0, tiled=True)
      stack = stack.reshape(shards * slots, mb, nb)
    if lay.rep_axes:
      stack = jax.lax.all_gather(stack, lay.rep_axes, axis=0, tiled=True)
    if group.reordered:
      where = np.argsort(group.order, kind="stable")[:k]
      stack = stack[where]
    return tuple(from_stack(stack, blocks, talls))

  pspecs = tuple(P(*s) for s in specs)
  fn = jax.shard_map(local, mesh=mesh, in_specs=pspecs, out_specs=pspecs,
                     check_vma=False)
  return list(fn(*xs))
