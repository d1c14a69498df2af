"""Update probes against independent references.

Subspace shares against numpy SVDs and planted updates with known answers, a
Gaussian update against its exact Beta distribution, principal angles
against scipy, the Hessian-vector product against a dense jax.hessian and
finite differences of gradients, the second-order prediction's O(step^3)
error, activation drift against numpy on the captured residual streams, and
a sharded run against one device.
"""

import time

from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
import residual_spy
import scipy.linalg

from optconsist_jax import sharding
from optconsist_jax.evaluate import probes
from optconsist_jax.evaluate import probes_geometry as geometry
from optconsist_jax.model import lora as lora_lib
from optconsist_jax.model import preset
from optconsist_jax.model.llama import make_model

# One layer, hidden 16: ~4k params.
_MICRO = preset("tiny_mha").replace(vocab_size=32, num_layers=1,
                                    hidden_size=16, intermediate_size=32,
                                    num_heads=2, num_kv_heads=1)
# ~900 params: a dense Hessian in a few seconds.
_NANO = _MICRO.replace(vocab_size=16, hidden_size=8, intermediate_size=16)


def _orthonormal(rng, m):
  return np.linalg.qr(rng.normal(size=(m, m)))[0]


def _kernel_tree(w):
  return {"layers": {"attn": {"q_proj": {"kernel": w}}}}


def _np_top(w, k):
  u, _, vt = np.linalg.svd(w)
  return u[:, :k], vt[:k].T


def _batch(config, rows=4, length=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, config.vocab_size,
                                                (rows, length + 1))
  return probes.lm_batch(tokens)


def _perturbed(params, scale, seed):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(
      lambda a: a + scale * jax.random.normal(next(keys), a.shape, a.dtype),
      params)


def test_shares_angles_and_spectra_match_numpy_and_planted_answers():
  rng = np.random.default_rng(0)
  m, n, k = 40, 32, 3  # k = floor(0.1 * 32)
  layers = 4
  w_base = np.stack([_orthonormal(rng, m)[:, :n] @ np.diag(
      np.linspace(3.0, 0.1, n)) @ _orthonormal(rng, n).T
                     for _ in range(layers)])
  w_init = w_base - rng.normal(size=w_base.shape)
  u0, v0 = _np_top(w_base[0], n)
  u1, v1 = _np_top(w_base[1], n)
  x = rng.normal(size=(k, k))
  d = rng.normal(size=w_base.shape)
  d[0] = u0[:, :k] @ x @ v0[:, :k].T  # inside the top-k subspaces
  d[1] = u1[:, k:n] @ rng.normal(size=(n - k, n - k)) @ v1[:, k:].T  # outside
  w_ft = w_base + d
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  ref = geometry.reference(_kernel_tree(f32(w_base)),
                           _kernel_tree(f32(w_init)), fractions=(0.1,))
  (mref,) = ref.matrices.values()
  got = geometry.matrix_update(mref, f32(w_base), f32(w_ft), (0.1,),
                               layer_batch=3)
  shares = {s: got[f"{s}/top10pct"] / got["energy"]
            for s in ("both", "left", "right")}
  np.testing.assert_allclose([shares[s][0] for s in shares], 1.0, atol=1e-5)
  np.testing.assert_allclose([shares[s][1] for s in shares], 0.0, atol=1e-5)
  for l in range(layers):
    u, v = _np_top(w_base[l], k)
    e = np.sum(d[l] ** 2)
    assert got["energy"][l] == pytest.approx(e, rel=1e-4)
    assert shares["both"][l] == pytest.approx(
        np.sum((u.T @ d[l] @ v) ** 2) / e, rel=1e-3, abs=1e-6)
    assert shares["left"][l] == pytest.approx(
        np.sum((u.T @ d[l]) ** 2) / e, rel=1e-3, abs=1e-6)
    assert shares["right"][l] == pytest.approx(
        np.sum((d[l] @ v) ** 2) / e, rel=1e-3, abs=1e-6)
    assert got["spectral"][l] == pytest.approx(np.linalg.norm(d[l], 2),
                                               rel=1e-4)
    # Principal angles (scipy) of the top-k subspaces of dW and W_base-W_init.
    ud, vd = _np_top(d[l], k)
    up, vp = _np_top(w_base[l] - w_init[l], k)
    for side, a, b in (("left", ud, up), ("right", vd, vp)):
      cos = np.cos(scipy.linalg.subspace_angles(a, b))
      assert got[f"pre_{side}/top10pct"][l] == pytest.approx(
          np.mean(cos**2), abs=1e-4), (side, l)

  out = geometry.update_geometry(ref, _kernel_tree(f32(w_base)),
                                 _kernel_tree(f32(w_ft)))
  e_l = np.sum(d**2, axis=(1, 2))
  s_l = np.array([np.linalg.norm(x, 2) for x in d])
  assert out["probe/update_norm/q"] == pytest.approx(np.sqrt(e_l.sum()),
                                                     rel=1e-4)
  assert out["probe/stable_rank/q"] == pytest.approx(np.mean(e_l / s_l**2),
                                                     rel=1e-3)
  assert out["probe/spectral_norm/q"] == pytest.approx(np.mean(s_l), rel=1e-4)
  # Energy weighted over layers, baselines k^2/(mn), k/m, k/n.
  assert out["probe/share_top10pct/q"] == pytest.approx(
      np.sum(shares["both"] * e_l) / e_l.sum(), rel=1e-4)
  assert out["probe/share_top10pct_random/q"] == pytest.approx(k * k / (m * n))
  assert out["probe/share_top10pct_left_random/q"] == pytest.approx(k / m)
  assert out["probe/share_top10pct_right_random/q"] == pytest.approx(k / n)
  assert out["probe/pretrain_overlap_top10pct_left_random/all"] == (
      pytest.approx(k / m))
  assert out["probe/share_top10pct/all"] == pytest.approx(
      out["probe/share_top10pct/q"])  # q is the only matrix


def test_each_routed_expert_is_its_own_matrix():
  """DeepSeek-V3's [L, E, m, n] expert stacks: one dW per (layer, expert)."""
  rng = np.random.default_rng(3)
  layers, experts, m, n = 2, 3, 12, 10
  w_base = rng.normal(size=(layers, experts, m, n))
  d = np.zeros_like(w_base)
  d[0, 1] = np.outer(rng.normal(size=m), rng.normal(size=n))  # rank 1
  d[1, 2] = rng.normal(size=(m, n))  # full rank
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  tree = lambda w: {"moe_layers": {"mlp": {"up_proj": f32(w)}}}
  ref = geometry.reference(tree(w_base), fractions=(0.1,))
  out = geometry.update_geometry(ref, tree(w_base), tree(w_base + d))
  live = [d[0, 1], d[1, 2]]  # experts no update reached drop out
  e = np.array([np.sum(x**2) for x in live])
  s = np.array([np.linalg.norm(x, 2) for x in live])
  assert out["probe/update_norm/expert_up"] == pytest.approx(
      np.sqrt(e.sum()), rel=1e-4)
  assert out["probe/stable_rank/expert_up"] == pytest.approx(
      np.mean(e / s**2), rel=1e-3)
  assert out["probe/spectral_norm/expert_up"] == pytest.approx(np.mean(s),
                                                               rel=1e-4)
  # Per matrix, layer-major: the same numbers as one [L * E] stack.
  (mref,) = ref.matrices.values()
  got = geometry.matrix_update(mref, f32(w_base), f32(w_base + d), (0.1,))
  np.testing.assert_allclose(got["energy"],
                             np.sum(d**2, axis=(2, 3)).reshape(-1),
                             rtol=1e-4, atol=1e-6)


def test_gaussian_update_share_matches_its_random_baseline():
  """sum_l ||U_k^T G_l V_k||^2 / sum_l ||G_l||^2 ~ Beta(L k^2/2, L(mn-k^2)/2)."""
  rng = np.random.default_rng(1)
  draws, m, n = 16, 128, 96
  w_base = jnp.asarray(rng.normal(size=(draws, m, n)), jnp.float32)
  w_ft = w_base + jnp.asarray(rng.normal(size=(draws, m, n)), jnp.float32)
  ref = geometry.reference(_kernel_tree(w_base), fractions=(0.1,))
  out = geometry.update_geometry(ref, _kernel_tree(w_base), _kernel_tree(w_ft))
  k = 9
  for key, (a, b) in {
      "probe/share_top10pct/q": (k * k, m * n - k * k),
      "probe/share_top10pct_left/q": (k * n, (m - k) * n),
      "probe/share_top10pct_right/q": (k * m, m * (n - k)),
  }.items():
    a, b = draws * a / 2, draws * b / 2
    mean = a / (a + b)
    std = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert out[key.replace("/q", "_random/q")] == pytest.approx(mean)
    assert abs(out[key] - mean) < 4 * std, (key, out[key], mean, std)
  # No pretraining overlap without an init.
  assert not any("pretrain" in key for key in out)


def test_principal_overlap_of_a_subspace_with_itself_and_its_complement():
  rng = np.random.default_rng(2)
  q = _orthonormal(rng, 20)
  s = np.diag(np.arange(20, 0, -1.0))
  a = q @ s @ _orthonormal(rng, 20).T
  b = q[:, ::-1] @ s @ _orthonormal(rng, 20).T  # top-5 = a's bottom 5
  assert float(geometry.principal_overlap(a, 3.0 * a, 5)) == pytest.approx(
      1.0, abs=1e-5)
  assert float(geometry.principal_overlap(a, b, 5)) == pytest.approx(
      0.0, abs=1e-5)
  c = rng.normal(size=(20, 12))
  for side, x, y in (("left", a[:, :12], c), ("right", a[:, :12].T, c.T)):
    got = float(geometry.principal_overlap(x, y, 4, side=side))
    ux, uy = (_np_top(x, 4)[0], _np_top(y, 4)[0]) if side == "left" else (
        _np_top(x, 4)[1], _np_top(y, 4)[1])
    cos = np.cos(scipy.linalg.subspace_angles(ux, uy))
    assert got == pytest.approx(np.mean(cos**2), abs=1e-5)


def test_hvp_matches_dense_hessian_and_finite_differences():
  # A quadratic first: H = A exactly.
  rng = np.random.default_rng(3)
  a = rng.normal(size=(6, 6))
  a = jnp.asarray(a + a.T, jnp.float32)
  f = lambda p: 0.5 * p["x"] @ a @ p["x"] + jnp.sum(p["x"] ** 3) / 3
  p = {"x": jnp.asarray(rng.normal(size=6), jnp.float32)}
  v = {"x": jnp.asarray(rng.normal(size=6), jnp.float32)}
  value, gv, grad, hv = probes.hvp(f, p, v)
  np.testing.assert_allclose(hv["x"], a @ v["x"] + 2 * p["x"] * v["x"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gv, grad["x"] @ v["x"], rtol=1e-5)
  assert float(value) == pytest.approx(float(f(p)))

  # The LM loss of a tiny Llama: dense Hessian of the flattened params.
  graphdef, params, rest = probes.split_model(make_model(_NANO))
  batch = {k: jnp.asarray(v) for k, v in _batch(_NANO, rows=2,
                                                 length=8).items()}
  loss = lambda q: probes.batch_loss(graphdef, rest, q, batch)
  flat, unravel = ravel_pytree(params)
  direction = jax.random.normal(jax.random.key(4), flat.shape)
  direction = direction / jnp.linalg.norm(direction)
  hess = jax.jit(jax.hessian(lambda x: loss(unravel(x))))(flat)
  _, gv, grad, hv = jax.jit(probes.hvp, static_argnums=0)(
      loss, params, unravel(direction))
  hv_flat = ravel_pytree(hv)[0]
  np.testing.assert_allclose(hv_flat, hess @ direction, rtol=1e-3,
                             atol=1e-4 * float(jnp.abs(hess @ direction).max()))
  eps = 1e-2
  g = jax.jit(jax.grad(lambda x: loss(unravel(x))))
  fd = (g(flat + eps * direction) - g(flat - eps * direction)) / (2 * eps)
  assert float(jnp.linalg.norm(fd - hv_flat)) < 1e-2 * float(
      jnp.linalg.norm(hv_flat))

  # second_order's numbers are these, for the update W + direction.
  out = probes.second_order(graphdef, rest, params,
                            unravel(flat + direction), batch)
  quad = float(direction @ hess @ direction)
  assert out["probe/curvature"] == pytest.approx(quad, rel=1e-3, abs=1e-6)
  assert out["probe/curvature_ratio"] == pytest.approx(quad, rel=1e-3,
                                                       abs=1e-6)
  grad_flat = ravel_pytree(grad)[0]
  assert out["probe/loss_change_pred1"] == pytest.approx(
      float(grad_flat @ direction), rel=1e-4)
  loss_jit = jax.jit(loss)
  assert out["probe/loss_change"] == pytest.approx(
      float(loss_jit(unravel(flat + direction)) - loss_jit(params)), abs=1e-6)


def test_second_order_error_shrinks_as_the_cube_of_the_step():
  graphdef, params, rest = probes.split_model(make_model(_MICRO))
  batch = _batch(_MICRO)
  keys = iter(jax.random.split(jax.random.key(3), 16))

  def direction(path, a):  # the MLP kernels move; the rest stays
    on = "mlp" in sharding.path_name(path)
    return jax.random.normal(next(keys), a.shape) * on
  v = jax.tree_util.tree_map_with_path(direction, params)
  norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(v))))
  errors = {}
  for step in (1.0, 0.5, 0.25):
    ft = jax.tree.map(lambda a, d, s=step: a + s / norm * d, params, v)
    out = probes.second_order(graphdef, rest, params, ft, batch)
    errors[step] = (
        abs(out["probe/loss_change"] - out["probe/loss_change_pred1"]),
        abs(out["probe/loss_change"] - out["probe/loss_change_pred2"]))
  # The loss is float32 (~3e-7 rounding at loss ~3.5), so the steps stay
  # where the cubic term is >= 3e-6: error(1) ~ 4e-4, error(0.25) ~ 7e-6.
  # A wrong quadratic term (say, no 1/2) would leave an O(step^2) error:
  # ratios of 4 and 16.
  assert errors[0.5][1] < errors[0.5][0] and errors[0.25][1] < errors[0.25][0]
  assert 6.0 < errors[0.5][1] / errors[0.25][1] < 10.0, errors  # 2^3
  assert 40.0 < errors[1.0][1] / errors[0.25][1] < 100.0, errors  # 4^3


def _capture_residuals(monkeypatch):
  return residual_spy.capture_residuals(monkeypatch,
                                        probes.residual_statistics)


def test_activation_drift_is_zero_for_one_model_and_matches_numpy(
    monkeypatch):
  graphdef, params, rest = probes.split_model(make_model(_MICRO.replace(
      num_layers=2)))
  ft = _perturbed(params, 0.05, seed=5)
  batch = _batch(_MICRO)
  same = probes.activation_drift(graphdef, rest, params, params, batch)
  assert all(v == 0.0 for k, v in same.items() if "drift" in k), same

  captured = _capture_residuals(monkeypatch)
  out = probes.activation_drift(graphdef, rest, params, ft, batch)
  jax.effects_barrier()
  probes.residual_statistics.clear_cache()
  assert len(captured) == 4  # 2 layers x (base, finetuned)

  def stats(x):
    x = np.asarray(x, np.float64)
    c = x - x.mean()
    return {"mean": x.mean(), "rms": np.sqrt(np.mean(x * x)),
            "max_abs": np.abs(x).max(),
            "kurtosis": np.mean(c**4) / np.mean(c**2) ** 2}
  for stat in probes.STATS:
    drift = [stats(captured[2 + l])[stat] - stats(captured[l])[stat]
             for l in range(2)]
    for l in range(2):
      assert out[f"probe/act_{stat}_drift/layer{l}"] == pytest.approx(
          drift[l], rel=1e-3, abs=1e-6), (stat, l)
    assert out[f"probe/act_{stat}_drift/mean"] == pytest.approx(
        np.mean(drift), rel=1e-3, abs=1e-6)
    assert out[f"probe/act_{stat}_absdrift/mean"] == pytest.approx(
        np.mean(np.abs(drift)), rel=1e-3, abs=1e-6)
  assert out["probe/act_rms_drift/mean"] != 0.0


def test_lora_update_is_merged_and_has_its_rank():
  config = _MICRO.replace(num_layers=2)
  base = make_model(config)
  adapted = lora_lib.apply_lora(nnx.clone(base), {"rank": 2, "alpha": 4.0,
                                                  "targets": ["q", "up"]},
                                rngs=nnx.Rngs(1))
  for proj in (adapted.layers.attn.q_proj, adapted.layers.mlp.up_proj):
    proj.lora_b[...] = jax.random.normal(jax.random.key(2),
                                         proj.lora_b[...].shape)
  _, ft_params, _ = probes.split_model(adapted)
  ref = geometry.reference(base)
  out = geometry.update_geometry(ref, base, ft_params)
  q = adapted.layers.attn.q_proj
  d = 2.0 * np.einsum("lir,lro->lio", np.asarray(q.lora_a[...]),
                      np.asarray(q.lora_b[...]))
  assert out["probe/update_norm/q"] == pytest.approx(
      np.sqrt(np.sum(d**2)), rel=1e-4)
  assert 1.0 <= out["probe/stable_rank/q"] <= 2.0 + 1e-4
  assert out["probe/stable_rank/q"] == pytest.approx(np.mean(
      [np.sum(x**2) / np.linalg.norm(x, 2) ** 2 for x in d]), rel=1e-3)
  # Untouched matrices: a zero norm and no shares.
  assert out["probe/update_norm/k"] == 0.0
  assert "probe/share_top5pct/k" not in out
  assert "probe/share_top5pct/up" in out


def test_evaluate_sharded_matches_one_device_and_times_a_call():
  config = preset("tiny_mha").replace(num_layers=8)
  init = nnx.state(make_model(config), nnx.Param)
  base_params = _perturbed(init, 0.02, seed=1)
  ft_params = _perturbed(base_params, 0.002, seed=2)
  batch = _batch(config, rows=8, length=32)
  fractions = (0.05,)

  def run(mesh_config):
    if mesh_config is None:
      model, put = make_model(config), lambda s: s
    else:
      mesh = sharding.make_mesh(mesh_config)
      model = make_model(config, constrain=sharding.LogicalConstraint(
          mesh, mesh_config.rules))
      shardings = sharding.state_shardings(nnx.state(model, nnx.Param), mesh,
                                           mesh_config.rules)
      put = lambda s: jax.device_put(s, shardings)
    nnx.update(model, put(base_params))
    ft, ini = put(ft_params), put(init)
    if mesh_config is not None:  # really sharded
      assert not nnx.state(model, nnx.Param)["layers"]["mlp"]["up_proj"][
          "kernel"][...].sharding.is_fully_replicated
    before = np.asarray(model.layers.mlp.up_proj.kernel[...])
    start = time.perf_counter()
    out = probes.evaluate(model, ft, batch, init=ini, fractions=fractions)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(  # the base is left alone
        np.asarray(model.layers.mlp.up_proj.kernel[...]), before)
    return out, elapsed

  one, first = run(None)
  again, warm = run(None)
  sharded, _ = run(sharding.MeshConfig.preset("fsdp_tp"))
  print(f"\nprobes.evaluate on tiny_mha ({len(one)} numbers): first call"
        f" {first:.2f} s (compiles), warm {warm:.3f} s")
  assert set(one) == set(sharded) == set(again)
  for key in ("probe/share_top5pct/q", "probe/share_top5pct_left/down",
              "probe/pretrain_overlap_top5pct_left/all",
              "probe/stable_rank/embed", "probe/spectral_norm/head",
              "probe/curvature_ratio", "probe/loss_change_pred2",
              "probe/act_rms_drift/mean", "probe/act_kurtosis_drift/layer1"):
    assert key in one and np.isfinite(one[key]), key
  # Loss changes and activation drifts are differences of two float32
  # statistics (losses ~4.8, kurtoses ~3) whose sums the sharded run orders
  # differently: a few ulps of each (~1e-6 absolute; a kurtosis drift of
  # 2.8e-3 moved by 1.4e-6 on a CI machine), so relative to the small
  # difference they are loose.
  differences = ("loss_change", "drift/")
  bad = {k: (one[k], sharded[k]) for k in one
         if sharded[k] != pytest.approx(
             one[k], rel=1e-4,
             abs=1e-5 if any(d in k for d in differences) else 1e-6)}
  assert not bad, bad
