"""Muon: momentum orthogonalized by Newton-Schulz, with sharded strategies.

For a weight matrix W (here stored [in, out], possibly stacked on leading axes
such as the scanned `layers` axis) with gradient G_t, Muon does

  M_t = beta * M_{t-1} + (1 - beta) * G_t                      (EMA momentum)
  D_t = beta * M_t + (1 - beta) * G_t    (Nesterov)   or   D_t = M_t
  O_t = NS_k(D_t / (||D_t||_F + eps))   ~= U V^T for D_t = U S V^T
  W_t = W_{t-1} - lr_t * (s(m, n) * O_t + wd * W_{t-1})        (decoupled wd)

where NS_k is k steps of the quintic Newton-Schulz map on a wide matrix
X (m <= n; tall matrices are transposed first)

  A = X X^T,  X <- a X + (b A + c A A) X,

with (a, b, c) = (3.4445, -4.7750, 2.0315) by default (Jordan 2024), which
drives the singular values of X into roughly [0.7, 1.2] rather than exactly
to 1; `ns_coefficients="polar_express"` uses a different minimax polynomial
per step (Amsel et al. 2025, arXiv 2505.16932; optim/ns_coefficients.py),
which does converge to 1.

`bias_correction=True` divides M_t by (1 - beta^(t+1)) and G_t by
(1 - beta^t) in the Nesterov form (and M_t by 1 - beta^t without Nesterov),
which is what `optax.contrib.muon` 0.2.8 does; without it the update direction
is that of Jordan's PyTorch reference (the EMA and the plain-sum momentum
differ only by a scalar, which the normalization removes).

Update scales s(m, n) with fan_in = in, fan_out = out of the [in, out] kernel:
  `shape`:     sqrt(max(1, fan_out / fan_in))    (Jordan; rows/cols of the
               PyTorch [out, in] weight)
  `rms_match`: rms_scale * sqrt(max(fan_in, fan_out)), rms_scale = 0.2, so the
               update RMS is about AdamW's and AdamW learning rates transfer
               (Liu et al. 2025).
  `none`:      1.

Each NS iteration on an m x n wide matrix costs about 4 m m n + 2 m m m flops.

Orthogonalization strategies under a mesh (`strategy`):
  `gspmd`:   each matrix is orthogonalized in its own parameter sharding with
             explicit sharding constraints inside the loop; XLA partitions the
             matmuls, so every iteration all-reduces the Gram matrix and every
             device repeats the m x m products (what `optax.contrib.muon` does
             under a mesh).
  `stacked`: (default) matrices with the same canonical (wide) shape and
             layout are stacked and moved with one all-to-all over all the
             mesh axes that shard them (inside `jax.shard_map`) so that each
             device holds whole matrices; each device runs the
             Newton-Schulz loop on its own matrices with no collective, and
             the inverse all-to-all brings the results back to the parameter
             sharding. Mesh axes that do not shard a matrix split the stack
             by slicing (no communication) and are all-gathered at the end.
             When a group's count does not divide the devices, the
             remainders of all groups are balanced by NS flops (longest
             processing time first; optim/muon_stacked.py, `stacked_plan`).
Without a mesh both strategies run one batched NS per group of equal shapes.

References:
  K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
    2024, https://kellerjordan.github.io/posts/muon/ and
    https://github.com/KellerJordan/Muon.
  J. Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982, 2025
    (update RMS matching 0.2 * sqrt(max(m, n)), decoupled weight decay).
  J. Bernstein, L. Newhouse, "Old Optimizer, New Norm: An Anthology",
    arXiv:2409.20325, 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optconsist_jax.optim import muon_stacked as stacked
from optconsist_jax.optim import ns_coefficients as ns_tables
from optconsist_jax.sharding import path_name

DEFAULT_COEFFICIENTS = ns_tables.QUINTIC
SCALE_MODES = ("shape", "rms_match", "none")
STRATEGIES = ("stacked", "gspmd")

Coefficients = str | Sequence[float] | Sequence[Sequence[float]]


def coefficient_schedule(coefficients: Coefficients | None,
                         steps: int) -> np.ndarray:
  """Returns the per-step (a, b, c) table, shape [steps, 3].

  A schedule name (`quintic`, `polar_express`; optim/ns_coefficients.py);
  one triple, repeated `steps` times; or a sequence of exactly `steps`
  triples.
  """
  if steps < 1:
    raise ValueError(f"newton_schulz: steps={steps} must be >= 1")
  if isinstance(coefficients, str):
    if coefficients == "quintic":
      coefficients = ns_tables.QUINTIC
    elif coefficients == "polar_express":
      return ns_tables.polar_express(steps).astype(np.float32)
    else:
      raise ValueError(
          f"newton_schulz: coefficients={coefficients!r}; expected one of"
          f" {ns_tables.SCHEDULES}, a triple or a list of triples")
  c = np.asarray(DEFAULT_COEFFICIENTS if coefficients is None else coefficients,
                 np.float32)
  if c.shape == (3,):
    return np.tile(c[None], (steps, 1))
  if c.ndim == 2 and c.shape[1] == 3:
    if c.shape[0] != steps:
      raise ValueError(
          f"newton_schulz: {c.shape[0]} coefficient triples for steps={steps}")
    return c
  raise ValueError(
      f"newton_schulz: coefficients must be (a, b, c) or a list of triples, "
      f"got shape {c.shape}")


def _matmul(x, y, accumulate_fp32):
  # bf16 inputs with fp32 accumulation when asked.
  return jnp.matmul(x, y, preferred_element_type=(
      jnp.float32 if accumulate_fp32 else None))


def _ns_wide(x: jax.Array, table: np.ndarray, dtype, eps: float,
             accumulate_fp32: bool,
             constrain: Callable[[jax.Array], jax.Array] | None = None
             ) -> jax.Array:
  """NS on wide matrices x[..., m, n] (m <= n); returns float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True))
  x = (x32 / (norm + eps)).astype(dtype)
  constrain = constrain or (lambda a: a)

  def body(x, abc):
    x = constrain(x)
    gram = _matmul(x, jnp.swapaxes(x, -1, -2), accumulate_fp32)
    poly = (abc[1] * gram + abc[2] * _matmul(
        gram.astype(dtype), gram.astype(dtype), accumulate_fp32))
    x = abc[0] * x.astype(poly.dtype) + _matmul(poly.astype(dtype), x,
                                                accumulate_fp32)
    return constrain(x.astype(dtype)), None

  # A scan over the coefficient table is a rolled while loop: one copy of the
  # body in the HLO and only one iteration's temporaries alive.
  x, _ = jax.lax.scan(body, x, jnp.asarray(table))
  return x.astype(jnp.float32)


def newton_schulz(g: jax.Array, steps: int = 5,
                  coefficients: Coefficients | None = None,
                  dtype: Any = jnp.float32, *, eps: float = 1e-7,
                  accumulate_fp32: bool = True) -> jax.Array:
  """Approximately orthogonalizes g (U S V^T -> U S' V^T, S' ~ 1).

  Args:
    g: [..., rows, cols]; leading axes are a stack of independent matrices.
    steps: Newton-Schulz iterations.
    coefficients: `quintic` or None (Jordan's (3.4445, -4.7750, 2.0315) at
      every step), `polar_express`, one (a, b, c) triple for every step, or
      one triple per step.
    dtype: dtype of the iterate and matmul inputs (float32 or bfloat16).
    eps: added to the Frobenius norm before dividing.
    accumulate_fp32: accumulate matmuls in float32 (matters for bfloat16).

  Returns:
    An array shaped and typed like g. Tall matrices are transposed to wide
    ones for the iteration (cheaper) and back.
  """
  if g.ndim < 2:
    raise ValueError(f"newton_schulz: needs a matrix, got shape {g.shape}")
  table = coefficient_schedule(coefficients, steps)
  tall = g.shape[-2] > g.shape[-1]
  x = jnp.swapaxes(g, -1, -2) if tall else g
  x = _ns_wide(x, table, jnp.dtype(dtype), eps, accumulate_fp32)
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(g.dtype)


def update_scale(fan_in: int, fan_out: int, mode: str,
                 rms_scale: float = 0.2) -> float:
  """The factor s(m, n) applied to the orthogonalized [fan_in, fan_out] update.

  `shape`:     sqrt(max(1, fan_out / fan_in)), Jordan's original
               sqrt(max(1, rows / cols)) of the PyTorch [out, in] weight
               (github.com/KellerJordan/Muon): unit RMS-to-RMS operator
               norm, but the update RMS shrinks as 1/sqrt(max(m, n)), so
               AdamW learning rates do not transfer.
  `rms_match`: rms_scale * sqrt(max(fan_in, fan_out)), rms_scale = 0.2
               (Liu et al. 2025, "Muon is Scalable for LLM Training",
               Moonlight, arXiv 2502.16982, Sec. 2.2): an orthogonal m x n
               update has RMS 1/sqrt(max(m, n)), so this gives update RMS
               0.2, about AdamW's, and AdamW's LR and weight decay carry
               over (the presets' default: both groups share one peak LR).
  `none`:      1 (Bernstein & Newhouse 2024, arXiv 2409.20325, leave the
               scale to the learning rate).
  """
  if mode == "shape":
    return math.sqrt(max(1.0, fan_out / fan_in))
  if mode == "rms_match":
    return rms_scale * math.sqrt(max(fan_in, fan_out))
  if mode == "none":
    return 1.0
  raise ValueError(f"muon: scale={mode!r}; expected one of {SCALE_MODES}")


class MuonState(NamedTuple):
  """count: int32 steps taken; mu: momentum, one array per param."""
  count: jax.Array
  mu: optax.Updates


class _Orthogonalizer:
  """Applies NS to a flat list of matrix leaves under one strategy."""

  def __init__(self, *, strategy: str, mesh: Mesh | None,
               shardings: dict[str, NamedSharding | None], table: np.ndarray,
               dtype, eps: float, accumulate_fp32: bool):
    self.strategy, self.mesh, self.shardings = strategy, mesh, shardings
    self.table, self.dtype, self.eps = table, dtype, eps
    self.accumulate_fp32 = accumulate_fp32

  def _spec(self, name: str, ndim: int) -> tuple[Any, ...]:
    s = self.shardings.get(name)
    spec = tuple(s.spec) if s is not None else ()
    return spec + (None,) * (ndim - len(spec))

  def _divisible(self, shape, spec) -> bool:
    return all(d % stacked.axes_size(self.mesh, stacked.axes_of(e)) == 0
               for d, e in zip(shape, spec))

  def _groups(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
              dtypes: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """(leaves for `_gspmd`, groups of leaves stacked together)."""
    alone, groups = [], {}
    for i, (name, shape, dtype) in enumerate(zip(names, shapes, dtypes)):
      spec = (self._spec(name, len(shape)) if self.mesh is not None
              else None)
      if self.strategy == "gspmd" or (
          self.mesh is not None and not self._divisible(shape, spec)):
        alone.append(i)
        continue
      m, n = sorted(shape[-2:])
      if spec is None:
        key = (m, n, dtype)
      else:
        lay = stacked.layout(shape, spec, self.mesh, 0)
        key = (m, n, dtype, lay.m_axes, lay.n_axes, lay.lead_axes)
      groups.setdefault(key, []).append(i)
    return alone, list(groups.values())

  def _layout(self, idx, names, shapes) -> stacked.Layout:
    count = 0
    for i in idx:
      spec = self._spec(names[i], len(shapes[i]))
      lead = int(np.prod(shapes[i][:-2], dtype=np.int64))
      count += lead // stacked.axes_size(
          self.mesh, [a for e in spec[:-2] for a in stacked.axes_of(e)])
    return stacked.layout(shapes[idx[0]], self._spec(
        names[idx[0]], len(shapes[idx[0]])), self.mesh, count)

  def plan(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
           dtypes: Sequence[Any]) -> tuple[list[list[int]],
                                           stacked.StackedPlan]:
    """The `stacked` groups (leaf indices) and their balanced plan."""
    _, groups = self._groups(names, shapes, dtypes)
    layouts = [self._layout(idx, names, shapes) for idx in groups]
    return groups, stacked.plan(layouts, self.mesh, len(self.table))

  def __call__(self, names: list[str], xs: list[jax.Array]) -> list[jax.Array]:
    out: list[jax.Array | None] = [None] * len(xs)
    shapes = [tuple(x.shape) for x in xs]
    dtypes = [x.dtype for x in xs]
    alone, groups = self._groups(names, shapes, dtypes)
    for i in alone:
      out[i] = self._gspmd(xs[i], None if self.mesh is None
                           else self._spec(names[i], xs[i].ndim))
    if self.mesh is None:
      for idx in groups:
        for i, r in zip(idx, self._stack_local([xs[i] for i in idx])):
          out[i] = r
      return out
    _, plan = self.plan(names, shapes, dtypes)
    for idx, group in zip(groups, plan.groups):
      results = stacked.orthogonalize(
          [xs[i] for i in idx], [self._spec(names[i], xs[i].ndim) for i in idx],
          group, self.mesh, self._ns)
      for i, r in zip(idx, results):
        out[i] = r
    return out

  def _ns(self, x, constrain=None):
    return _ns_wide(x, self.table, self.dtype, self.eps, self.accumulate_fp32,
                    constrain)

  def _gspmd(self, x, spec):
    tall = x.shape[-2] > x.shape[-1]
    w = jnp.swapaxes(x, -1, -2) if tall else x
    constrain = None
    if spec is not None:
      wspec = (*spec[:-2], spec[-1], spec[-2]) if tall else spec
      sharding = NamedSharding(self.mesh, P(*wspec))
      constrain = lambda a: jax.lax.with_sharding_constraint(a, sharding)
    w = self._ns(w, constrain)
    return jnp.swapaxes(w, -1, -2) if tall else w

  def _stack_local(self, xs):
    talls = [x.shape[-2] > x.shape[-1] for x in xs]
    return stacked.from_stack(self._ns(stacked.to_stack(xs, talls)), xs,
                              talls)


def muon(learning_rate: optax.ScalarOrSchedule, *, beta: float = 0.95,
         nesterov: bool = True, bias_correction: bool = False,
         ns_steps: int = 5, ns_coefficients: Coefficients | None = None,
         ns_dtype: Any = "float32", accumulate_fp32: bool = True,
         eps: float = 1e-7, scale: str = "shape", rms_scale: float = 0.2,
         weight_decay: float = 0.0, mu_dtype: Any | None = None,
         strategy: str = "stacked", mesh: Mesh | None = None,
         shardings: dict[str, NamedSharding | None] | None = None
         ) -> optax.GradientTransformation:
  """Muon as an Optax transformation (module docstring has the equations).

  Every leaf it sees must have ndim >= 2: the last two axes are the [in, out]
  matrix and any leading axes (scanned layers) a stack of independent
  matrices. Route vectors, embeddings and the output head elsewhere.

  Args:
    learning_rate: scalar or schedule of the step count (0-based).
    beta: momentum decay.
    nesterov: Nesterov momentum.
    bias_correction: Adam-style bias correction of the momentum (as
      `optax.contrib.muon`); off in Jordan's reference.
    ns_steps: Newton-Schulz iterations.
    ns_coefficients: `quintic` (None), `polar_express`, (a, b, c), or one
      triple per step (an (ns_steps, 3) table).
    ns_dtype: dtype of the NS iterate (float32 or bfloat16).
    accumulate_fp32: float32 accumulation of the NS matmuls.
    eps: added to the Frobenius norm before the iteration.
    scale: update scale mode, one of SCALE_MODES.
    rms_scale: target RMS factor for scale='rms_match'.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    mu_dtype: momentum dtype; None = the parameter's dtype.
    strategy: 'stacked' or 'gspmd' (module docstring).
    mesh: device mesh; None = taken from `shardings`, else unsharded.
    shardings: path name -> NamedSharding of each parameter
      (`leaf_shardings(abstract_params)`).

  Returns:
    An optax.GradientTransformation with MuonState.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"muon: strategy={strategy!r}; expected one of "
                     f"{STRATEGIES}")
  update_scale(1, 1, scale)  # validates the mode
  table = coefficient_schedule(ns_coefficients, ns_steps)
  shardings = dict(shardings or {})
  if mesh is None:
    meshes = {s.mesh for s in shardings.values() if s is not None}
    if len(meshes) > 1:
      raise ValueError("muon: parameters live on more than one mesh")
    mesh = meshes.pop() if meshes else None
  if mesh is not None and mesh.size == 1:
    mesh = None
  orthogonalize = _Orthogonalizer(
      strategy=strategy, mesh=mesh, shardings=shardings, table=table,
      dtype=jnp.dtype(ns_dtype), eps=eps, accumulate_fp32=accumulate_fp32)
  schedule = (learning_rate if callable(learning_rate)
              else (lambda _: learning_rate))

  def init_fn(params):
    def zeros(path, p):
      if p.ndim < 2:
        raise ValueError(
            f"muon: parameter {path_name(path)!r} has shape {p.shape}; Muon "
            "needs matrices (route vectors to another group)")
      return jnp.zeros(p.shape, mu_dtype or p.dtype)
    return MuonState(count=jnp.zeros([], jnp.int32),
                     mu=jax.tree_util.tree_map_with_path(zeros, params))

  def update_fn(updates, state, params=None):
    if weight_decay and params is None:
      raise ValueError("muon: weight_decay needs params in update()")
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)

    def momentum(g, m):
      return (beta * m.astype(jnp.float32)
              + (1 - beta) * g.astype(jnp.float32))
    mu32 = jax.tree.map(momentum, updates, state.mu)

    def direction(g, m):
      g = g.astype(jnp.float32)
      if not nesterov:
        return m / (1 - beta**t) if bias_correction else m
      if bias_correction:
        return beta * m / (1 - beta**(t + 1)) + (1 - beta) * g / (1 - beta**t)
      return beta * m + (1 - beta) * g
    dirs = jax.tree.map(direction, updates, mu32)

    flat, treedef = jax.tree_util.tree_flatten_with_path(dirs)
    names = [path_name(p) for p, _ in flat]
    orth = orthogonalize(names, [x for _, x in flat])
    lr = schedule(state.count)
    scaled = [
        o * update_scale(x.shape[-2], x.shape[-1], scale, rms_scale)
        for o, (_, x) in zip(orth, flat)]
    new = jax.tree_util.tree_unflatten(treedef, scaled)
    if weight_decay:
      new = jax.tree.map(lambda u, p: u + weight_decay * p.astype(u.dtype),
                         new, params)
    new = jax.tree.map(lambda u, g: (-lr * u).astype(g.dtype), new, updates)
    mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu32, state.mu)
    return new, MuonState(count=count, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def stacked_plan(params: Any, shardings: dict[str, NamedSharding | None], *,
                 ns_steps: int = 5) -> stacked.StackedPlan:
  """The `stacked` strategy's balanced plan for a Muon parameter tree.

  params: the Muon leaves (arrays or ShapeDtypeStructs); shardings: path
  name -> NamedSharding (`leaf_shardings`), all on one mesh. Per-device NS
  flops (`device_flops`, `max_over_mean`) and the all-to-all padding
  (`moved_over_needed`) of the step `muon(..., shardings=shardings)` runs.
  """
  meshes = {s.mesh for s in shardings.values() if s is not None}
  if len(meshes) != 1:
    raise ValueError(f"stacked_plan: needs one mesh, got {len(meshes)}")
  orth = _Orthogonalizer(
      strategy="stacked", mesh=meshes.pop(), shardings=dict(shardings),
      table=coefficient_schedule(None, ns_steps), dtype=jnp.float32, eps=0.0,
      accumulate_fp32=True)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  _, plan = orth.plan([path_name(p) for p, _ in flat],
                      [tuple(x.shape) for _, x in flat],
                      [x.dtype for _, x in flat])
  return plan
