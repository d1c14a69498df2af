"""Muon and Newton-Schulz: numpy reference, optax.contrib.muon, 8-device layouts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optconsist_jax.model import preset
from optconsist_jax.model.llama import abstract_model
from optconsist_jax.optim import muon as muon_lib
from optconsist_jax.optim import ns_coefficients as ns
from optconsist_jax.sharding import leaf_shardings

COEFFS = (3.4445, -4.7750, 2.0315)


def numpy_newton_schulz(g, steps=5, coeffs=COEFFS, eps=1e-7):
  """Independent reference: float64, one matrix at a time, explicit loop."""
  g = np.asarray(g, np.float64)
  out = np.empty_like(g)
  for idx in np.ndindex(*g.shape[:-2]):
    x = g[idx]
    tall = x.shape[0] > x.shape[1]
    if tall:
      x = x.T
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = coeffs
    for _ in range(steps):
      gram = x @ x.T
      x = a * x + (b * gram + c * gram @ gram) @ x
    out[idx] = x.T if tall else x
  return out


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32), (3, 24, 40),
                                   (2, 2, 40, 24)])
def test_newton_schulz_matches_numpy(shape):
  g = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = muon_lib.newton_schulz(jnp.asarray(g))
  assert got.shape == g.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), numpy_newton_schulz(g),
                             atol=1e-5, rtol=1e-5)


def test_newton_schulz_per_step_coefficients():
  table = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5), COEFFS]
  g = np.random.default_rng(1).normal(size=(12, 20)).astype(np.float32)
  got = muon_lib.newton_schulz(jnp.asarray(g), steps=3, coefficients=table)
  x = g.astype(np.float64) / (np.linalg.norm(g) + 1e-7)
  for a, b, c in table:
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  np.testing.assert_allclose(np.asarray(got), x, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 128),
                                   (64, 64)])
@pytest.mark.parametrize("condition", [30.0, 100.0])
def test_newton_schulz_singular_value_band(shape, condition):
  # Jordan's quintic does not converge to 1 but into a band around it: with
  # singular values log-spaced over a condition number up to 100, 5 steps
  # put every output singular value in [0.65, 1.25] (observed 0.68..1.20).
  rng = np.random.default_rng(2)
  m, n = shape
  k = min(m, n)
  u, _ = np.linalg.qr(rng.normal(size=(m, k)))
  v, _ = np.linalg.qr(rng.normal(size=(n, k)))
  g = (u * np.logspace(0, np.log10(condition), k)) @ v.T
  s = np.linalg.svd(np.asarray(muon_lib.newton_schulz(
      jnp.asarray(g, jnp.float32))), compute_uv=False)
  assert s.shape == (k,)
  assert 0.65 < s.min() and s.max() < 1.25, (s.min(), s.max())


def test_newton_schulz_bf16_with_fp32_accumulation():
  g = np.random.default_rng(3).normal(size=(2, 32, 64)).astype(np.float32)
  got = muon_lib.newton_schulz(jnp.asarray(g, jnp.bfloat16),
                               dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             numpy_newton_schulz(g), atol=0.05)


def test_newton_schulz_bad_input():
  with pytest.raises(ValueError, match="needs a matrix"):
    muon_lib.newton_schulz(jnp.ones(5))
  with pytest.raises(ValueError, match="coefficient triples"):
    muon_lib.newton_schulz(jnp.ones((2, 3)), steps=2,
                           coefficients=[COEFFS] * 3)


def _tree(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  shapes = {"wide": (24, 40), "tall": (40, 24), "square": (32, 32),
            "stacked": (3, 24, 40)}
  return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("scale,consistent_rms", [("shape", None),
                                                  ("rms_match", 0.2)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_optax_contrib_muon(scale, consistent_rms, nesterov):
  # Same algorithm when our momentum uses optax's bias correction and eps;
  # stacked leaves are L matrices for both (dimension numbers -2, -1).
  params = _tree(0)
  lr, wd = 0.03, 0.1
  ours = muon_lib.muon(lr, beta=0.95, nesterov=nesterov, bias_correction=True,
                       eps=1e-8, scale=scale, weight_decay=wd,
                       strategy="stacked")
  theirs = optax.contrib.muon(
      lr, beta=0.95, nesterov=nesterov, eps=1e-8, weight_decay=wd,
      consistent_rms=consistent_rms,
      muon_weight_dimension_numbers=lambda p: jax.tree.map(
          lambda _: optax.contrib.MuonDimensionNumbers(-2, -1), p))
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
  p_ours = p_theirs = params
  for step in range(3):
    grads = _tree(10 + step)
    u_ours, s_ours = update_ours(grads, s_ours, p_ours)
    u_theirs, s_theirs = update_theirs(grads, s_theirs, p_theirs)
    for k in params:
      np.testing.assert_allclose(u_ours[k], u_theirs[k], atol=1e-6,
                                 err_msg=f"step {step} leaf {k}")
    p_ours = optax.apply_updates(p_ours, u_ours)
    p_theirs = optax.apply_updates(p_theirs, u_theirs)


def test_default_momentum_is_jordan_reference():
  # Jordan's PyTorch Muon: buf = beta*buf + g; u = g + beta*buf (Nesterov),
  # orthogonalized, times sqrt(max(1, fan_out/fan_in)) for [in, out] kernels.
  params = _tree(0)
  tx = muon_lib.muon(1.0, scale="shape")
  state = tx.init(params)
  update = jax.jit(tx.update)
  buf = {k: np.zeros(v.shape) for k, v in params.items()}
  for step in range(3):
    grads = _tree(20 + step)
    updates, state = update(grads, state, params)
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      buf[k] = 0.95 * buf[k] + g
      ref = -numpy_newton_schulz(g + 0.95 * buf[k])
      ref *= np.sqrt(max(1.0, g.shape[-1] / g.shape[-2]))
      np.testing.assert_allclose(updates[k], ref, atol=2e-5, err_msg=k)


def test_state_dtypes_preserved_and_no_recompile():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(0))
  tx = muon_lib.muon(0.01, weight_decay=0.1, ns_dtype="bfloat16")
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  dtypes = jax.tree.map(lambda x: x.dtype, state)
  for seed in range(2):
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(5 + seed))
    params, state = step(params, state, grads)
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert len(traces) == 1 and step._cache_size() == 1
  assert state.count.dtype == jnp.int32 and int(state.count) == 2

  f32 = muon_lib.muon(0.01, mu_dtype="float32").init(params)
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(f32.mu))


def test_muon_rejects_vectors_and_bad_options():
  with pytest.raises(ValueError, match="'bias'"):
    muon_lib.muon(0.1).init({"bias": jnp.ones(4)})
  with pytest.raises(ValueError, match="strategy"):
    muon_lib.muon(0.1, strategy="magic")
  with pytest.raises(ValueError, match="scale"):
    muon_lib.muon(0.1, scale="huge")


# --- 8 fake devices ------------------------------------------------------

LAYOUTS = {
    # mesh shape, axis names, logical name -> mesh axis
    "fsdp": ((8,), ("fsdp",), {"embed": "fsdp"}),
    "fsdp_x_tensor": ((4, 2), ("fsdp", "tensor"),
                      {"embed": "fsdp", "heads": "tensor",
                       "kv_heads": "tensor", "mlp": "tensor"}),
    # 'data' shards no weight: the stacked strategy slices its stack there.
    "data_x_fsdp": ((2, 4), ("data", "fsdp"), {"embed": "fsdp"}),
}


def _hidden_matrices(num_layers):
  config = preset("tiny_gqa").replace(num_layers=num_layers)
  state = nnx.state(abstract_model(config), nnx.Param)
  specs = nnx.get_partition_spec(state)
  flat = {}
  for (path, leaf), (_, spec) in zip(
      jax.tree_util.tree_flatten_with_path(state)[0],
      jax.tree_util.tree_flatten_with_path(
          specs, is_leaf=lambda x: isinstance(x, P))[0]):
    name = "/".join(str(k.key) for k in path
                    if isinstance(k, jax.tree_util.DictKey))
    if name.startswith("layers/") and len(leaf.shape) == 3:
      flat[name] = (leaf.shape, tuple(spec))
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, (s, _) in flat.items()}
  return params, {k: n for k, (_, n) in flat.items()}


def _place(params, names, layout):
  shape, axes, rules = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, axes,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  shardings = {k: NamedSharding(mesh, P(*(rules.get(n) for n in names[k])))
               for k in params}
  return mesh, {k: jax.device_put(v, shardings[k]) for k, v in params.items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("strategy,num_layers", [
    ("stacked", 3), ("stacked", 5), ("gspmd", 3)])
def test_sharded_strategies_equal_unsharded(layout, strategy, num_layers):
  # 3 layers: 3 q, 3 o, 6 k/v, 9 gate/up/down on 8 devices; 5 layers: 5, 5,
  # 10, 15. No count divides 8: padding and cross-group balancing.
  params, names = _hidden_matrices(num_layers)
  grads = jax.tree.map(lambda x: 0.5 * x[::-1], params)
  tx_ref = muon_lib.muon(0.1, weight_decay=0.1)
  ref, _ = jax.jit(tx_ref.update)(grads, tx_ref.init(params), params)
  mesh, sharded = _place(params, names, layout)
  sharded_grads = jax.tree.map(
      lambda g, p: jax.device_put(g, p.sharding), grads, sharded)
  tx = muon_lib.muon(0.1, weight_decay=0.1, strategy=strategy, mesh=mesh,
                     shardings=leaf_shardings(sharded))
  got, state = jax.jit(tx.update)(sharded_grads, tx.init(sharded), sharded)
  for k in params:
    np.testing.assert_allclose(got[k], ref[k], atol=1e-5, err_msg=k)
    assert got[k].sharding.is_equivalent_to(sharded[k].sharding, 3), k
    assert state.mu[k].sharding.is_equivalent_to(sharded[k].sharding, 3), k


def _computations(hlo: str) -> dict[str, str]:
  comps, name, lines = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, lines = m.group(1), []
    elif line.startswith("}") and name:
      comps[name] = "\n".join(lines)
      name = None
    elif name:
      lines.append(line)
  return comps


def _loop_bodies_text(hlo: str) -> str:
  """Text of every while-loop body and what those bodies call."""
  comps = _computations(hlo)
  todo = [b for body in comps.values()
          for b in re.findall(r"while\(.*?body=%?([\w.\-]+)", body)]
  assert todo, "no while loop in the compiled update"
  seen = set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo += re.findall(
        r"(?:to_apply|body|condition|calls|branch_computations)="
        r"\{?%?([\w.\-]+)", comps[c])
  return "\n".join(comps[c] for c in seen)


def _compiled_update(strategy, layout, num_layers):
  params, names = _hidden_matrices(num_layers)
  mesh, sharded = _place(params, names, layout)
  tx = muon_lib.muon(0.1, strategy=strategy, mesh=mesh,
                     shardings=leaf_shardings(sharded))
  state = tx.init(sharded)
  return jax.jit(tx.update).lower(sharded, state).compile()


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_x_tensor"])
def test_stacked_hlo_has_no_collective_inside_loop(layout):
  hlo = _compiled_update("stacked", layout, 3).as_text()
  assert "all-to-all" in hlo
  body = _loop_bodies_text(hlo)
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute",
             "reduce-scatter"):
    assert op not in body, op
  # The check can fail: the gspmd strategy all-reduces inside its loop.
  gspmd_body = _loop_bodies_text(
      _compiled_update("gspmd", layout, 3).as_text())
  assert "all-reduce" in gspmd_body or "all-gather" in gspmd_body


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_stacked_per_device_flops_is_total_over_8():
  # 8 layers: 16, 16 and 24 matrices per shape group, all multiples of 8.
  params, _ = _hidden_matrices(8)
  tx = muon_lib.muon(0.1)
  total = _flops(jax.jit(tx.update).lower(params, tx.init(params)).compile())
  per_device = _flops(_compiled_update("stacked", "fsdp_x_tensor", 8))
  assert 0.11 < per_device / total < 0.15, per_device / total


# ---------------------------------------------------------------------------
# Newton-Schulz coefficient schedules: quintic vs Polar Express.


def _spread_matrices(rng, k=4, m=64, n=128):
  """k random m x n matrices, singular values log-spaced in [1e-3, 1]."""
  out = []
  for _ in range(k):
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    out.append((u * np.logspace(-3, 0, m)) @ v.T)
  return np.stack(out)


def _errors(g, schedule, dtype, steps=10):
  """Per-iteration max over matrices of ||NS_k(g) - U V^T||_F / sqrt(m)."""
  u, _, vt = np.linalg.svd(g, full_matrices=False)  # numpy's polar factor
  table = muon_lib.coefficient_schedule(schedule, steps)
  out = []
  for k in range(1, steps + 1):
    o = np.asarray(muon_lib.newton_schulz(
        jnp.asarray(g, jnp.float32), steps=k, coefficients=table[:k],
        dtype=dtype), np.float64)
    out.append(float(np.max(np.linalg.norm(o - u @ vt, axis=(1, 2))
                            / np.sqrt(g.shape[1]))))
  return np.array(out)


def _first_step_below(errors, tol):
  hits = np.flatnonzero(errors < tol)
  return int(hits[0]) + 1 if hits.size else None


@pytest.mark.parametrize("dtype,tol,pe_steps", [("float32", 0.1, 6),
                                                ("bfloat16", 0.15, 6)])
def test_polar_express_orthogonalizes_in_fewer_steps(dtype, tol, pe_steps):
  g = _spread_matrices(np.random.default_rng(0))
  quintic = _errors(g, "quintic", dtype)
  polar = _errors(g, "polar_express", dtype)
  # Jordan's quintic keeps singular values in ~[0.7, 1.2]: it never gets
  # within `tol` of the polar factor in 10 steps; Polar Express does.
  assert _first_step_below(quintic, tol) is None, quintic
  assert _first_step_below(polar, tol) <= pe_steps, polar
  if dtype == "float32":
    assert polar[7] < 1e-3, polar  # and converges (fp32)


def test_polar_express_steps_are_minimax_on_their_interval():
  lo, hi = 0.05, 1.0
  a, b, c, err = ns.minimax_odd_quintic(lo, hi)
  x = np.linspace(lo, hi, 200001)
  dev = 1 - (a * x + b * x**3 + c * x**5)
  assert np.max(np.abs(dev)) == pytest.approx(err, rel=1e-6)
  # Equioscillation: +E at lo, -E at hi, and two interior extrema.
  assert dev[0] == pytest.approx(err) and dev[-1] == pytest.approx(-err)
  # A perturbed polynomial is worse (minimax optimality, locally).
  for d in np.eye(3) * 1e-3:
    pa, pb, pc = a + d[0], b + d[1], c + d[2]
    assert np.max(np.abs(1 - (pa * x + pb * x**3 + pc * x**5))) > err


def test_coefficient_schedule_accepts_names_and_tables():
  q = muon_lib.coefficient_schedule("quintic", 3)
  np.testing.assert_allclose(q, [[3.4445, -4.7750, 2.0315]] * 3, rtol=1e-6)
  pe = muon_lib.coefficient_schedule("polar_express", 5)
  assert pe.shape == (5, 3) and len({tuple(r) for r in pe}) == 5
  table = [[3.0, -3.0, 1.0], [2.0, -1.5, 0.5]]
  np.testing.assert_allclose(muon_lib.coefficient_schedule(table, 2), table)
  with pytest.raises(ValueError, match="polar_express"):
    muon_lib.coefficient_schedule("cubic", 2)


@pytest.mark.parametrize("fan_in,fan_out", [(64, 256), (256, 64), (96, 96)])
def test_rms_match_scale_gives_update_rms_0_2(fan_in, fan_out):
  """Moonlight's 0.2 sqrt(max(m, n)) on an orthogonal update (numpy's polar
  factor) has RMS 0.2; Jordan's shape scale is sqrt(max(1, out / in))."""
  g = np.random.default_rng(1).standard_normal((fan_in, fan_out))
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  rms = np.sqrt(np.mean((u @ vt)**2))
  scale = muon_lib.update_scale(fan_in, fan_out, "rms_match")
  assert scale * rms == pytest.approx(0.2, rel=1e-9)
  assert muon_lib.update_scale(fan_in, fan_out, "shape") == pytest.approx(
      np.sqrt(max(1.0, fan_out / fan_in)))
