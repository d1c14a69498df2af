"""Update geometry: where a finetuning update dW = W_ft - W_base points.

For every weight matrix W (kernels stored [in, out] as `y = x W`, so the LEFT
singular vectors live in the input space and the RIGHT ones in the output
space; the embedding [vocab, embed]; the head [embed, vocab]) and its update
dW, in float32:

* Subspace shares. With W_base = U S V^T and U_k, V_k its top-k singular
  vectors, the share of the update's energy inside them,
      both  = ||U_k^T dW V_k||_F^2 / ||dW||_F^2,
      left  = ||U_k^T dW||_F^2 / ||dW||_F^2,
      right = ||dW V_k||_F^2 / ||dW||_F^2,
  against what an isotropic random update of the same shape gets in
  expectation: k^2/(m n), k/m and k/n for W of shape [m, n] (for a Gaussian
  dW the share is Beta(k^2/2, (m n - k^2)/2) distributed, and likewise one
  sided). A share well above its baseline means the update reuses the
  directions the base model already amplifies. k = max(1, floor(f min(m, n)))
  for each fraction f (default 1%, 5%, 10%).
* Overlap with pretraining. With P = W_base - W_init (the pretraining
  displacement; the init is known for the project's own bases: `Llama(config,
  rngs=nnx.Rngs(seed))` reproduces it), Q1 and Q2 the top-r left (or right)
  singular vectors of dW and of P, the principal angles between the two
  subspaces are the arccosines of the singular values of Q1^T Q2 (Bjorck &
  Golub 1973, "Numerical methods for computing angles between linear
  subspaces", Math. Comp. 27); we report the mean squared cosine (1: the same
  subspace, 0: orthogonal; r/m (or r/n) expected for a random subspace).
  r takes the same sizes as k. Past the rank of dW (a LoRA update of rank
  16 against r = 409) its extra singular vectors are an arbitrary basis of
  the null space, so read the overlap at r <= rank(dW).
* Stable rank ||dW||_F^2 / ||dW||_2^2 and the spectral norm ||dW||_2: how
  many directions the update really uses. Biderman et al. 2024 ("LoRA Learns
  Less and Forgets Less", arXiv 2405.09673, sec. 5) show full-finetuning
  updates of Llama-2 are 10-100x higher rank than LoRA's; the same framing
  applies to AdamW vs Muon updates, whose orthogonalized steps spread energy
  over many directions (Jordan et al. 2024, Muon).

Routed experts (DeepSeek-V3's [L, E, m, n], model/moe.py) count
each expert's matrix as its own W and dW: they are decomposed as L * E
matrices and summarized per kind (expert_gate, expert_up, expert_down) like
the layers of any other kind; MLA's projections are kinds of their own
(q_a, q_b, kv_a, kv_b), as are the shared experts (shared_gate, ...) and the
router. Update norms, stable ranks and spectral norms of the expert kinds
are over every expert's matrix (an expert no token reached in finetuning
has no update and drops out of all but update_norm).

Layers stacked on a leading axis ([L, m, n], model/llama.py) are decomposed
in chunks (`lax.map` over chunks, batched SVDs inside). On a mesh a chunk
holds one layer per device and is spread over the devices, so each device
decomposes its own whole matrix (XLA partitions a batched SVD along its batch
axis; the reshard may gather the chunk first: chunk x m x n x 4 bytes per
device, 1.4 GB for 8 layers of a Llama-2-7B MLP kernel). A lone matrix (the
embedding, the head) and stacks with fewer layers than devices are gathered
and decomposed on every device: m n x 4 bytes plus the float32 factors,
about 4 (m n + (m + n) min(m, n)) bytes in all (1.6 GB for the 32000 x 4096
embedding).

`reference(...)` computes what depends only on the base (and init) once;
`update_geometry(...)` is then one SVD per matrix and checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from optconsist_jax import sharding

# param path -> matrix kind; layer kinds are stacked [L, in, out] (routed
# experts [L, E, in, out]). The Llama family's (model/llama.py):
MATRIX_KINDS: dict[str, str] = {
    "layers/attn/q_proj/kernel": "q", "layers/attn/k_proj/kernel": "k",
    "layers/attn/v_proj/kernel": "v", "layers/attn/o_proj/kernel": "o",
    "layers/mlp/gate_proj/kernel": "gate", "layers/mlp/up_proj/kernel": "up",
    "layers/mlp/down_proj/kernel": "down", "embed": "embed",
    "pos_embed": "pos_embed", "lm_head/kernel": "head",
}
# DeepSeek-V3's (model/deepseek_v3.py): MLA's projections in the dense and
# the MoE layers alike, the dense layers' MLP, the shared experts' MLP, each
# routed expert's matrices and the router. Hidden kinds are the ones the
# weight spectra cover (experiments/fingerprints.py): all but the router,
# the embedding and the head.
_MLA_KINDS = {"q_proj": "q", "q_a_proj": "q_a", "q_b_proj": "q_b",
              "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
              "o_proj": "o"}
for _stack in ("dense_layers", "moe_layers"):
  for _proj, _kind in _MLA_KINDS.items():
    MATRIX_KINDS[f"{_stack}/attn/{_proj}/kernel"] = _kind
for _kind in ("gate", "up", "down"):
  MATRIX_KINDS[f"dense_layers/mlp/{_kind}_proj/kernel"] = _kind
  MATRIX_KINDS[f"moe_layers/mlp/shared/{_kind}_proj/kernel"] = (
      f"shared_{_kind}")
  MATRIX_KINDS[f"moe_layers/mlp/{_kind}_proj"] = f"expert_{_kind}"
MATRIX_KINDS["moe_layers/mlp/router"] = "router"
NON_HIDDEN_KINDS = frozenset({"embed", "pos_embed", "head", "router"})
DEFAULT_FRACTIONS = (0.01, 0.05, 0.1)
_HI = jax.lax.Precision.HIGHEST


def subspace_size(fraction: float, shape: Sequence[int]) -> int:
  """k = max(1, floor(fraction * min(m, n))) for a matrix [..., m, n]."""
  return max(1, int(fraction * min(shape[-2:])))


def fraction_name(fraction: float) -> str:
  """'top5pct' for 0.05, 'top0.5pct' for 0.005."""
  return f"top{float(fraction) * 100:g}pct"


def pure_params(params: Any) -> dict[str, Any]:
  """{path name: array} of a model's nnx.Params, an nnx.State or a dict."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {sharding.path_name(p): x for p, x in flat}


def matrices(params: Any) -> dict[str, Any]:
  """{path name: matrix} of the MATRIX_KINDS present in `params`."""
  flat = pure_params(params)
  found = {k: v for k, v in flat.items() if k in MATRIX_KINDS}
  if not found:
    raise KeyError("probes: none of the weight matrices"
                   f" {sorted(MATRIX_KINDS)} in the params (expected a Llama"
                   f" or DeepSeek-V3 param tree; got {sorted(flat)[:5]})")
  return found


class MatrixReference(NamedTuple):
  """Top singular vectors of one base matrix (and of its displacement).

  Attributes:
    u_base_LMK, v_base_LNK: top-kmax left/right singular vectors of W_base.
    u_pre_LMR, v_pre_LNR: top-rmax ones of W_base - W_init; None without init.
  """

  u_base_LMK: jax.Array
  v_base_LNK: jax.Array
  u_pre_LMR: jax.Array | None
  v_pre_LNR: jax.Array | None


class Reference(NamedTuple):
  """`reference`'s output: per-matrix references and the fractions used."""

  matrices: dict[str, MatrixReference]
  fractions: tuple[float, ...]


def _stacked(w: jax.Array) -> jax.Array:
  """[m, n] -> [1, m, n]; [L, m, n] stays; [L, E, m, n] -> [L * E, m, n]."""
  if w.ndim not in (2, 3, 4):
    raise ValueError(f"probes: expected a matrix or a stack of matrices, got"
                     f" shape {w.shape}")
  return w.reshape(-1, *w.shape[-2:])


def num_matrices(shape: Sequence[int]) -> int:
  """How many matrices a (stacked) weight of `shape` holds."""
  return int(np.prod(shape[:-2], dtype=np.int64))


class _Layout(NamedTuple):
  """How to walk a stacked layer axis: `chunk` layers at a time (batched),
  the chunk's layers spread over the devices by `spread` (or None)."""

  chunk: int
  spread: jax.sharding.NamedSharding | None


def _layout(w: Any, layer_batch: int | None) -> _Layout:
  """Chunks of one layer per device when `w` lives on a mesh.

  A replicated SVD would run on every device at once; spreading a chunk's
  layers over the devices gives each device its own matrices (XLA
  partitions the batched decomposition along its batch axis).
  """
  layers = num_matrices(w.shape)
  s = getattr(w, "sharding", None)
  mesh = s.mesh if isinstance(s, jax.sharding.NamedSharding) else None
  devices = 1 if mesh is None else mesh.size
  chunk = layer_batch or devices
  if devices == 1 or chunk % devices or layers < devices:
    return _Layout(min(chunk, layers), None)  # replicated (XLA gathers)
  return _Layout(chunk, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names))))


def _map_layers(fn, xs: Any, layout: _Layout) -> Any:
  """vmap(fn) over the leading axis of `xs`, `layout.chunk` layers at a time.

  Chunks run one after another (`lax.map`), so memory holds one chunk's
  gathered matrices; a short last chunk is padded with zeros.
  """
  layers = jax.tree.leaves(xs)[0].shape[0]
  chunk = layout.chunk
  pad = -layers % chunk

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a
    return a.reshape(-1, chunk, *a.shape[1:])

  def body(x):
    if layout.spread is not None:
      x = jax.tree.map(
          lambda a: jax.lax.with_sharding_constraint(a, layout.spread), x)
    return jax.vmap(fn)(x)
  out = jax.lax.map(body, jax.tree.map(split, xs))
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:layers], out)


def _top_vectors(w_MN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  u_MR, _, vt_RN = jnp.linalg.svd(w_MN, full_matrices=False)
  return u_MR[:, :k], vt_RN[:k].T


@functools.partial(jax.jit, static_argnames=("fractions", "layout"))
def _matrix_reference(w_base, w_init, fractions, layout):
  w_base = _stacked(w_base).astype(jnp.float32)
  kmax = max(subspace_size(f, w_base.shape) for f in fractions)

  def one(xs):
    wb, wi = xs
    u, v = _top_vectors(wb, kmax)
    if wi is None:
      return u, v, None, None
    up, vp = _top_vectors(wb - wi, kmax)
    return u, v, up, vp
  w_init = None if w_init is None else _stacked(w_init).astype(jnp.float32)
  return MatrixReference(*_map_layers(one, (w_base, w_init), layout))


def reference(base: Any, init: Any | None = None, *,
              fractions: Sequence[float] = DEFAULT_FRACTIONS,
              layer_batch: int | None = None) -> Reference:
  """The base's (and pretraining displacement's) top singular vectors.

  Args:
    base: the base model, its nnx.Param state or pure dict.
    init: the base's initialization (same tree), or None: no overlap probe.
    fractions: subspace sizes as fractions of min(m, n).
    layer_batch: layers decomposed at once along a stacked layer axis
      (None: one per device of the params' mesh, 1 without one).
  """
  fractions = tuple(float(f) for f in fractions)
  if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"probes: fractions {fractions} must be in (0, 1]")
  base_w = matrices(base)
  init_w = None if init is None else matrices(init)
  out = {}
  for name, w in base_w.items():
    wi = None
    if init_w is not None:
      if name not in init_w or init_w[name].shape != w.shape:
        raise ValueError(f"probes: the init params have no {name!r} of shape"
                         f" {w.shape}")
      wi = init_w[name]
    out[name] = _matrix_reference(w, wi, fractions,
                                  _layout(w, layer_batch))
  return Reference(out, fractions)


def _principal_cos2(q1_MR: jax.Array, q2_MR: jax.Array) -> jax.Array:
  """Mean squared cosine of the principal angles of two orthonormal bases."""
  cos_R = jnp.linalg.svd(jnp.matmul(q1_MR.T, q2_MR, precision=_HI),
                         compute_uv=False)
  return jnp.mean(jnp.square(jnp.clip(cos_R, 0.0, 1.0)))


def principal_overlap(a_MN: jax.Array, b_MN: jax.Array, r: int, *,
                      side: str = "left") -> jax.Array:
  """Mean cos^2 of the principal angles of the top-r singular subspaces."""
  if side not in ("left", "right"):
    raise ValueError(f"principal_overlap: side={side!r}; left or right")
  if side == "right":
    a_MN, b_MN = a_MN.T, b_MN.T
  qa, _ = _top_vectors(a_MN.astype(jnp.float32), r)
  qb, _ = _top_vectors(b_MN.astype(jnp.float32), r)
  return _principal_cos2(qa, qb)


@functools.partial(jax.jit, static_argnames=("fractions", "layout"))
def _matrix_update(ref: MatrixReference, w_base, w_ft, fractions,
                   layout) -> dict[str, jax.Array]:
  """Per-layer energies, spectra and overlaps of dW = w_ft - w_base."""
  w_base = _stacked(w_base).astype(jnp.float32)
  w_ft = _stacked(w_ft).astype(jnp.float32)
  ks = [subspace_size(f, w_base.shape) for f in fractions]

  def one(xs):
    ub, vb, up, vp, wb, wf = xs
    d = wf - wb
    out = {"energy": jnp.sum(d * d)}
    a_KN = jnp.matmul(ub.T, d, precision=_HI)
    b_MK = jnp.matmul(d, vb, precision=_HI)
    c_KK = jnp.matmul(a_KN, vb, precision=_HI)
    left_K = jnp.cumsum(jnp.sum(a_KN * a_KN, axis=1))
    right_K = jnp.cumsum(jnp.sum(b_MK * b_MK, axis=0))
    u_d, s_d, vt_d = jnp.linalg.svd(d, full_matrices=False)
    out["spectral"] = s_d[0]
    for f, k in zip(fractions, ks):
      name = fraction_name(f)
      out[f"both/{name}"] = jnp.sum(jnp.square(c_KK[:k, :k]))
      out[f"left/{name}"] = left_K[k - 1]
      out[f"right/{name}"] = right_K[k - 1]
      if up is not None:
        out[f"pre_left/{name}"] = _principal_cos2(u_d[:, :k], up[:, :k])
        out[f"pre_right/{name}"] = _principal_cos2(vt_d[:k].T, vp[:, :k])
    return out
  return _map_layers(one, (*ref, w_base, w_ft), layout)


def matrix_update(ref: MatrixReference, w_base: Any, w_ft: Any,
                  fractions: Sequence[float], *,
                  layer_batch: int | None = None) -> dict[str, np.ndarray]:
  """Per-layer numbers of one (stacked) matrix's update, float64 [L].

  Keys: energy ||dW||_F^2; spectral ||dW||_2; both/top..., left/top...,
  right/top... the energy inside the base's top-k subspaces; pre_left/...,
  pre_right/... the mean cos^2 of the principal angles with the pretraining
  displacement (when `ref` has it). Divide the energies by `energy` for
  shares.
  """
  out = _matrix_update(ref, w_base, w_ft, tuple(fractions),
                       _layout(w_base, layer_batch))
  return {k: np.asarray(jax.device_get(v), np.float64) for k, v in out.items()}


def update_geometry(ref: Reference, base: Any, finetuned: Any, *,
                    layer_batch: int | None = None) -> dict[str, float]:
  """The geometry probes of `finetuned` against `base`, as flat scalars.

  Per kind (MATRIX_KINDS' values present: q, k, v, o, gate, up, down, embed,
  pos_embed, head; DeepSeek-V3's q_a, q_b, kv_a, kv_b, shared_*, expert_*,
  router) and "all":
    probe/update_norm/K                 sqrt(sum of ||dW||_F^2)
    probe/share_topXpct[_left|_right]/K energy inside the base's top-k
                                         subspaces / total energy
    probe/share_topXpct[...]_random/K   the same for a random update
    probe/stable_rank/K, probe/spectral_norm/K   mean over matrices
    probe/pretrain_overlap_topXpct_{left,right}[_random]/K
                                         mean cos^2 of the principal angles
                                         (only with an init in `ref`)
  Shares over several matrices are energy weighted (sum of in-subspace
  energies / sum of energies); so are their baselines. Matrices with no
  update are left out of every number but update_norm (a LoRA run leaves
  the embedding alone); a kind with none has only update_norm.
  """
  base_w, ft_w = matrices(base), matrices(finetuned)
  missing = sorted(set(ref.matrices) - set(ft_w))
  if missing or set(base_w) != set(ref.matrices):
    raise ValueError(f"probes: the finetuned params lack {missing} or the"
                     " base is not the one `reference` was computed for")
  per_kind: dict[str, list[tuple[dict[str, np.ndarray], tuple[int, int]]]] = {}
  for name, r in ref.matrices.items():
    if ft_w[name].shape != base_w[name].shape:
      raise ValueError(f"probes: {name!r} has shape {ft_w[name].shape} in the"
                       f" finetuned params, {base_w[name].shape} in the base")
    nums = matrix_update(r, base_w[name], ft_w[name], ref.fractions,
                         layer_batch=layer_batch)
    per_kind.setdefault(MATRIX_KINDS[name], []).append(
        (nums, tuple(base_w[name].shape[-2:])))
  out: dict[str, float] = {}
  everything = [x for v in per_kind.values() for x in v]
  for kind, entries in [*per_kind.items(), ("all", everything)]:
    out.update(_summarize(kind, entries, ref.fractions))
  return out


def _summarize(kind: str, entries, fractions) -> dict[str, float]:
  """Aggregates per-layer numbers of matrices of one kind (see above)."""
  energy = np.concatenate([e["energy"] for e, _ in entries])
  out = {f"probe/update_norm/{kind}": float(np.sqrt(energy.sum()))}
  live = energy > 0
  if not live.any():
    return out

  def cat(key):
    return np.concatenate([e[key] for e, _ in entries])[live]

  def const(fn):
    return np.concatenate([np.full_like(e["energy"], fn(m, n))
                           for e, (m, n) in entries])[live]

  e_live = energy[live]
  spectral = cat("spectral")
  out[f"probe/stable_rank/{kind}"] = float(np.mean(e_live / spectral**2))
  out[f"probe/spectral_norm/{kind}"] = float(np.mean(spectral))
  for f in fractions:
    name = fraction_name(f)
    baselines = {
        "both": lambda m, n, f=f: subspace_size(f, (m, n)) ** 2 / (m * n),
        "left": lambda m, n, f=f: subspace_size(f, (m, n)) / m,
        "right": lambda m, n, f=f: subspace_size(f, (m, n)) / n,
    }
    for side, baseline in baselines.items():
      key = f"probe/share_{name}" + ("" if side == "both" else f"_{side}")
      out[f"{key}/{kind}"] = float(cat(f"{side}/{name}").sum() / e_live.sum())
      out[f"{key}_random/{kind}"] = float(
          np.sum(const(baseline) * e_live) / e_live.sum())
    if f"pre_left/{name}" in entries[0][0]:
      for side in ("left", "right"):
        key = f"probe/pretrain_overlap_{name}_{side}"
        out[f"{key}/{kind}"] = float(np.mean(cat(f"pre_{side}/{name}")))
        out[f"{key}_random/{kind}"] = float(np.mean(const(baselines[side])))
  return out
