"""Finetuning a DeepSeek-V3 Hugging Face folder with the trainer (AdamW, Muon,
LoRA on every linear layer and the routed experts: model/lora.py).

The base is a tiny random DeepSeek-V3 of the transformers fixture's shapes
(tests/fixtures/hf/deepseek_v3/config.json) with the tiny tokenizer's 2,048
token vocabulary, written by `hf.save` (whose output transformers loads:
test_deepseek_v3.py), with a random experts' selection bias so that its
loading is visible. The data is 8 synthetic examples packed into exactly one
batch of 8 rows, so every step sees the same batch.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import tiny_config
from optconsist_jax import train
from optconsist_jax import typed_config
from optconsist_jax.io import hf
from optconsist_jax.io import hf_deepseek
from optconsist_jax.io import weights
from optconsist_jax.model import deepseek_v3
from optconsist_jax.model.deepseek_v3_config import DeepseekV3Config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf",
                       "deepseek_v3")
NUM_STEPS = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with open(os.path.join(FIXTURE, hf.CONFIG_FILE)) as f:
    config = hf_deepseek.config_from_hf(json.load(f)).replace(
        vocab_size=2048, max_position_embeddings=128)
  model = deepseek_v3.make_model(config, seed=3)
  bias = model.moe_layers.mlp.router_bias
  bias[...] = jax.random.normal(jax.random.key(4), bias[...].shape) * 0.1
  folder = tmp_path_factory.mktemp("deepseek_base")
  hf.save(config, model, str(folder))
  return str(folder), np.asarray(bias[...])


def _config(folder, optimizer, **extra):
  return tiny_config.load(optimizer, {
      "model": {"preset": "from_init"}, "init_from.path": folder,
      "data.synthetic_examples": 8, "data.seq_len": 64,
      "data.global_batch_size": 8, "train.num_steps": NUM_STEPS + 1,
      "train.log_every": 1, "train.progress_every_secs": 1000.0,
      "optim.groups.adamw.schedule.kind": "constant",
      **({"optim.groups.muon.schedule.kind": "constant"}
         if optimizer == "muon" else {}),
      "checkpoint.every_steps": NUM_STEPS, "checkpoint.async_save": False,
      **extra})


# AdamW and Muon finetuning of such a folder run in
# tests/test_deepseek_v3_study_e2e.py (through the study; Muon's per-expert
# update: tests/test_muon_moe.py); here LoRA, whose parameters are
# MoE-specific (adapters on the routed experts), also resumes and merges.
@pytest.mark.parametrize("optimizer", ["lora"])
def test_finetune_lowers_loss_and_resumes(base, optimizer, tmp_path):
  folder, bias = base
  cfg = _config(folder, optimizer)
  assert isinstance(cfg.model, DeepseekV3Config)
  assert cfg.model.vocab_size == 2048  # from the folder, not the config file
  # Stopped (as on preemption) after NUM_STEPS of NUM_STEPS + 1 steps.
  result = train.train(cfg, tmp_path, stop_after=NUM_STEPS)
  assert result.step == NUM_STEPS and result.stopped == "preempted"
  losses = [result.losses[s] for s in range(1, NUM_STEPS + 1)]
  assert np.all(np.isfinite(losses))
  # The same batch every step: each step lowers its loss.
  assert losses[2] < losses[1] < losses[0], losses
  # The checkpoint restores: the run resumes at NUM_STEPS (params and
  # optimizer state) and trains on from there.
  more = train.train(cfg, tmp_path)
  assert more.step == NUM_STEPS + 1 and list(more.losses) == [NUM_STEPS + 1]
  assert more.losses[NUM_STEPS + 1] < losses[-1]
  # The checkpoint holds the base's selection bias, untrained.
  lora = typed_config.to_jsonable(cfg.lora) if cfg.lora else None
  model = weights.restore_run_model(tmp_path, cfg.model, lora=lora)
  assert isinstance(model, deepseek_v3.DeepseekV3)
  np.testing.assert_array_equal(
      np.asarray(model.moe_layers.mlp.router_bias[...]), bias)
  # ... and its trained weights are not the base's (LoRA's merged in by
  # restore_run_model, the routed experts' adapters included).
  _, start = hf.load(folder)
  assert not np.allclose(np.asarray(model.moe_layers.mlp.up_proj[...]),
                         np.asarray(start.moe_layers.mlp.up_proj[...]))
  # An Orbax run of a DeepSeek-V3 is a base too (its config.json's model).
  assert weights.model_config_of(str(tmp_path)) == cfg.model


def test_flops_per_token_counts_activated_experts():
  c = DeepseekV3Config(num_layers=2, first_k_dense_replace=0,
                       n_routed_experts=8, num_experts_per_tok=2,
                       n_shared_experts=1)
  more_experts = dataclasses.replace(c, n_routed_experts=64)
  # Only the router grows with the expert count: 6 * d per added expert.
  assert more_experts.flops_per_token(16) - c.flops_per_token(16) == (
      6.0 * c.num_layers * c.hidden_size * 56)
  more_active = dataclasses.replace(c, num_experts_per_tok=3)
  assert more_active.flops_per_token(16) - c.flops_per_token(16) == (
      6.0 * c.num_layers * 3 * c.hidden_size * c.moe_intermediate_size)
