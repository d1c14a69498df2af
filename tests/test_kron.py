"""A second-order family from PyPI by configuration only: PSGD Kron.

`psgdax:kron` (PSGD Kron, Li 2018, arXiv 1512.04202; psgdax on PyPI) runs by
import path. Its Kronecker factors are not param-shaped, so they are sharded
by the default rule of sharding.state_shardings, or by a spec hook named in
the group's config (`state_specs`, optim/state_specs.py). On 8 fake CPU
devices the sharded update must equal the single-device one, and the
preconditioners must not be replicated.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from optconsist_jax import optim
from optconsist_jax import sharding
from optconsist_jax.model import preset
from optconsist_jax.train import state as state_lib

psgdax = pytest.importorskip("psgdax")  # the `kron` extra (in `test` too)

CONFIG = preset("tiny_gqa")
KWARGS = {"preconditioner_update_probability": 1.0, "b1": 0.9,
          "preconditioner_init_scale": 1.0}


def psgd_param_like_specs(params, params_partition_specs, **kwargs):
  """A spec hook: factor Q_i of a param splits like the param's dim i.

  (distributed-kron's rule, `PartitionSpec(param_spec[i], None)`); every
  other leaf is left to the default rule (None). Like distributed-kron's
  `get_opt_state_partition_specs`, the specs of `kron`'s chain are those of
  `scale_by_kron` then None for decayed weights (if any) and the LR scale.
  """
  weight_decay = kwargs.pop("weight_decay", 0.0)
  state = jax.eval_shape(psgdax.scale_by_kron(**kwargs).init, params)
  flat_specs = {sharding.path_name(p): s for p, s in
                jax.tree_util.tree_flatten_with_path(params_partition_specs)[0]}

  def spec(path, leaf):
    name = sharding.path_name(path)
    head, _, index = name.rpartition("/")
    if "Qs_preconditioners/" not in name or not index.isdigit():
      return None
    param = head.split("Qs_preconditioners/", 1)[1]
    param_spec = tuple(flat_specs[param])
    dim = param_spec[int(index)] if int(index) < len(param_spec) else None
    return P(dim, *[None] * (leaf.ndim - 1))
  specs = jax.tree_util.tree_map_with_path(spec, state)
  return (specs, None, None) if weight_decay else (specs, None)


HOOK = f"{__name__}:psgd_param_like_specs"


def _setup(devices, state_specs=None):
  mesh_config = sharding.MeshConfig.preset("fsdp_tp")  # fsdp=4, tensor=2
  mesh = sharding.make_mesh(mesh_config, devices)
  builder = state_lib.StateBuilder(CONFIG, mesh, mesh_config.rules)
  optim_config = optim.presets.preset(
      "psgdax:kron", kwargs=KWARGS, schedule="constant", peak_lr=1e-2,
      warmup_fraction=0.0, clip_norm=None)
  if state_specs:
    groups = dict(optim_config.groups)
    groups["main"] = dataclasses.replace(groups["main"],
                                         state_specs=state_specs)
    optim_config = optim.OptimConfig(groups=groups,
                                     routes=optim_config.routes,
                                     clip_norm=None)
  tx = optim.build(optim_config, builder.abstract_params, mesh=mesh)
  return mesh, builder, tx


def _specs(tree):
  return {sharding.path_name(p): x.sharding.spec
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _two_updates(tx, params, grads, state_shardings=None, param_shardings=None):
  def run(params, grads):
    # A scan: one update in the program, compiled once (Kron's update is
    # most of this test's compile time), applied to each gradient in turn.
    def update(state, g):
      updates, state = tx.update(g, state, params)
      return state, updates
    state, stacked = jax.lax.scan(
        update, tx.init(params), jax.tree.map(lambda *g: jnp.stack(g), *grads))
    return [jax.tree.map(lambda u, i=i: u[i], stacked)
            for i in range(len(grads))], state
  if state_shardings is None:
    return jax.jit(run)(params, grads)
  return jax.jit(run, in_shardings=(param_shardings, [param_shardings] * 2),
                 out_shardings=([param_shardings] * 2, state_shardings))(
                     params, grads)


@pytest.mark.parametrize("state_specs", [None, HOOK])
def test_kron_preconditioners_are_split_by_the_rule_or_the_hook(state_specs):
  mesh, builder, tx = _setup(jax.devices(), state_specs)
  del mesh
  abstract, _ = builder.abstract_state(tx)
  specs = _specs(abstract.opt_state)
  factor = "layers/mlp/gate_proj/kernel/2"  # Q of the 160 mlp dim, [160, 160]
  [spec] = [v for k, v in specs.items()
            if k.endswith("Qs_preconditioners/" + factor)]
  if state_specs is None:
    # Default rule: the largest dim divisible by fsdp (4) splits over it.
    assert spec == P("fsdp", None), spec
  else:
    # The hook: Q_2 splits like gate_proj's dim 2 (mlp -> tensor).
    assert spec == P("tensor", None), spec
  # The preconditioners are split, not replicated on every device.
  leaves = {sharding.path_name(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]}
  factors = [k for k, x in leaves.items()
             if "Qs_preconditioners/" in k and x.ndim == 2 and x.size >= 256]
  assert len(factors) >= 8, factors
  replicated = [k for k in factors if all(a is None for a in specs[k])]
  assert not replicated, replicated
  opt_bytes = sum(x.size * x.dtype.itemsize
                  for x in jax.tree.leaves(abstract.opt_state))
  per_device = sum(
      np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(abstract.opt_state))
  assert per_device < 0.4 * opt_bytes, (per_device, opt_bytes)


def test_sharded_kron_update_equals_single_device():
  """Under the hook's layout (the one that splits the most factors; the
  numbers do not depend on the layout, which the test above checks per
  rule): two updates, compiled once for the mesh and once for one device."""
  devices = jax.devices()
  assert len(devices) == 8, "run with --xla_force_host_platform_device_count=8"
  mesh, builder, tx = _setup(devices, HOOK)
  del mesh
  abstract, shardings = builder.abstract_state(tx)
  params = jax.jit(lambda: builder.init(tx).params)()
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), p.dtype), params) for _ in range(2)]
  sharded, state = _two_updates(tx, params, grads, shardings.opt_state,
                                shardings.params)
  # The reference: the same program on one device, no shardings at all.
  host = jax.device_get((params, grads))
  single, _ = _two_updates(tx, *host)
  for got, want in zip(sharded, single):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6), got, want)
  # The state came back in the planned layout (the hook's, on Q_2).
  specs = _specs(abstract.opt_state)
  got = {k: v.sharding.spec for k, v in zip(specs, jax.tree.leaves(state))}
  [name] = [k for k in specs if k.endswith(
      "Qs_preconditioners/layers/mlp/gate_proj/kernel/2")]
  assert got[name] == specs[name] == P("tensor", None)

