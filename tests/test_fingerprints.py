"""Fingerprints: spectra vs numpy SVD, statistics vs numpy, plots written."""

import json

from flax import nnx
import jax
import numpy as np
import pytest
import residual_spy

from optconsist_jax.experiments import fingerprints
from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model import Llama
from optconsist_jax.model import preset
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config

_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ava has 3 apples. She buys 4 more apples. How many apples does Ava have?",
    "def add(a, b):\n  return a + b",
    "A box holds 12 marbles and Ben fills 3 boxes.",
] * 6


def _model(seed=0, scan=True):
  config = preset("tiny_gqa").replace(vocab_size=2048, scan_layers=scan,
                                      max_position_embeddings=256)
  return Llama(config, rngs=nnx.Rngs(seed))


def _capture_residuals(monkeypatch) -> list[np.ndarray]:
  """Every residual stream the model's statistics see, in call order."""
  return residual_spy.capture_residuals(
      monkeypatch, fingerprints._stats)  # pylint: disable=protected-access


def test_spectra_match_numpy_svd_of_each_layer():
  model = _model()
  spectra = fingerprints.weight_spectra(model)
  state = {"/".join(map(str, p)): v[...] for p, v in
           nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert set(spectra) == {"q", "k", "v", "o", "gate", "up", "down"}
  c = model.config
  for path, kind in fingerprints.MATRIX_KINDS.items():
    if path not in state:
      continue
    w = np.asarray(state[path], np.float64)
    assert spectra[kind].shape == (c.num_layers, min(w.shape[1:]))
    for layer in range(c.num_layers):
      s = np.linalg.svd(w[layer], compute_uv=False)  # unstacked matrix
      np.testing.assert_allclose(spectra[kind][layer], s / s[0], rtol=1e-10)
      assert spectra[kind][layer][0] == pytest.approx(1.0)
  # Stable rank of an orthogonal matrix is its size.
  q = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))[0]
  s = np.linalg.svd(q, compute_uv=False)[None]
  np.testing.assert_allclose(fingerprints.stable_rank(s / s[:, :1]), [8.0])


def test_spectra_accept_state_and_reject_foreign_trees():
  model = _model()
  a = fingerprints.weight_spectra(nnx.state(model, nnx.Param))
  b = fingerprints.weight_spectra(model)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(KeyError, match="layers"):
    fingerprints.weight_spectra({"embed": np.zeros((4, 4))})


def test_deepseek_spectra_take_each_expert_as_a_matrix():
  config = DeepseekV3Config(
      vocab_size=32, hidden_size=16, intermediate_size=24,
      moe_intermediate_size=8, num_layers=3, num_heads=2,
      first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
      qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
      n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
      n_group=1, topk_group=1, max_position_embeddings=16)
  model = deepseek_v3.make_model(config, seed=0)
  spectra = fingerprints.weight_spectra(model)
  assert set(spectra) == {"q", "kv_a", "kv_b", "o", "gate", "up", "down",
                          "shared_gate", "shared_up", "shared_down",
                          "expert_gate", "expert_up", "expert_down"}
  # MLA's projections: the dense layer's then the MoE layers'.
  assert spectra["kv_b"].shape == (3, 8)
  # Routed experts: 2 MoE layers x 4 experts, layer-major.
  up = np.asarray(model.moe_layers.mlp.up_proj[...], np.float64)
  assert spectra["expert_up"].shape == (8, 8)
  s = np.linalg.svd(up[1, 2], compute_uv=False)
  np.testing.assert_allclose(spectra["expert_up"][1 * 4 + 2], s / s[0],
                             rtol=1e-10)


def _numpy_stats(x):
  x = np.asarray(x, np.float64)
  c = x - x.mean()
  return {"mean": x.mean(), "rms": np.sqrt(np.mean(x * x)),
          "max_abs": np.abs(x).max(),
          "kurtosis": np.mean(c**4) / np.mean(c**2) ** 2}


@pytest.mark.parametrize("batch_size", [4, 2])
def test_activation_stats_match_numpy_on_captured_residuals(monkeypatch,
                                                            batch_size):
  tok = Tokenizer.tiny()
  model = _model(seed=1)
  seq_len, max_rows = 32, 4
  # Rows built independently of pack_rows.
  stream = []
  for t in _TEXTS:
    stream += [tok.bos_id, *tok.encode(t), tok.eos_id]
  rows = np.asarray(stream[:max_rows * seq_len]).reshape(max_rows, seq_len)

  captured = _capture_residuals(monkeypatch)
  got = fingerprints.activation_stats(model, tok, _TEXTS, seq_len=seq_len,
                                      batch_size=batch_size,
                                      max_rows=max_rows)
  jax.effects_barrier()
  fingerprints._stats.clear_cache()  # pylint: disable=protected-access
  layers = model.config.num_layers
  n_batches = max_rows // batch_size
  assert len(captured) == layers * n_batches
  assert got["num_tokens"] == max_rows * seq_len
  # Captured residuals are exactly the rows' (the first layer's input is the
  # embedding of these tokens: check the batch layout through shapes).
  assert captured[0].shape == (batch_size, seq_len, model.config.hidden_size)
  per_layer = [np.concatenate(captured[l::layers]) for l in range(layers)]
  for l in range(layers):
    ref = _numpy_stats(per_layer[l])
    assert got["mean"][l] == pytest.approx(ref["mean"], rel=1e-4, abs=1e-6)
    assert got["rms"][l] == pytest.approx(ref["rms"], rel=1e-4)
    assert got["max_abs"][l] == pytest.approx(ref["max_abs"], rel=1e-5)
    if batch_size == max_rows:
      assert got["kurtosis"][l] == pytest.approx(ref["kurtosis"], rel=1e-3)
    else:  # documented: the average of per-batch kurtoses
      kb = [_numpy_stats(captured[b * layers + l])["kurtosis"]
            for b in range(n_batches)]
      assert got["kurtosis"][l] == pytest.approx(np.mean(kb), rel=1e-3)
  # The residual after the last layer, recomputed through the final norm and
  # head, gives the model's own logits for these rows.
  x = per_layer[-1]
  scale = np.asarray(model.final_norm.scale[...], np.float64)
  eps = model.config.rms_norm_eps
  h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale
  logits = h @ np.asarray(model.lm_head.kernel[...], np.float64)
  np.testing.assert_allclose(logits, np.asarray(model(rows), np.float64),
                             rtol=1e-3, atol=1e-4)


def test_pack_rows_rejects_too_little_text():
  with pytest.raises(ValueError, match="seq_len=512"):
    fingerprints.pack_rows(Tokenizer.tiny(), ["hi"], 512)


def test_compare_writes_plots_and_numbers(tmp_path, monkeypatch):
  """compare()'s JSON against numpy: SVDs, norms and captured residuals."""
  tok = Tokenizer.tiny()
  models = {"adamw": (_model(0), tok), "muon": (_model(1), tok)}
  captured = _capture_residuals(monkeypatch)
  # One batch of 2 rows per model, so every statistic is exact.
  paths = fingerprints.compare(models, _TEXTS, tmp_path / "fp", seq_len=32,
                               batch_size=2, max_rows=2)
  jax.effects_barrier()
  fingerprints._stats.clear_cache()  # pylint: disable=protected-access
  for key in ("spectra", "activations"):
    with open(paths[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(paths["json"]) as f:
    d = json.load(f)
  assert set(d["models"]) == {"adamw", "muon"}
  layers = models["adamw"][0].config.num_layers
  assert len(captured) == 2 * layers
  for i, (name, (model, _)) in enumerate(models.items()):
    m = d["models"][name]
    assert m["num_tokens"] == 2 * 32
    state = {"/".join(map(str, p)): v[...] for p, v in
             nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(m["spectra"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    for path, kind in fingerprints.MATRIX_KINDS.items():
      if path not in state:
        continue
      w = np.asarray(state[path], np.float64)
      for l in range(layers):
        s = np.linalg.svd(w[l], compute_uv=False)
        np.testing.assert_allclose(m["spectra"][kind][l], s / s[0],
                                   rtol=1e-8)
        # Stable rank = ||W||_F^2 / ||W||_2^2.
        assert m["stable_rank"][kind][l] == pytest.approx(
            np.linalg.norm(w[l], "fro") ** 2 / np.linalg.norm(w[l], 2) ** 2,
            rel=1e-8)
    for l in range(layers):
      ref = _numpy_stats(captured[i * layers + l])
      for stat in fingerprints.STATS:
        assert m["activations"][stat][l] == pytest.approx(
            ref[stat], rel=1e-3, abs=1e-6), (name, stat, l)
  # Different seeds, different fingerprints (the models are not mixed up).
  assert d["models"]["adamw"]["spectra"] != d["models"]["muon"]["spectra"]
