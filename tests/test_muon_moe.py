"""Muon on DeepSeek-V3 (MLA + MoE): which parameter goes where, and experts
orthogonalized one at a time (docs/optimizers.md "Muon on MoE").

The model is the transformers-written tiny checkpoint of test_deepseek_v3.py;
the reference is test_muon.py's float64 numpy Newton-Schulz, applied to each
[in, out] expert matrix of the [layers, experts, in, out] stack on its own.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from test_muon import numpy_newton_schulz

from optconsist_jax import optim
from optconsist_jax import sharding
from optconsist_jax.io import hf
from optconsist_jax.optim import presets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
LR = 0.01


def _muon_paths(q_lora: bool) -> set[str]:
  """What the muon preset must orthogonalize (routing.py's docstring)."""
  attn = (["q_a_proj", "q_b_proj"] if q_lora else ["q_proj"]) + [
      "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
  out = set()
  for stack in ("dense_layers", "moe_layers"):
    out |= {f"{stack}/attn/{p}/kernel" for p in attn}
  out |= {f"dense_layers/mlp/{p}/kernel"
          for p in ("gate_proj", "up_proj", "down_proj")}
  out |= {f"moe_layers/mlp/shared/{p}/kernel"
          for p in ("gate_proj", "up_proj", "down_proj")}
  # Routed experts: [layers, experts, in, out] stacks.
  out |= {f"moe_layers/mlp/{p}" for p in ("gate_proj", "up_proj",
                                          "down_proj")}
  return out


@pytest.mark.parametrize("name,q_lora", [("deepseek_v3", True),
                                         ("deepseek_v3_qdirect", False)])
def test_muon_preset_routes_each_deepseek_parameter(name, q_lora):
  _, model = hf.load(os.path.join(FIXTURES, name))
  params = nnx.state(model, nnx.Param)
  groups = optim.assign_groups(presets.preset("muon"), params)
  muon = {p for p, g in groups.items() if g == "muon"}
  assert muon == _muon_paths(q_lora)
  adamw = {p for p, g in groups.items() if g == "adamw"}
  # The router, every norm scale, the embedding and the head: AdamW.
  assert "moe_layers/mlp/router" in adamw
  assert {"embed", "lm_head/kernel", "final_norm/scale"} <= adamw
  assert all("norm" in p or p in ("embed", "lm_head/kernel",
                                  "moe_layers/mlp/router") for p in adamw)
  # The selection bias is no Param: no optimizer group sees it.
  assert not any("router_bias" in p for p in groups)
  assert ("moe_layers", "mlp", "router_bias") in dict(
      nnx.to_flat_state(nnx.state(model)))


def _mesh_and_params(layout):
  d = os.path.join(FIXTURES, "deepseek_v3")
  if layout == "one_device":
    return None, nnx.state(hf.load(d)[1], nnx.Param)
  if layout == "fsdp":  # tensor axis of size 1: groups of unlike layouts
    mesh_config = sharding.MeshConfig.preset("fsdp")
  else:
    extra = ((("expert", "tensor"), ("expert_mlp", None))
             if layout == "expert_parallel" else ())
    mesh_config = sharding.MeshConfig.preset("fsdp_tp", tensor=4,
                                             extra_rules=extra)
  mesh = sharding.make_mesh(mesh_config)
  _, model = hf.load(d, mesh=mesh, rules=mesh_config.rules)
  return mesh, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("layout", ["one_device", "fsdp", "fsdp_tp",
                                    "expert_parallel"])
def test_expert_stack_update_is_per_expert_newton_schulz(layout):
  mesh, params = _mesh_and_params(layout)
  config = presets.preset("muon", peak_lr=LR, schedule="constant",
                          warmup_fraction=0.0, clip_norm=None)
  tx = optim.build(config, params, mesh=mesh)
  rng = np.random.default_rng(0)

  def grad(p):
    g = rng.normal(size=p.shape).astype(np.float32)
    if p.ndim == 4:  # experts far apart in scale: one norm for all would
      g *= (10.0 ** np.arange(p.shape[1]))[None, :, None, None]  # show.
    return jax.device_put(g, p.sharding)

  grads = jax.tree.map(grad, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  flat_u = dict(nnx.to_flat_state(updates))
  flat_g = dict(nnx.to_flat_state(grads))
  for key in (("moe_layers", "mlp", p) for p in ("gate_proj", "up_proj",
                                                 "down_proj")):
    g = np.asarray(flat_g[key][...])
    num_layers, num_experts, fan_in, fan_out = g.shape
    scale = 0.2 * np.sqrt(max(fan_in, fan_out))  # rms_match (Liu et al.)
    want = np.empty_like(g, np.float64)
    for layer in range(num_layers):
      for e in range(num_experts):
        # First step from zero momentum: the Nesterov direction is a
        # multiple of the gradient, which the normalization removes.
        want[layer, e] = -LR * scale * numpy_newton_schulz(g[layer, e])
    got = flat_u[key][...]
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6,
                               err_msg="/".join(key))
    if mesh is not None:
      assert got.sharding.is_equivalent_to(flat_g[key][...].sharding, 4)
  # The router takes AdamW's first step: -lr * g / (|g| + eps) ~ -lr sign(g).
  g_router = np.asarray(flat_g[("moe_layers", "mlp", "router")][...])
  np.testing.assert_allclose(
      np.asarray(flat_u[("moe_layers", "mlp", "router")][...]),
      -LR * np.sign(g_router), rtol=1e-4)

