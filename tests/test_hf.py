"""Hugging Face import/export against logits transformers computed.

The fixtures under tests/fixtures/hf/ were written by tests/make_hf_fixtures.py
(torch + transformers, versions in VERSIONS.json); these tests need only numpy
and our code.
"""

import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

import safetensors_folder
from optconsist_jax.io import hf
from optconsist_jax.io import hf_layout
from optconsist_jax import sharding
from optconsist_jax.model import Llama
from optconsist_jax.model import preset

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CASES = ("mha", "gqa", "tied", "sharded")


def _fixture(name):
  d = os.path.join(FIXTURES, name)
  return d, np.load(os.path.join(d, "tokens.npy")), np.load(
      os.path.join(d, "logits.npy"))


def _params(model):
  return {sharding.path_name(kp): np.asarray(v) for kp, v in
          jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return dst


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name):
  d, tokens, expected = _fixture(name)
  config, model = hf.load(d)
  logits = np.asarray(model(jnp.asarray(tokens)))
  assert logits.dtype == np.float32 and logits.shape == expected.shape
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_config_matches_fixture_json():
  config, _ = hf.load(os.path.join(FIXTURES, "gqa"))
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
  assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-5
  assert config.num_layers == 3 and not config.tie_embeddings
  tied, model = hf.load(os.path.join(FIXTURES, "tied"))
  assert tied.tie_embeddings and model.lm_head is None


def test_llama2_7b_hf_config_gives_preset():
  # meta-llama/Llama-2-7b-hf config.json (public), transformers 4.x spelling.
  hf_json = {
      "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 11008,
      "max_position_embeddings": 4096, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": None, "tie_word_embeddings": False,
      "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000}
  config = hf_layout.config_from_hf(hf_json)
  assert config == preset("llama2_7b")
  assert config.num_params() == 6_738_415_616


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_70b", "tiny_tied",
                                  "tiny_gqa"])
def test_config_round_trip(name):
  config = preset(name)
  assert hf_layout.config_from_hf(hf_layout.config_to_hf(config)) == config


def test_unsupported_rope_scaling_is_rejected():
  # llama3 scaling is supported (tests/test_families.py); yarn is not.
  hf_json = hf_layout.config_to_hf(preset("tiny_mha"))
  hf_json["rope_scaling"] = {"rope_type": "yarn", "factor": 8.0}
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    hf_layout.config_from_hf(hf_json)


@pytest.mark.parametrize("name", ["gqa", "tied", "sharded"])
def test_save_load_identical_params(name, tmp_path):
  config, model = hf.load(os.path.join(FIXTURES, name))
  hf.save(config, model, tmp_path / "out", max_shard_bytes=20_000)
  config2, model2 = hf.load(tmp_path / "out")
  assert config2 == config
  p1, p2 = _params(model), _params(model2)
  assert p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
  _, tokens, expected = _fixture(name)
  np.testing.assert_allclose(np.asarray(model2(jnp.asarray(tokens))),
                             expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,max_shard_bytes", [("mha", hf.DEFAULT_MAX_SHARD_BYTES),
                                                  ("sharded", 20_000)])
def test_saved_files_have_hf_names_and_shapes(name, max_shard_bytes, tmp_path):
  src = os.path.join(FIXTURES, name)
  config, model = hf.load(src)
  out = tmp_path / "out"
  hf.save(config, model, out, max_shard_bytes=max_shard_bytes)
  # Same tensor names, shapes and values as the transformers-written files.
  ours, theirs = safetensors_folder.read_all(out), safetensors_folder.read_all(src)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    assert ours[k].shape == theirs[k].shape, k
    assert ours[k].dtype == np.float32, k
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  index_path = out / hf.INDEX_FILE
  if name == "sharded":
    assert len(files) > 1 and index_path.exists()
    index = json.loads(index_path.read_text())
    assert sorted(index["weight_map"]) == sorted(theirs)
    assert sorted(set(index["weight_map"].values())) == files
    for tensor_name, file_name in index["weight_map"].items():
      with safetensors.safe_open(os.path.join(out, file_name), "numpy") as h:
        assert tensor_name in h.keys()
        assert h.get_slice(tensor_name).get_shape() == list(
            theirs[tensor_name].shape)
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in theirs.values())
  else:
    assert files == [hf.SINGLE_FILE] and not index_path.exists()
  cfg = json.loads((out / hf.CONFIG_FILE).read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"]
  assert cfg["model_type"] == "llama" and cfg["torch_dtype"] == "float32"
  src_cfg = json.loads(open(os.path.join(src, hf.CONFIG_FILE)).read())
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size",
              "rms_norm_eps", "tie_word_embeddings", "head_dim"):
    assert cfg[key] == src_cfg[key], key


def test_scanned_and_unscanned_same_logits():
  d, tokens, _ = _fixture("gqa")
  _, scanned = hf.load(d, scan_layers=True)
  _, unrolled = hf.load(d, scan_layers=False)
  np.testing.assert_allclose(np.asarray(scanned(jnp.asarray(tokens))),
                             np.asarray(unrolled(jnp.asarray(tokens))),
                             atol=1e-5, rtol=0)


def test_bf16_load_and_save(tmp_path):
  d, tokens, expected = _fixture("mha")
  config, model = hf.load(d, dtype=jnp.bfloat16)
  assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
  params = _params(model)
  assert all(v.dtype == jnp.bfloat16 for v in params.values())
  # Exactly the fp32 weights rounded to bf16.
  fp32 = safetensors_folder.read_all(d)
  np.testing.assert_array_equal(
      params["embed"],
      fp32["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16))
  logits = np.asarray(model(jnp.asarray(tokens)))
  assert logits.dtype == np.float32
  scale = np.abs(expected).max()
  assert np.abs(logits - expected).max() < 0.05 * scale
  # bf16 params, fp32 compute.
  _, mixed = hf.load(d, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
  assert np.abs(np.asarray(mixed(jnp.asarray(tokens))) - expected).max() < (
      0.05 * scale)
  # A bf16 save stores BF16 tensors that read back as the same values.
  hf.save(config, model, tmp_path / "bf16")
  cfg = json.loads((tmp_path / "bf16" / hf.CONFIG_FILE).read_text())
  assert cfg["torch_dtype"] == "bfloat16"
  saved = safetensors_folder.read_all(tmp_path / "bf16")
  assert saved["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  _, again = hf.load(tmp_path / "bf16", dtype=jnp.float32)
  np.testing.assert_array_equal(_params(again)["embed"],
                                params["embed"].astype(np.float32))


def test_mesh_load_shards_params_and_matches(monkeypatch):
  assert jax.device_count() == 8
  mesh_config = sharding.MeshConfig.preset("fsdp_tp")  # fsdp 4 x tensor 2
  mesh = sharding.make_mesh(mesh_config)
  d, tokens, expected = _fixture("gqa")
  full = safetensors_folder.read_all(d)

  reads = []  # (tensor name, shape read) for every slice taken from disk
  real_open = safetensors.safe_open

  class RecordingSlice:

    def __init__(self, name, inner):
      self.name, self.inner = name, inner

    def get_shape(self):
      return self.inner.get_shape()

    def __getitem__(self, idx):
      out = self.inner[idx]
      reads.append((self.name, out.shape))
      return out

  class RecordingHandle:

    def __init__(self, *a, **kw):
      self.ctx = real_open(*a, **kw)

    def __enter__(self):
      self.h = self.ctx.__enter__()
      return self

    def __exit__(self, *exc):
      return self.ctx.__exit__(*exc)

    def keys(self):
      return self.h.keys()

    def get_slice(self, name):
      return RecordingSlice(name, self.h.get_slice(name))

  monkeypatch.setattr(hf.safetensors, "safe_open", RecordingHandle)
  config, model = hf.load(d, mesh=mesh, rules=mesh_config.rules)

  q = nnx.state(model, nnx.Param)["layers"]["attn"]["q_proj"]["kernel"][...]
  # ('layers', 'embed', 'heads') -> (None, fsdp, tensor)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(q.sharding.device_set) == 8
  # Each device shard was read straight from disk: HF q_proj is [out, in] =
  # [64, 32]; out (heads) is split over tensor=2, in (embed) over fsdp=4.
  q_reads = {s for n, s in reads if n.endswith("self_attn.q_proj.weight")}
  assert q_reads == {(32, 8)}
  # No read ever took a whole matrix tensor at once.
  for n, s in reads:
    if n.endswith("_proj.weight"):
      assert np.prod(s) < full[n].size, n

  logits = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_inv_freq_buffers_are_ignored(tmp_path):
  d = _copy("mha", tmp_path)
  tensors = safetensors_folder.read_all(d)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(
      (4,), np.float32)
  save_file(tensors, str(d / hf.SINGLE_FILE), metadata={"format": "pt"})
  _, tokens, expected = _fixture("mha")
  _, model = hf.load(d)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected,
                             atol=1e-4, rtol=0)


def test_missing_config_json(tmp_path):
  d = _copy("mha", tmp_path)
  os.remove(d / hf.CONFIG_FILE)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load(d)


@pytest.mark.parametrize("edit", [
    {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    {"architectures": ["GPT2LMHeadModel"]},
])
def test_non_llama_architecture(edit, tmp_path):
  d = _copy("mha", tmp_path)
  cfg = json.loads((d / hf.CONFIG_FILE).read_text())
  cfg.update(edit)
  (d / hf.CONFIG_FILE).write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config\.json: not a Llama") as e:
    hf.load(d)
  assert str(d) in str(e.value)


def test_missing_tensor_names_file_and_tensor(tmp_path):
  d = _copy("mha", tmp_path)
  tensors = safetensors_folder.read_all(d)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(d / hf.SINGLE_FILE))
  with pytest.raises(ValueError) as e:
    hf.load(d)
  msg = str(e.value)
  assert "model.safetensors" in msg
  assert "'model.layers.1.mlp.up_proj.weight'" in msg and "missing" in msg


def test_missing_tensor_in_sharded_index(tmp_path):
  d = _copy("sharded", tmp_path)
  index = json.loads((d / hf.INDEX_FILE).read_text())
  del index["weight_map"]["model.norm.weight"]
  (d / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError,
                     match=r"model\.safetensors\.index\.json: missing tensor"
                     r" 'model\.norm\.weight'"):
    hf.load(d)


def test_missing_shard_file(tmp_path):
  d = _copy("sharded", tmp_path)
  os.remove(d / "model-00002-of-00006.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00006"):
    hf.load(d)


def test_misshapen_tensor_names_file_tensor_and_shapes(tmp_path):
  d = _copy("sharded", tmp_path)
  index = json.loads((d / hf.INDEX_FILE).read_text())
  name = "model.layers.0.self_attn.k_proj.weight"
  shard = index["weight_map"][name]
  with safetensors.safe_open(str(d / shard), "numpy") as h:
    tensors = {k: h.get_tensor(k) for k in h.keys()}
  tensors[name] = tensors[name].T.copy()  # [in, out] instead of [out, in]
  save_file(tensors, str(d / shard))
  with pytest.raises(ValueError) as e:
    hf.load(d)
  msg = str(e.value)
  assert shard in msg and repr(name) in msg
  assert "shape [32, 16], expected [16, 32]" in msg


def test_unexpected_tensor_is_an_error(tmp_path):
  d = _copy("mha", tmp_path)
  tensors = safetensors_folder.read_all(d)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  save_file(tensors, str(d / hf.SINGLE_FILE))
  with pytest.raises(ValueError, match="q_proj.bias"):
    hf.load(d)


def test_no_weights_file(tmp_path):
  d = _copy("mha", tmp_path)
  os.remove(d / hf.SINGLE_FILE)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load(d)


def test_save_refuses_non_llama_variants(tmp_path):
  config = preset("tiny_mha").replace(position_embedding="learned")
  model = Llama(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="position_embedding='learned'"):
    hf.save(config, model, tmp_path / "out")
