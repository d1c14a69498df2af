"""Llama-3 rope scaling, Qwen2/2.5, Qwen3 and OLMo-2 against transformers.

The fixtures under tests/fixtures/hf/{llama3,qwen2,qwen3,olmo2} were written by
tests/make_hf_fixtures.py (torch + transformers, versions in VERSIONS.json):
random tiny checkpoints of each model_type, the logits transformers computes
for fixed tokens, and its greedy continuation (`model.generate`, KV cache).
The script also checked that transformers loads what `hf.save` writes and
reproduces the logits (it prints OK per case); here the export is checked
against the transformers-written files name by name and value by value.
"""

import json
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safetensors_folder
from optconsist_jax import sharding
from optconsist_jax.io import hf
from optconsist_jax.io import hf_layout
from optconsist_jax.model import generate as gen
from optconsist_jax.model import LlamaConfig
from optconsist_jax.model import lora
from optconsist_jax.model import preset
from optconsist_jax.model import rope as rope_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("llama3", "qwen2", "qwen3", "olmo2")


def _fixture(name):
  d = os.path.join(FIXTURES, name)
  arrays = {k: np.load(os.path.join(d, f"{k}.npy"))
            for k in ("tokens", "logits", "greedy")}
  with open(os.path.join(d, hf.CONFIG_FILE)) as f:
    return d, json.load(f), arrays


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_match_transformers(name):
  d, _, a = _fixture(name)
  _, model = hf.load(d)
  logits = np.asarray(model(jnp.asarray(a["tokens"])))
  np.testing.assert_allclose(logits, a["logits"], atol=1e-4, rtol=0)
  b, t = a["tokens"].shape
  out, lengths = gen.greedy_decode(model, a["tokens"], np.full((b,), t),
                                   a["greedy"].shape[1], eos_id=None)
  np.testing.assert_array_equal(lengths, a["greedy"].shape[1])
  np.testing.assert_array_equal(out, a["greedy"])


def test_family_configs_follow_config_json():
  switches = {"llama3": (False, "none", "pre"), "qwen2": (True, "none", "pre"),
              "qwen3": (False, "head", "pre"), "olmo2": (False, "full", "post")}
  for name in FAMILIES:
    _, hf_json, _ = _fixture(name)
    c = hf_layout.config_from_hf(hf_json)
    rope = hf_json["rope_parameters"]
    assert (c.qkv_bias, c.qk_norm, c.norm_placement) == switches[name], name
    assert c.rms_norm_eps == hf_json["rms_norm_eps"], name
    assert c.rope_theta == rope["rope_theta"], name
    assert c.tie_embeddings == hf_json["tie_word_embeddings"], name
    assert (c.bos_token_id, c.eos_token_id) == (hf_json["bos_token_id"],
                                                hf_json["eos_token_id"])
    assert c.head_dim == hf_json.get(
        "head_dim", hf_json["hidden_size"] // hf_json["num_attention_heads"])
    assert c.rope_type == rope["rope_type"], name
  c = hf_layout.config_from_hf(_fixture("llama3")[1])
  assert (c.rope_type, c.rope_factor, c.rope_low_freq_factor,
          c.rope_high_freq_factor, c.rope_original_max_position) == (
              "llama3", 4.0, 1.0, 4.0, 32)


def _llama3_reference(head_dim, theta, factor, low, high, old_context):
  """Meta's `apply_scaling` (llama-models, llama3.1 model.py), in float64."""
  freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
  low_wavelen, high_wavelen = old_context / low, old_context / high
  out = []
  for f in freqs:
    wavelen = 2 * math.pi / f
    if wavelen < high_wavelen:
      out.append(f)
    elif wavelen > low_wavelen:
      out.append(f / factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


@pytest.mark.parametrize("theta,factor,low,high,old", [
    (20000.0, 4.0, 1.0, 4.0, 32),       # the fixture's: all three branches
    (500000.0, 8.0, 1.0, 4.0, 8192),    # Llama-3.1-8B's config.json
    (500000.0, 32.0, 1.0, 4.0, 8192)])  # Llama-3.2-1B's config.json
def test_llama3_inverse_frequencies(theta, factor, low, high, old):
  h = 16 if old == 32 else 128
  config = LlamaConfig(rope_theta=theta, rope_type="llama3",
                       rope_factor=factor, rope_low_freq_factor=low,
                       rope_high_freq_factor=high,
                       rope_original_max_position=old)
  got = np.asarray(rope_lib.inverse_frequencies(h, config))
  want = _llama3_reference(h, theta, factor, low, high, old)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  plain = np.asarray(rope_lib.inverse_frequencies(
      h, config.replace(rope_type="default")))
  kept, divided = np.isclose(got, plain), np.isclose(got, plain / factor)
  # Short wavelengths are kept, long ones divided, and some interpolated.
  assert kept[0] and divided[-1] and np.any(~kept & ~divided)


def test_llama3_scaling_changes_the_logits():
  # The null: the same weights without the scaling miss transformers' logits.
  d, _, a = _fixture("llama3")
  _, model = hf.load(d, rope_type="default")
  logits = np.asarray(model(jnp.asarray(a["tokens"])))
  assert np.abs(logits - a["logits"]).max() > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_export_has_transformers_names_values_and_config(name, tmp_path):
  d, src_cfg, a = _fixture(name)
  config, model = hf.load(d)
  hf.save(config, model, tmp_path)
  ours, theirs = safetensors_folder.read_all(tmp_path), safetensors_folder.read_all(d)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  cfg = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
  for key in ("model_type", "architectures", "hidden_size",
              "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id"):
    assert cfg[key] == src_cfg[key], key
  assert cfg["head_dim"] == config.head_dim
  rope = src_cfg["rope_parameters"]
  assert cfg["rope_theta"] == rope["rope_theta"]
  if rope["rope_type"] == "llama3":
    assert cfg["rope_scaling"] == {k: v for k, v in rope.items()
                                   if k != "rope_theta"}
  else:
    assert cfg["rope_scaling"] is None
  config2, model2 = hf.load(tmp_path)
  assert config2 == config
  np.testing.assert_allclose(np.asarray(model2(jnp.asarray(a["tokens"]))),
                             a["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit,match", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                          "factor": 4.0}}, "rope type 'yarn'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4,
                          "factor": 4.0, "high_freq_factor": 4.0}},
     "'low_freq_factor'"),
    ({"model_type": "olmo2"}, "not a Llama-family"),  # architecture mismatch
])
def test_unsupported_configs_are_named(edit, match):
  _, hf_json, _ = _fixture("qwen3")
  with pytest.raises(ValueError, match=match):
    hf_layout.config_from_hf(dict(hf_json, **edit), source="x/config.json")


def test_qwen3_head_dim_default_is_128():
  # transformers' Qwen3Config: head_dim 128 whatever hidden_size / heads.
  _, hf_json, _ = _fixture("qwen3")
  del hf_json["head_dim"]
  assert hf_layout.config_from_hf(hf_json).head_dim == 128


def test_unsupported_switch_combination_cannot_be_saved(tmp_path):
  config = preset("tiny_mha").replace(norm_placement="post")  # no qk norm
  with pytest.raises(ValueError, match="no Hugging Face model_type"):
    hf_layout.config_to_hf(config)


def test_olmo2_mesh_load_shards_qk_norms_and_matches():
  mesh_config = sharding.MeshConfig.preset("fsdp_tp")  # fsdp 4 x tensor 2
  mesh = sharding.make_mesh(mesh_config)
  d, _, a = _fixture("olmo2")
  _, model = hf.load(d, mesh=mesh, rules=mesh_config.rules)
  q_norm = model.layers.attn.q_norm.scale[...]
  # ('layers', 'heads') -> (None, tensor): split with the q projection.
  assert q_norm.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  logits = jax.jit(lambda m, t: m(t))(model, jnp.asarray(a["tokens"]))
  np.testing.assert_allclose(np.asarray(logits), a["logits"], atol=1e-4,
                             rtol=0)


# config.json of each Hub base, as published (transformers 4.x spelling;
# keys our loader does not read left out).
PUBLISHED = {
    "llama3_1_8b": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192,
                         "rope_type": "llama3"},
        "tie_word_embeddings": False, "vocab_size": 128256},
    "olmo2_7b": {  # allenai/OLMo-2-1124-7B (no bos_token_id)
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "attention_bias": False, "eos_token_id": 100257, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 11008,
        "max_position_embeddings": 4096, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 500000, "tie_word_embeddings": False,
        "vocab_size": 100352},
    "qwen2_5_7b": {  # Qwen/Qwen2.5-7B
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 3584, "intermediate_size": 18944,
        "max_position_embeddings": 131072, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1e6,
        "sliding_window": 131072, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 152064},
    "qwen3_8b": {  # Qwen/Qwen3-8B-Base
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 12288,
        "max_position_embeddings": 32768, "max_window_layers": 36,
        "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "use_sliding_window": False,
        "vocab_size": 151936},
}
# Parameter counts the providers publish (model cards / papers), rounded as
# published: an independent check of the shapes and of num_params.
PUBLISHED_PARAMS = {"llama3_1_8b": 8.03e9, "olmo2_7b": 7.30e9,
                    "qwen2_5_7b": 7.61e9, "qwen3_8b": 8.19e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_are_the_published_configs(name):
  config = hf_layout.config_from_hf(PUBLISHED[name])
  assert config == preset(name)
  assert abs(config.num_params() - PUBLISHED_PARAMS[name]) < 0.006e9
  assert hf_layout.config_from_hf(hf_layout.config_to_hf(config)) == config


def test_lora_on_a_family_keeps_biases_and_norms_and_exports(tmp_path):
  # qwen2's biases and olmo2's q/k norms sit beside the adapted projections:
  # the adapter changes the kernel only, and the merged model saves as the
  # same model_type.
  for name in ("qwen2", "olmo2"):
    d, _, a = _fixture(name)
    config, model = hf.load(d)
    lora.apply_lora(model, {"rank": 2, "targets": ("q", "k", "v")},
                    rngs=nnx.Rngs(0))
    b = model.layers.attn.q_proj.lora_b
    b[...] = 0.01 * jnp.ones_like(b[...])
    tokens = jnp.asarray(a["tokens"])
    adapted = np.asarray(model(tokens))
    assert np.abs(adapted - a["logits"]).max() > 1e-3  # the adapter acts
    merged = lora.merge(model)
    np.testing.assert_allclose(np.asarray(merged(tokens)), adapted,
                               atol=1e-4, rtol=0)
    hf.save(config, merged, tmp_path / name)
    ours, theirs = safetensors_folder.read_all(tmp_path / name), safetensors_folder.read_all(d)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
      if "q_proj.weight" not in k:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
