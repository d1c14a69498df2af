"""DeepSeek-V3 (MLA + MoE) against transformers, and its two expert paths.

The fixtures under tests/fixtures/hf/deepseek_v3{,_qdirect} were written by
tests/make_hf_deepseek_fixtures.py (torch + transformers, versions in
VERSIONS.json): random tiny `deepseek_v3` checkpoints of two configs, the
logits transformers computes for fixed tokens, its greedy continuation
(`model.generate`, KV cache) and the experts its router chose per token and
MoE layer. The script also checked that transformers loads what `hf.save`
writes and reproduces the logits (it prints OK per case); here the export is
checked against the transformers-written files name by name and value by
value.
"""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import safetensors_folder
from optconsist_jax import sharding
from optconsist_jax.io import hf
from optconsist_jax.io import hf_deepseek
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model import generate as gen
from optconsist_jax.model import moe
from optconsist_jax.model import rope as rope_lib
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config

import tiny_deepseek

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CASES = ("deepseek_v3", "deepseek_v3_qdirect")


def _fixture(name):
  d = os.path.join(FIXTURES, name)
  arrays = {k: np.load(os.path.join(d, f"{k}.npy"))
            for k in ("tokens", "logits", "greedy", "experts")}
  with open(os.path.join(d, hf.CONFIG_FILE)) as f:
    return d, json.load(f), arrays


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
@pytest.mark.parametrize("name", CASES)
def test_logits_and_router_choices_match_transformers(name, moe_impl):
  d, _, a = _fixture(name)
  config, model = hf.load(d, moe_impl=moe_impl)
  assert isinstance(model, deepseek_v3.DeepseekV3)
  out = model.forward(jnp.asarray(a["tokens"]))
  np.testing.assert_allclose(np.asarray(out.logits_BTV), a["logits"],
                             atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(out.experts_LBTK), a["experts"])
  assert out.experts_LBTK.shape[0] == config.num_moe_layers


@pytest.mark.parametrize("name", CASES)
def test_greedy_with_the_latent_cache_matches_transformers(name):
  d, _, a = _fixture(name)
  _, model = hf.load(d)
  b, t = a["tokens"].shape
  out, lengths = gen.greedy_decode(model, a["tokens"], np.full((b,), t),
                                   a["greedy"].shape[1], eos_id=None)
  np.testing.assert_array_equal(lengths, a["greedy"].shape[1])
  np.testing.assert_array_equal(out, a["greedy"])


def test_cache_holds_the_latent_not_per_head_keys():
  d, _, a = _fixture("deepseek_v3")
  config, model = hf.load(d)
  cache = model.init_cache(2, 16)
  assert cache.ckv_LBSC.shape == (config.num_layers, 2, 16,
                                  config.kv_lora_rank)
  assert cache.k_rope_LBSR.shape == (config.num_layers, 2, 16,
                                     config.qk_rope_head_dim)
  # Prefill then one step equals the full forward's last position.
  tokens = jnp.asarray(a["tokens"])
  out = model.forward(tokens[:, :-1], cache=cache)
  step = model.forward(tokens[:, -1:], cache=out.cache)
  np.testing.assert_allclose(np.asarray(step.logits_BTV[:, 0]),
                             a["logits"][:, -1], atol=1e-4, rtol=0)


def test_yarn_and_routing_bias_change_the_result():
  # The nulls: without YaRN the logits miss transformers'; without the
  # selection bias the router picks other experts.
  d, _, a = _fixture("deepseek_v3")
  tokens = jnp.asarray(a["tokens"])
  _, plain = hf.load(d, rope_type="default")
  assert np.abs(np.asarray(plain(tokens)) - a["logits"]).max() > 1e-2
  _, model = hf.load(d)
  bias = model.moe_layers.mlp.router_bias
  bias[...] = jnp.zeros_like(bias[...])
  assert not np.array_equal(np.asarray(model.forward(tokens).experts_LBTK),
                            a["experts"])


def test_yarn_frequencies_follow_the_paper():
  # YaRN (arXiv 2309.00071) in float64: dims with fewer than beta_slow
  # rotations over the original context are divided by the factor, those
  # with more than beta_fast kept, a linear ramp between.
  h, theta, factor, old = 64, 10000.0, 40.0, 4096
  got = np.asarray(rope_lib.yarn_inverse_frequencies(h, theta, factor, old))
  freqs = theta ** (-np.arange(0, h, 2) / h)

  def dim(rot):
    return h * np.log(old / (rot * 2 * np.pi)) / (2 * np.log(theta))

  low, high = max(np.floor(dim(32)), 0), min(np.ceil(dim(1)), h - 1)
  ramp = np.clip((np.arange(h // 2) - low) / (high - low), 0, 1)
  want = freqs / factor * ramp + freqs * (1 - ramp)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[0] == pytest.approx(freqs[0]) and got[-1] == pytest.approx(
      freqs[-1] / factor)
  assert rope_lib.yarn_mscale(40.0, 1.0) == pytest.approx(
      0.1 * np.log(40.0) + 1)


_tiny = tiny_deepseek.config


def test_dense_and_ragged_experts_agree_in_value_and_gradient():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 10)),
                       jnp.int32)

  def loss_and_grads(impl):
    model = deepseek_v3.make_model(_tiny(moe_impl=impl), seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      m = nnx.merge(graphdef, params, rest)
      return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, nnx.to_pure_dict(grads)

  v_dense, g_dense = loss_and_grads("dense")
  v_ragged, g_ragged = loss_and_grads("ragged")
  np.testing.assert_allclose(v_ragged, v_dense, rtol=1e-5)
  flat_d = jax.tree_util.tree_leaves_with_path(g_dense)
  flat_r = dict(jax.tree_util.tree_leaves_with_path(g_ragged))
  assert any(np.abs(np.asarray(g)).max() > 0 for p, g in flat_d
             if "moe_layers" in str(p) and "gate_proj" in str(p))
  for path, g in flat_d:
    np.testing.assert_allclose(np.asarray(flat_r[path]), np.asarray(g),
                               atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_unrolled_and_rematerialized_stacks_compute_the_same():
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (2, 8)),
                       jnp.int32)
  want = np.asarray(deepseek_v3.make_model(_tiny(), seed=1)(tokens))
  for kw in (dict(scan_layers=False), dict(remat_policy="full"),
             dict(first_k_dense_replace=0), dict(first_k_dense_replace=3)):
    model = deepseek_v3.make_model(_tiny(**kw), seed=1)
    out = jax.jit(lambda m, t: m.forward(t, return_stats=True))(model, tokens)
    assert out.stats["rms"].shape == (3,)
    if "first_k_dense_replace" in kw:  # other layers: only the shapes
      k = kw["first_k_dense_replace"]
      assert (out.experts_LBTK is None) == (k == 3)
      continue
    np.testing.assert_allclose(np.asarray(out.logits_BTV), want, atol=1e-5,
                               rtol=0)


def test_routing_against_a_numpy_reference():
  c = _tiny()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 32)).astype(np.float32)
  w = rng.normal(size=(32, 8)).astype(np.float32) * 0.3
  bias = rng.normal(size=(8,)).astype(np.float32) * 0.1
  ids, weights = moe.route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias),
                           c)
  scores = 1 / (1 + np.exp(-(x @ w)))
  for m in range(40):
    choice = scores[m] + bias
    groups = choice.reshape(4, 2)
    kept = np.argsort(-np.sort(groups, -1)[:, -2:].sum(-1))[:2]
    allowed = np.concatenate([np.arange(2 * g, 2 * g + 2) for g in kept])
    want = allowed[np.argsort(-choice[allowed])[:3]]
    assert sorted(np.asarray(ids[m])) == sorted(want)
    got = dict(zip(np.asarray(ids[m]).tolist(), np.asarray(weights[m]),
                   strict=True))
    norm = scores[m][want] / scores[m][want].sum() * c.routed_scaling_factor
    np.testing.assert_allclose([got[e] for e in want], norm, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_export_has_transformers_names_values_and_config(name, tmp_path):
  d, src_cfg, a = _fixture(name)
  config, model = hf.load(d)
  hf.save(config, model, tmp_path)
  ours = safetensors_folder.read_all(tmp_path)
  theirs = safetensors_folder.read_all(d)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  cfg = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
  for key in ("model_type", "architectures", "hidden_size", "vocab_size",
              "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_attention_heads", "q_lora_rank",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "n_routed_experts", "num_experts_per_tok",
              "n_shared_experts", "n_group", "topk_group", "norm_topk_prob",
              "routed_scaling_factor", "first_k_dense_replace",
              "rope_interleave", "rms_norm_eps", "bos_token_id",
              "eos_token_id", "tie_word_embeddings"):
    assert cfg[key] == src_cfg[key], key
  config2, model2 = hf.load(tmp_path)
  assert config2 == config
  np.testing.assert_allclose(np.asarray(model2(jnp.asarray(a["tokens"]))),
                             a["logits"], atol=1e-4, rtol=0)


def test_bfloat16_export_keeps_the_router_in_float32(tmp_path):
  d, _, _ = _fixture("deepseek_v3")
  config, model = hf.load(d)
  hf.save(config, model, tmp_path, dtype=jnp.bfloat16)
  ours = safetensors_folder.read_all(tmp_path)
  assert ours["model.layers.1.mlp.gate.weight"].dtype == np.float32
  assert ours["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == (
      np.float32)
  assert str(ours["model.layers.1.mlp.experts.0.up_proj.weight"].dtype) == (
      "bfloat16")


@pytest.mark.parametrize("edit,match", [
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
     "rope type 'llama3'"),
    ({"n_group": 3}, "n_group"),
    ({"model_type": "llama"}, "not a deepseek_v3"),
])
def test_unsupported_configs_are_named(edit, match):
  _, hf_json, _ = _fixture("deepseek_v3")
  with pytest.raises(ValueError, match=match):
    hf_deepseek.config_from_hf(dict(hf_json, **edit), source="x/config.json")


def test_extra_layers_are_skipped_and_unknown_tensors_named(tmp_path):
  d, _, a = _fixture("deepseek_v3_qdirect")
  config, model = hf.load(d)
  tensors = safetensors_folder.read_all(d)
  # A multi-token-prediction layer past num_hidden_layers (DeepSeek-V3's
  # layer 61) is not part of the model: skipped, as transformers does.
  extra = dict(tensors, **{"model.layers.3.eh_proj.weight":
                           np.zeros((4, 4), np.float32)})
  (tmp_path / "mtp").mkdir()
  (tmp_path / "mtp" / hf.CONFIG_FILE).write_text(
      open(os.path.join(d, hf.CONFIG_FILE)).read())
  safetensors.numpy.save_file(extra, tmp_path / "mtp" / hf.SINGLE_FILE)
  _, loaded = hf.load(tmp_path / "mtp")
  np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(a["tokens"]))),
                             a["logits"], atol=1e-4, rtol=0)
  stray = dict(tensors, **{"model.layers.2.mlp.experts.9.up_proj.weight":
                           np.zeros((4, 4), np.float32)})
  (tmp_path / "stray").mkdir()
  (tmp_path / "stray" / hf.CONFIG_FILE).write_text(
      open(os.path.join(d, hf.CONFIG_FILE)).read())
  safetensors.numpy.save_file(stray, tmp_path / "stray" / hf.SINGLE_FILE)
  with pytest.raises(ValueError, match=r"experts\.9\.up_proj"):
    hf.load(tmp_path / "stray")
  assert config.num_layers == 3


# Moonlight-16B-A3B's config.json (moonshotai/Moonlight-16B-A3B, as
# published; keys our loader does not read left out).
MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "bos_token_id": 163584, "eos_token_id": 163585,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 11264, "kv_lora_rank": 512,
    "max_position_embeddings": 8192, "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 50000.0, "routed_scaling_factor": 2.446,
    "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "noaux_tc", "v_head_dim": 128,
    "vocab_size": 163840}


def test_moonlight_config_reads_and_counts_16b():
  config = hf_deepseek.config_from_hf(MOONLIGHT)
  assert config == DeepseekV3Config()  # the defaults are Moonlight's
  assert config.q_lora_rank is None and config.rope_interleave
  assert hf_deepseek.config_from_hf(hf_deepseek.config_to_hf(config)) == config
  # Moonlight-16B-A3B: "16B total parameters" (its model card / arXiv
  # 2502.16982 table 1); the count includes the embedding and the head.
  assert 15.5e9 < config.num_params() < 16.5e9
  abstract = deepseek_v3.abstract_model(config)
  leaves = jax.tree.leaves(nnx.state(abstract))
  assert sum(x.size for x in leaves) == config.num_params()


def _loss_and_grads(model, tokens):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, :].max(-1))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, nnx.to_pure_dict(grads)


def test_sharded_load_with_expert_parallel_rules_matches():
  d, _, a = _fixture("deepseek_v3")
  tokens = jnp.asarray(a["tokens"])
  want_loss, want_grads = _loss_and_grads(hf.load(d)[1], tokens)
  for extra in ((), (("expert", "tensor"), ("expert_mlp", None))):
    mesh_config = sharding.MeshConfig.preset("fsdp_tp", tensor=4,
                                             extra_rules=extra)
    mesh = sharding.make_mesh(mesh_config)
    _, model = hf.load(d, mesh=mesh, rules=mesh_config.rules)
    up = model.moe_layers.mlp.up_proj[...]
    expert_axis = "tensor" if extra else None
    mlp_axis = None if extra else "tensor"
    assert up.sharding.spec == jax.sharding.PartitionSpec(
        None, expert_axis, "fsdp", mlp_axis)
    out = jax.jit(lambda m, t: m.forward(t))(model, tokens)
    np.testing.assert_allclose(np.asarray(out.logits_BTV), a["logits"],
                               atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.experts_LBTK), a["experts"])
    # The training gradient on the mesh is the one-device gradient.
    loss, grads = _loss_and_grads(model, tokens)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert grads["moe_layers"]["mlp"]["up_proj"].sharding.is_equivalent_to(
        up.sharding, up.ndim)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads), strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5,
                                 rtol=1e-4, err_msg=str(path))


def test_moonlight_preset_counts_the_published_parameters():
  # Liu et al. 2025 (arXiv 2502.16982), table of compared models: Moonlight
  # has 15.29B total and 2.24B activated parameters without the embedding
  # and head; "16B" total and "A3B" activated (its name, model card) with
  # them. Counted here from the model's own variables (nnx.eval_shape),
  # routed experts scaled by top-k / experts for the activated count.
  from optconsist_jax.model import architecture  # pylint: disable=g-import-not-at-top
  config = architecture.preset("moonlight_16b_a3b")
  assert config == hf_deepseek.config_from_hf(MOONLIGHT)
  sizes = {jax.tree_util.keystr(p): x.size for p, x in
           jax.tree_util.tree_flatten_with_path(
               nnx.state(deepseek_v3.abstract_model(config)))[0]}
  total = sum(sizes.values())
  embed_head = sizes["['embed'].value"] + sizes["['lm_head']['kernel'].value"]
  routed = sum(v for k, v in sizes.items() if "['mlp']['" in k and
               k.split("['mlp']['")[1].split("']")[0] in
               ("gate_proj", "up_proj", "down_proj") and "moe_layers" in k)
  inactive = routed * (1 - config.num_experts_per_tok
                       / config.n_routed_experts)
  assert abs((total - embed_head) - 15.29e9) < 0.005e9
  assert abs((total - embed_head - inactive) - 2.24e9) < 0.005e9
  assert round(total / 1e9) == 16
  assert round((total - inactive) / 1e9) == 3
  assert config.num_params() == total
  # The MFU numerator's params (flops_per_token at T = 0 is 6 x the matmul
  # params a token goes through): activated, less the embedding lookup,
  # norms and the routing bias, which do no matmul.
  no_matmul = sizes["['embed'].value"] + sum(
      v for k, v in sizes.items() if "['scale']" in k or "router_bias" in k)
  assert config.flops_per_token(0) == 6 * (total - inactive - no_matmul)
