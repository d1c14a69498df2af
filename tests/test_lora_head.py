"""LoRA on the LM head (opt-in target "head"), and the study's switch for it."""

import importlib.util
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optconsist_jax import optim
from optconsist_jax.experiments import study
from optconsist_jax.model import Llama, preset
from optconsist_jax.model import lora as lora_lib
from optconsist_jax.model.llama import Linear

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
REPO = pathlib.Path(__file__).resolve().parent.parent


def test_head_adapter_is_opt_in_trained_and_merged():
  assert "head" not in lora_lib.LoRAConfig().targets
  model = Llama(preset("tiny_gqa"), rngs=nnx.Rngs(0))
  before = np.asarray(model(TOKENS))
  lora_lib.apply_lora(model, lora_lib.LoRAConfig(
      rank=2, alpha=4.0, dropout=0.0,
      targets=lora_lib.DEFAULT_TARGETS + ("head",)), nnx.Rngs(1))
  assert isinstance(model.lm_head, lora_lib.LoRALinear)
  # Identity at init (B = 0).
  np.testing.assert_allclose(np.asarray(model(TOKENS)), before, atol=1e-6)
  # The LoRA preset's routing takes the head's adapter like the others'.
  params = nnx.state(model, lora_lib.LoRAParam)
  tx = optim.build(optim.presets.preset("lora", total_steps=10), params)
  assert jax.tree.leaves(tx.init(params))
  b = model.lm_head.lora_b
  b[...] = jnp.full_like(b[...], 0.05)
  adapted = np.asarray(model(TOKENS))
  assert np.abs(adapted - before).max() > 1e-3
  # Merged: a plain head W + A B alpha / r, same logits.
  merged = lora_lib.merge(model)
  assert isinstance(merged.lm_head, Linear)
  want = (np.asarray(model.lm_head.kernel[...])
          + 2.0 * np.asarray(model.lm_head.lora_a[...])
          @ np.asarray(model.lm_head.lora_b[...]))
  np.testing.assert_allclose(np.asarray(merged.lm_head.kernel[...]), want,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(merged(TOKENS)), adapted, atol=1e-4)


def test_tied_model_has_no_head_to_adapt():
  model = Llama(preset("tiny_tied"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'head'.*no lm_head"):
    lora_lib.apply_lora(model, lora_lib.LoRAConfig(targets=("q", "head")),
                        nnx.Rngs(1))


def test_study_switch_adds_the_head_target():
  spec = importlib.util.spec_from_file_location(
      "small_consistency", REPO / "configs" / "small_consistency.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  d = mod.get_config("mini").to_dict()
  d["finetune"]["lora_head"] = True
  rc = study.ReproConfig.from_dict(d)
  _, runs = study.plan_runs(rc, "/w", "/w/train.json")
  (lora,) = {tuple(r.config["lora"]["targets"]) for r in runs
             if r.labels["method"] == "lora"}
  assert lora == lora_lib.DEFAULT_TARGETS + ("head",)
  d["finetune"]["lora_head"] = False
  _, runs = study.plan_runs(study.ReproConfig.from_dict(d), "/w", "/w/t")
  assert all("targets" not in r.config.get("lora", {}) for r in runs)
