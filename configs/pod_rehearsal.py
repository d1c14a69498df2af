r"""The 7B run's config with a tiny model: what the pod rehearsal trains.

  python -m optconsist_jax.tools.rehearse      (README: before your first pod run)

Every setting of configs/llama2_7b_metamath.py:ARG (the same ARG: variant
and `key=value` settings) is kept: bf16 compute over fp32 params, scanned
layers with full remat, gradient accumulation, the fsdp mesh, the optimizer
preset and its schedule, one checkpoint per epoch kept with params only plus
the newest full one. Only sizes and sources change: the `tiny_gqa` model
with the shipped tiny tokenizer's 2,048-piece vocabulary, random init instead
of Llama-2-7B, generated MetaMathQA-format problems instead of the 395K
file, rows of 64 tokens, 16 rows per step in 2 micro-batches, 16 steps
(`--config.train.num_steps=N` changes it) and a checkpoint every 2 steps.
"""

import importlib.util
import os

_SEVEN_B = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "llama2_7b_metamath.py")


def _seven_b():
  spec = importlib.util.spec_from_file_location("llama2_7b_metamath", _SEVEN_B)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "adamw"):
  c = _seven_b().get_config(arg)
  c.model.preset = "tiny_gqa"
  c.model.vocab_size = 2048
  c.model.max_position_embeddings = 128
  c.init_from.path = ""
  c.data.format = "synthetic"
  c.data.path = ""
  c.data.tokenizer_path = ""
  c.data.synthetic_examples = 400
  c.data.seq_len = 64
  c.data.global_batch_size = 16
  c.train.num_epochs = 0
  c.train.num_steps = 16
  c.train.grad_accum_steps = 2
  c.train.log_every = 1
  c.train.progress_every_secs = 1000.0
  c.checkpoint.every_steps = 2
  return c
