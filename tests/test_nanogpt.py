"""nanoGPT `ckpt.pt` import against logits computed by PyTorch.

tests/fixtures/nanogpt/ was written by tests/make_nanogpt_fixture.py (a
nanoGPT GPT with SwiGLU in PyTorch, saved as nanoGPT's train.py saves);
expected logits come from PyTorch in float64. torch is not needed here.
"""

import io
import os
import pickle
import zipfile

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from optconsist_jax.io import nanogpt
from optconsist_jax.io import torch_pickle
from optconsist_jax.model.loss import masked_cross_entropy
from optconsist_jax.model import Llama

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nanogpt")
CKPT = os.path.join(FIXTURES, "ckpt.pt")


def _fixture(name):
  return np.load(os.path.join(FIXTURES, name))


@pytest.fixture(scope="module")
def raw():
  return torch_pickle.read_torch_checkpoint(CKPT)


@pytest.fixture(scope="module")
def state(raw):
  """The model state dict as numpy, `_orig_mod.` prefix stripped."""
  return {k: v.numpy() for k, v in
          nanogpt.strip_compile_prefix(dict(raw["model"])).items()}


@pytest.fixture(scope="module")
def reference(raw, state):
  return nanogpt.convert_state_dict(state, raw["model_args"], path=CKPT)


def _model(config, params):
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  nanogpt.set_params(model, params)
  return model


def test_logits_match_torch():
  config, model = nanogpt.load_nanogpt(CKPT)
  logits = np.asarray(model(jnp.asarray(_fixture("tokens.npy"))))
  expected = _fixture("logits.npy")
  assert np.abs(expected).max() > 1.0  # Not a degenerate near-zero model.
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  assert config.vocab_size == 96 and config.hidden_size == 64
  assert config.num_layers == 2 and config.num_heads == 4
  assert config.num_kv_heads == 4 and config.intermediate_size == 176
  assert config.max_position_embeddings == 32
  assert config.position_embedding == "learned"
  assert config.norm_type == "layer" and config.tie_embeddings
  assert config.rms_norm_eps == 1e-5


def test_compile_prefix_present_and_stripped(raw, reference):
  keys = list(raw["model"])
  assert keys and all(k.startswith("_orig_mod.") for k in keys)
  # The same weights without the prefix give the same params.
  plain = {k[len("_orig_mod."):]: v for k, v in raw["model"].items()}
  _, params = nanogpt.convert_state_dict(plain, raw["model_args"])
  for k, v in reference[1].items():
    np.testing.assert_array_equal(params[k], v)


def test_reads_whole_train_py_checkpoint(raw, state):
  assert raw["iter_num"] == 3
  assert raw["model_args"]["bias"] is False
  assert raw["config"]["dataset"] == "openwebtext"
  loss = raw["best_val_loss"].numpy()
  assert loss.shape == () and np.isfinite(loss)
  opt = raw["optimizer"]
  assert opt["param_groups"][0]["betas"] == (0.9, 0.95)
  exp_avg = opt["state"][0]["exp_avg"].numpy()
  assert exp_avg.shape == state["transformer.wte.weight"].shape
  assert np.abs(exp_avg).sum() > 0


def test_rmsnorm_variant_from_config():
  config, model = nanogpt.load_nanogpt(os.path.join(FIXTURES, "ckpt_rms.pt"))
  assert config.norm_type == "rms" and config.num_layers == 1
  logits = np.asarray(model(jnp.asarray(_fixture("tokens_rms.npy"))))
  np.testing.assert_allclose(logits, _fixture("logits_rms.npy"), atol=1e-4,
                             rtol=0)


def test_norm_type_override_changes_the_model():
  _, model = nanogpt.load_nanogpt(CKPT, norm_type="rms")
  logits = np.asarray(model(jnp.asarray(_fixture("tokens.npy"))))
  assert np.abs(logits - _fixture("logits.npy")).max() > 1e-2


def test_bf16_storage(reference):
  config, params = nanogpt.load_nanogpt_params(
      os.path.join(FIXTURES, "ckpt_bf16.pt"))
  assert config == reference[0]
  for k, v in reference[1].items():
    rounded = v.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params[k], rounded)


def test_load_in_bfloat16():
  config, model = nanogpt.load_nanogpt(CKPT, dtype=jnp.bfloat16)
  assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  logits = np.asarray(model(jnp.asarray(_fixture("tokens.npy"))))
  agree = np.mean(logits.argmax(-1) == _fixture("logits.npy").argmax(-1))
  assert agree > 0.9


def _relayout(state, layout):
  """Rewrites the fixture's c_fc (gate) / c_fc2 (up) / c_proj (down)."""
  out = {k: v for k, v in state.items() if ".mlp." not in k}
  for i in range(2):
    p = f"transformer.h.{i}.mlp."
    gate, up, down = (state[p + n + ".weight"] for n in ("c_fc", "c_fc2",
                                                         "c_proj"))
    if layout == "c_fc[gate;up]|c_proj":
      new = {"c_fc": np.concatenate([gate, up]), "c_proj": down}
    elif layout == "c_fc[up;gate]|c_proj":
      new = {"c_fc": np.concatenate([up, gate]), "c_proj": down}
    elif layout == "c_fc2|c_fc|c_proj":
      new = {"c_fc2": gate, "c_fc": up, "c_proj": down}
    else:
      gate_name, up_name, down_name = layout.split("|")
      new = {gate_name: gate, up_name: up, down_name: down}
    out.update({p + n + ".weight": w for n, w in new.items()})
  return out


@pytest.mark.parametrize("layout,explicit", [
    ("c_fc[gate;up]|c_proj", False),
    ("c_fc[up;gate]|c_proj", True),
    ("c_fc2|c_fc|c_proj", True),
    ("w1|w3|w2", False),
    ("gate_proj|up_proj|down_proj", False),
    ("fc_1|fc_2|proj", False),
])
def test_mlp_layouts(raw, state, reference, layout, explicit):
  _, params = nanogpt.convert_state_dict(
      _relayout(state, layout), raw["model_args"],
      mlp_layout=layout if explicit else "auto")
  assert set(params) == set(reference[1])
  for k, v in reference[1].items():
    np.testing.assert_array_equal(params[k], v, err_msg=f"{layout}: {k}")


def test_unknown_layout_names_file_and_keys(raw, state):
  bad = {k.replace("mlp.c_fc2", "mlp.mystery"): v for k, v in state.items()}
  with pytest.raises(ValueError, match=r"ckpt\.pt.*unknown SwiGLU layout"
                     r".*transformer\.h\.0\.mlp\.mystery\.weight"):
    nanogpt.convert_state_dict(bad, raw["model_args"], path=CKPT)


def test_gelu_mlp_refused(raw, state):
  d = 64
  gelu = {k: v for k, v in state.items() if ".mlp." not in k}
  for i in range(2):
    gelu[f"transformer.h.{i}.mlp.c_fc.weight"] = np.zeros((4 * d, d))
    gelu[f"transformer.h.{i}.mlp.c_proj.weight"] = np.zeros((d, 4 * d))
  with pytest.raises(ValueError, match="GELU"):
    nanogpt.convert_state_dict(gelu, raw["model_args"], path=CKPT)


def test_missing_key_names_file_and_key(raw, state):
  bad = dict(state)
  del bad["transformer.h.1.ln_2.weight"]
  with pytest.raises(ValueError, match=r"ckpt\.pt: missing key "
                     r"'transformer\.h\.1\.ln_2\.weight'"):
    nanogpt.convert_state_dict(bad, raw["model_args"], path=CKPT)
  args = dict(raw["model_args"])
  del args["n_embd"]
  with pytest.raises(ValueError, match="model_args has no 'n_embd'"):
    nanogpt.convert_state_dict(state, args, path=CKPT)


def test_wrong_shape_and_unmapped_keys_refused(raw, state):
  bad = dict(state)
  bad["transformer.wpe.weight"] = state["transformer.wpe.weight"][:16]
  with pytest.raises(ValueError, match=r"'transformer\.wpe\.weight' has shape"):
    nanogpt.convert_state_dict(bad, raw["model_args"], path=CKPT)
  extra = dict(state)
  extra["transformer.h.0.attn.q_norm.weight"] = np.ones(16)
  with pytest.raises(ValueError, match="not mapped.*q_norm"):
    nanogpt.convert_state_dict(extra, raw["model_args"], path=CKPT)


def test_biases_refused_but_mask_buffer_ignored(raw, state, reference):
  with_bias = dict(state)
  with_bias["transformer.h.0.attn.c_attn.bias"] = np.zeros(3 * 64)
  with pytest.raises(ValueError, match="bias"):
    nanogpt.convert_state_dict(with_bias, raw["model_args"], path=CKPT)
  with_mask = dict(state)
  with_mask["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32)))
  _, params = nanogpt.convert_state_dict(with_mask, raw["model_args"])
  np.testing.assert_array_equal(params["embed"], reference[1]["embed"])


def test_untied_head(raw, state):
  # logits are linear in the head: a head of 2 * wte doubles them.
  untied = dict(state)
  untied["lm_head.weight"] = 2.0 * state["transformer.wte.weight"]
  config, params = nanogpt.convert_state_dict(untied, raw["model_args"])
  assert not config.tie_embeddings
  logits = np.asarray(_model(config, params)(
      jnp.asarray(_fixture("tokens.npy"))))
  np.testing.assert_allclose(logits, 2.0 * _fixture("logits.npy"), atol=2e-4,
                             rtol=0)


def test_finetuning_step_lowers_loss():
  config, model = nanogpt.load_nanogpt(CKPT)
  tokens = jnp.asarray(_fixture("tokens.npy"))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = jnp.ones(targets.shape, jnp.float32)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(inputs)
    total, count = masked_cross_entropy(logits, targets, weights)
    return total / count

  # Jitted: op by op, each of the model's ops compiles on its own.
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)
  before, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert float(jnp.abs(grads["pos_embed"].get_value()).sum()) > 0
  updates, _ = jax.jit(opt.update)(grads, opt_state, params)
  after = jax.jit(loss_fn)(optax.apply_updates(params, updates))
  assert config.max_position_embeddings == 32
  assert float(after) < float(before)


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("evil/data.pkl", payload)
    zf.writestr("evil/version", "3\n")


class _Exploit:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_global_refused(tmp_path):
  marker = tmp_path / "pwned"
  ckpt = tmp_path / "ckpt.pt"
  _zip_with_pickle(ckpt, pickle.dumps({"model": _Exploit(marker)}, protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError,
                     match=r"ckpt\.pt: refusing to load global .*system"):
    nanogpt.load_nanogpt(ckpt)
  assert not marker.exists()
  _zip_with_pickle(ckpt, pickle.dumps(
      {"model": {}, "model_args": io.BytesIO}, protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"_io\.BytesIO"):
    torch_pickle.read_torch_checkpoint(ckpt)


def test_not_a_checkpoint(tmp_path):
  legacy = tmp_path / "old.pt"
  legacy.write_bytes(pickle.dumps({"model": {}}))
  with pytest.raises(ValueError, match=r"old\.pt: not a torch zip"):
    nanogpt.load_nanogpt(legacy)
  plain = tmp_path / "plain.pt"
  _zip_with_pickle(plain, pickle.dumps({"weights": {}}, protocol=2))
  with pytest.raises(ValueError, match=r"plain\.pt: checkpoint has no 'model'"):
    nanogpt.load_nanogpt(plain)
  with pytest.raises(FileNotFoundError):
    nanogpt.load_nanogpt(tmp_path / "missing.pt")


def test_read_config_matches_full_load(reference):
  assert nanogpt.read_config(CKPT) == reference[0]
  assert nanogpt.read_config(CKPT, norm_type="rms").norm_type == "rms"


def test_load_params_into_sharded_model(reference):
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  config = nanogpt.read_config(CKPT).replace(param_dtype="bfloat16")
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = [("vocab", "tensor"), ("embed", "fsdp"), ("positions", None),
           ("layers", None), ("heads", "tensor"), ("kv_heads", "tensor"),
           ("mlp", "tensor"), ("norm", None)]
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  abstract_params = nnx.state(abstract, nnx.Param)
  shardings = sharding.state_shardings(abstract_params, mesh, rules)
  params = nanogpt.load_params_into(CKPT, abstract_params, shardings,
                                    model_config=config)
  flat = {"/".join(map(str, k)): v.get_value()
          for k, v in nnx.to_flat_state(params)}
  assert set(flat) == set(reference[1])
  q = flat["layers/attn/q_proj/kernel"]
  assert q.dtype == jnp.bfloat16
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len(q.addressable_shards) == 8
  for k, v in reference[1].items():
    np.testing.assert_array_equal(
        np.asarray(flat[k].astype(jnp.float32)),
        v.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)


def test_config_mismatch_refused():
  config = nanogpt.read_config(CKPT).replace(intermediate_size=128)
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"ckpt\.pt: config\.model does not match"
                     r".*intermediate_size: config 128, file 176"):
    nanogpt.load_params_into(CKPT, nnx.state(abstract, nnx.Param),
                             model_config=config)
