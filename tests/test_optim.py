"""optim: config tree, routing, schedules, registry, build on the Llama params."""

import inspect

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from optconsist_jax import optim
from optconsist_jax.model import Llama, preset
from optconsist_jax.model import llama, lora
from optconsist_jax.optim import muon as muon_lib
from optconsist_jax.sharding import path_name


def _params(name="tiny_gqa"):
  return nnx.state(Llama(preset(name), rngs=nnx.Rngs(0)), nnx.Param)


def _names(assignment, group):
  return sorted(k for k, g in assignment.items() if g == group)


def test_muon_preset_routes_hidden_matrices_only():
  for name in ("tiny_gqa", "tiny_tied"):
    assignment = optim.assign_groups(optim.presets.preset("muon"),
                                     _params(name))
    muon = _names(assignment, "muon")
    assert muon == sorted(
        f"layers/{blk}/{p}_proj/kernel" for blk, ps in
        (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps)
    adam = _names(assignment, "adamw")
    assert "embed" in adam and "final_norm/scale" in adam
    assert "layers/attn_norm/scale" in adam  # [L, D]: stacked vector
    assert ("lm_head/kernel" in adam) == (name == "tiny_gqa")


def test_adamw_preset_equals_optax_adamw_with_clipping():
  params = _params()
  cfg = optim.presets.preset("adamw", peak_lr=1e-3, total_steps=10,
                             weight_decay=0.1, clip_norm=0.5)
  tx = optim.build(cfg, params)
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 1, 10, 1e-5)
  ref = optax.chain(optax.clip_by_global_norm(0.5),
                    optax.adamw(sched, weight_decay=0.1))
  grads = jax.tree.map(lambda p: jnp.cos(p) * 3.0, params)
  s, s_ref = tx.init(params), ref.init(params)
  # Jitted: op by op, every leaf's every op would compile on its own.
  update, update_ref = jax.jit(tx.update), jax.jit(ref.update)
  for _ in range(3):
    u, s = update(grads, s, params)
    u_ref, s_ref = update_ref(grads, s_ref, params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_groups_get_their_own_lr_and_weight_decay():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  cfg = optim.OptimConfig.from_dict({
      "groups": {
          "fast": {"optimizer": "sgd", "schedule": {"peak": 0.5},
                   "weight_decay": 0.1},
          "slow": {"optimizer": "sgd", "schedule": {"peak": 0.01}},
      },
      "routes": [("w", "fast"), {"pattern": "b", "group": "slow"}],
      "clip_norm": None,
  })
  tx = optim.build(cfg, params)
  grads = {"w": jnp.full((4, 4), 2.0), "b": jnp.full(4, 2.0)}
  u, _ = tx.update(grads, tx.init(params), params)
  # sgd has no weight_decay argument: decoupled decay -lr*wd*p is chained.
  np.testing.assert_allclose(u["w"], -0.5 * 2.0 - 0.5 * 0.1 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(u["b"], -0.01 * 2.0, rtol=1e-6)
  assert optim.learning_rates(cfg, 0) == pytest.approx(
      {"fast": 0.5, "slow": 0.01})


def test_schedules():
  cosine = optim.make_schedule(optim.ScheduleConfig(
      kind="cosine", peak=1.0, warmup_fraction=0.1, total_steps=100,
      floor=0.01))
  assert float(cosine(0)) == 0.0
  assert float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(55)) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-5)
  assert float(cosine(100)) == pytest.approx(0.01)
  assert float(cosine(1000)) == pytest.approx(0.01)
  linear = optim.make_schedule(optim.ScheduleConfig(
      kind="linear", peak=2.0, warmup_steps=10, total_steps=110, floor=0.5))
  assert float(linear(60)) == pytest.approx(1.5)
  assert float(linear(110)) == pytest.approx(1.0)
  const = optim.make_schedule(optim.ScheduleConfig(peak=3.0, warmup_steps=4))
  assert [float(const(i)) for i in (0, 2, 4, 99)] == pytest.approx(
      [0.0, 1.5, 3.0, 3.0])


def test_from_config_dict_roundtrip_and_ml_collections():
  cfg = optim.presets.preset("muon", peak_lr=2e-5, total_steps=50)
  cd = ml_collections.ConfigDict(cfg.to_dict())
  cd.groups.muon.schedule.peak = 4e-5
  back = optim.OptimConfig.from_dict(cd)
  assert back.groups["muon"].schedule.peak == 4e-5
  assert back.groups["muon"].kwargs["scale"] == "rms_match"
  assert back.routes == cfg.routes
  assert optim.OptimConfig.from_dict(cfg) is cfg


def test_muon_preset_trains_llama_in_the_train_step_with_group_stats():
  """The library path: train_step with the preset and param_groups."""
  from optconsist_jax import sharding
  from optconsist_jax.train import state as state_lib
  from optconsist_jax.train import step as train_step
  config = preset("tiny_gqa")
  mesh_config = sharding.MeshConfig(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:1])
  rules = mesh_config.rules
  cfg = optim.presets.preset("muon", peak_lr=1e-2, total_steps=10,
                             warmup_fraction=0.0)
  builder = state_lib.StateBuilder(config, mesh, rules)
  abstract = builder.abstract_params
  tx = optim.build(cfg, abstract, mesh=mesh)
  assignment = optim.assign_groups(cfg, abstract)
  state = builder.init(tx)
  _, shardings = builder.abstract_state(tx)
  step = train_step.make_train_step(builder.graphdef, tx, mesh=mesh, rules=rules,
                                    state_shardings=shardings,
                                    param_groups=assignment)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((4, 16), np.float32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
           "segment_ids": np.ones((4, 16), np.int32)}
  batch = train_step.global_batch(batch, mesh, rules)
  losses = []
  for _ in range(4):
    before = jax.tree_util.tree_flatten_with_path(
        jax.device_get(state.params))[0]
    state, metrics = step(state, batch)
    after = jax.tree.leaves(jax.device_get(state.params))
    losses.append(float(metrics["loss"]))
  # The last step's update stats against the param change, in numpy.
  sumsq, count = {}, {}
  for (path, b), a in zip(before, after):
    group = assignment[path_name(path)]
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    sumsq[group] = sumsq.get(group, 0.0) + float(np.sum(d * d))
    count[group] = count.get(group, 0) + d.size
  assert set(sumsq) == {"muon", "adamw"}
  for g in sumsq:
    np.testing.assert_allclose(metrics[f"update_norm/{g}"],
                               np.sqrt(sumsq[g]), rtol=1e-4)
    np.testing.assert_allclose(metrics[f"update_rms/{g}"],
                               np.sqrt(sumsq[g] / count[g]), rtol=1e-4)
  # Muon with rms_match: the hidden matrices' update RMS is 0.2 * lr
  # (Liu et al. 2025, arXiv 2502.16982), up to Newton-Schulz's inexactness.
  lr_last = float(optim.make_schedule(cfg.groups["muon"].schedule)(3))
  assert 0.5 * 0.2 * lr_last < metrics["update_rms/muon"] < 1.5 * 0.2 * lr_last
  assert losses[-1] < losses[0]


def test_build_uses_param_shardings_for_muon():
  mesh = jax.make_mesh((8,), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P(None, "fsdp", None))
  params = {"layers": {"w": jax.ShapeDtypeStruct((3, 16, 8), jnp.float32,
                                                 sharding=sharding)}}
  cfg = optim.OptimConfig.from_dict({
      "groups": {"m": {"optimizer": "muon"}}, "routes": [("all", "m")]})
  tx = optim.build(cfg, params)
  x = jax.device_put(np.random.default_rng(0).normal(size=(3, 16, 8)).astype(
      np.float32), sharding)
  u, _ = jax.jit(tx.update)({"layers": {"w": x}},
                            tx.init({"layers": {"w": x}}))
  ref = -1e-5 * muon_lib.newton_schulz(optax.clip_by_global_norm(1.0).update(
      {"w": x}, None)[0]["w"])
  np.testing.assert_allclose(u["layers"]["w"], ref, atol=1e-10)
  assert u["layers"]["w"].sharding.is_equivalent_to(sharding, 3)


# --- bad input -------------------------------------------------------------


def test_unknown_optimizer_lists_valid_names():
  cfg = optim.OptimConfig.from_dict({
      "groups": {"g": {"optimizer": "adamz"}}, "routes": [("all", "g")]})
  with pytest.raises(ValueError, match=r"unknown optimizer 'adamz'.*adamw.*"
                     r"contrib\.muon.*muon"):
    optim.build(cfg, _params())


def test_unassigned_param_is_named():
  cfg = optim.OptimConfig.from_dict({
      "groups": {"m": {"optimizer": "muon"}, "a": {}},
      "routes": [("hidden_matrix", "m"), ("embedding|lm_head", "a"),
                 ("embed|lm_head/kernel", "a")]})
  with pytest.raises(ValueError, match=r"'final_norm/scale'.*matches no rule"):
    optim.build(cfg, _params())


def test_doubly_assigned_param_is_named():
  cfg = optim.OptimConfig.from_dict({
      "groups": {"m": {"optimizer": "muon"}, "a": {}},
      "routes": [("hidden_matrix", "m"), ("layers/mlp/.*", "a"),
                 ("not_hidden_matrix", "a")]})
  with pytest.raises(ValueError, match=r"'layers/mlp/down_proj/kernel'.*"
                     r"matches 2 rules"):
    optim.build(cfg, _params())
  # 'first' mode resolves the overlap by order instead.
  first = optim.OptimConfig.from_dict({**cfg.to_dict(), "route_mode": "first"})
  assert optim.assign_groups(first, _params())[
      "layers/mlp/down_proj/kernel"] == "m"


@pytest.mark.parametrize("bad,match", [
    ({"groups": {"a": {}}, "routes": [("all", "b")]}, r"group 'b'"),
    ({"groups": {"a": {}}, "rules": []}, r"optim config optim: unknown keys \['rules'\];"),
    ({"groups": {"a": {"lr": 1}}}, r"optim config optim.groups.a: unknown keys \['lr'\]"),
    ({"groups": {"a": {"schedule": {"warmup": 3}}}},
     r"optim config optim.groups.a.schedule: unknown keys \['warmup'\]"),
    ({"groups": {"a": {}}, "route_mode": "any"}, r"route_mode"),
])
def test_bad_config_names_the_key(bad, match):
  with pytest.raises(ValueError, match=match):
    optim.OptimConfig.from_dict(bad)


def test_unresolved_run_length_is_an_error_at_build():
  cfg = optim.OptimConfig.from_dict(
      {"groups": {"a": {"schedule": {"kind": "cosine"}}},
       "routes": [("all", "a")]})
  with pytest.raises(ValueError, match=r"total_steps=0 \(the run's length\)"
                     r" unresolved"):
    optim.build(cfg, _params())
  tx = optim.build(cfg.resolve_total_steps(10), _params())
  assert tx is not None


def test_bad_kwargs_name_the_group():
  cfg = optim.OptimConfig.from_dict({
      "groups": {"a": {"optimizer": "adamw", "kwargs": {"beta1": 0.9}}},
      "routes": [("all", "a")]})
  with pytest.raises(ValueError, match=r"optim.groups.a.*adamw.*beta1"):
    optim.build(cfg, _params())
  cfg = optim.OptimConfig.from_dict({
      "groups": {"a": {"kwargs": {"weight_decay": 0.1}}},
      "routes": [("all", "a")]})
  with pytest.raises(ValueError, match=r"optim.groups.a.kwargs.weight_decay"):
    optim.build(cfg, _params())


def test_any_optax_name_resolves_like_optax():
  params = {"w": jnp.arange(6.0).reshape(2, 3) - 2.0}
  grads = {"w": jnp.cos(params["w"])}
  for name, ref in (("signum", optax.signum), ("optax.lion", optax.lion),
                    ("contrib.prodigy", optax.contrib.prodigy),
                    ("optax.contrib.adopt", optax.contrib.adopt)):
    cfg = optim.presets.preset(name, peak_lr=0.1, schedule="constant",
                               warmup_fraction=0.0, clip_norm=None)
    # The group's weight_decay (0) replaces the function's default.
    decay = ({"weight_decay": 0.0} if "weight_decay" in
             inspect.signature(ref).parameters else {})
    tx, tx_ref = optim.build(cfg, params), ref(learning_rate=0.1, **decay)
    u, _ = tx.update(grads, tx.init(params), params)
    u_ref, _ = tx_ref.update(grads, tx_ref.init(params), params)
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6, err_msg=name)
  # Nothing lists them: what the installed Optax has is what resolves.
  assert "signum" in optim.registry.names()
  assert "contrib.muon" in optim.registry.names()


def test_register_twice_is_harmless_and_a_clash_is_named():
  def make_factory():
    def my_sgd(learning_rate, weight_decay):
      del weight_decay
      return optax.sgd(learning_rate)
    return my_sgd

  # A config file executed twice defines the function anew.
  first, second = make_factory(), make_factory()
  optim.registry.register("test_my_sgd")(first)
  optim.registry.register("test_my_sgd")(second)
  assert optim.registry.get("test_my_sgd") is second
  with pytest.raises(ValueError, match="'test_my_sgd' is already registered"):
    optim.registry.register("test_my_sgd")(lambda lr, wd: optax.sgd(lr))


def test_bad_import_path_is_named():
  for name, match in (("no_such_module_xyz:make", "cannot import module"),
                      ("optax:no_such_fn", "has no 'no_such_fn'")):
    with pytest.raises(ValueError, match=match):
      optim.presets.preset(name)


# ---------------------------------------------------------------------------
# Muon's routing defaults: one test per rule.


def _lora_tree():
  """Every variable of tiny_gqa with rank-4 LoRA adapters (base + adapters)."""
  config = lora.LoRAConfig(rank=4, alpha=8.0)
  model = llama.abstract_model(preset("tiny_gqa"), transform=lambda m: (
      lora.apply_lora(m, config, rngs=nnx.Rngs(1))))
  return nnx.state(model)


def _muon_groups(tree):
  return optim.assign_groups(optim.presets.preset("muon"), tree)


def test_route_hidden_matrices_to_muon_on_the_lora_tree():
  a = _muon_groups(_lora_tree())
  base = [f"layers/{blk}/{p}_proj/kernel" for blk, ps in
          (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps]
  assert _names(a, "muon") == sorted(base)


def test_route_embedding_and_head_to_adamw():
  a = _muon_groups(_lora_tree())
  assert a["embed"] == "adamw" and a["lm_head/kernel"] == "adamw"


def test_route_norms_to_adamw():
  a = _muon_groups(_lora_tree())
  norms = [k for k in a if "norm" in k]
  assert len(norms) == 3 and all(a[k] == "adamw" for k in norms)


def test_route_lora_adapters_to_adamw_unless_routed_explicitly():
  tree = _lora_tree()
  a = _muon_groups(tree)
  adapters = [k for k in a if k.endswith(("lora_a", "lora_b"))]
  assert len(adapters) == 2 * 7 and all(a[k] == "adamw" for k in adapters)
  explicit = optim.OptimConfig.from_dict({
      **optim.presets.preset("muon").to_dict(),
      "routes": [("lora", "muon"), ("hidden_matrix", "muon"),
                 ("not_hidden_matrix", "adamw")], "route_mode": "first"})
  b = optim.assign_groups(explicit, tree)
  assert all(b[k] == "muon" for k in adapters)


def test_route_biases_and_moe_routers_to_adamw():
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"layers": {"moe": {"router": {"kernel": sds(2, 64, 8)},
                             "gate": {"kernel": sds(2, 64, 8)},
                             "experts": {"gate_proj": {"kernel": sds(2, 64, 96)},
                                         "bias": sds(2, 96)}},
                     "attn": {"q_proj": {"kernel": sds(2, 64, 64),
                                         "bias": sds(2, 64)}}},
          "head_bias": {"bias": sds(64, 3)}}
  a = _muon_groups(tree)
  assert _names(a, "muon") == ["layers/attn/q_proj/kernel",
                               "layers/moe/experts/gate_proj/kernel"]
  assert a["layers/moe/router/kernel"] == a["layers/moe/gate/kernel"] == "adamw"
  # A 2-D leaf named bias is still a bias.
  assert a["head_bias/bias"] == "adamw"
