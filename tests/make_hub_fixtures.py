"""Builds tiny local "Hub" folders under tests/fixtures/hub/, one per family.

Run by hand (never by the tests) in the fixtures venv (tests/make_hf_fixtures.py
says how to make it):

  .venv-fixtures/bin/python tests/make_hub_fixtures.py

Each folder is what a Hugging Face model repo holds, small enough for the
study's mini mode to finetune, evaluate and report on it in seconds
(tests/test_families_e2e.py): a random causal LM written by transformers
(config.json + model.safetensors) with a tokenizer (tokenizer.json +
tokenizer_config.json) whose pieces its embeddings cover.

  llama3  model_type llama with Llama-3 rope scaling, the llama3 tokenizer
  qwen2   Qwen2.5 (q/k/v biases, tied head), the qwen2 tokenizer
  qwen3   Qwen3 (per-head q/k norm), the qwen2 tokenizer (Qwen3 kept
          Qwen2.5's)
  olmo2   OLMo-2 (q/k norm, norms after the sublayers), the olmo2 tokenizer

The architectures are tests/make_hf_fixtures.py's family cases (the values
our loader has defaults for set to others), widened to the tokenizer's
vocabulary (rounded up to a multiple of 64, as released models pad theirs)
and to 512 positions; the tokenizers are the ones
tests/make_hf_tokenizer_fixtures.py trained (copied from
tests/fixtures/hf_tokenizers/). Beside them, in `expected/` (not part of a
model repo): a prompt, the ids transformers' tokenizer gives it with its
special tokens (`prompt.json`) and transformers' fp32 logits for those ids
(`logits.npy`, [1, T, V]).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers

import make_hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hub")
TOKENIZERS = os.path.join(ROOT, "tests", "fixtures", "hf_tokenizers")

# family -> its tokenizer fixture.
FAMILIES = {"llama3": "llama3", "qwen2": "qwen2", "qwen3": "qwen2",
            "olmo2": "olmo2"}
PROMPT = ("Question: Natalia sold 48 clips in April and half as many in May."
          " How many clips did she sell?\nAnswer:")
POSITIONS = 512


def build(family: str, seed: int) -> None:
  model_type, config_kw, _ = make_hf_fixtures.CASES[family]
  out_dir = os.path.join(OUT, family)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)
  tok_dir = os.path.join(TOKENIZERS, FAMILIES[family])
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok_dir, name), out_dir)
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)
  eos = tok.eos_token_id
  bos = tok.bos_token_id if tok.bos_token_id is not None else eos
  config_kw = dict(config_kw, vocab_size=-(-len(tok) // 64) * 64,
                   max_position_embeddings=POSITIONS, bos_token_id=bos,
                   eos_token_id=eos,
                   pad_token_id=tok.pad_token_id)
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(model_type, **config_kw)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):  # also q_norm / k_norm
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(out_dir)
  gen = os.path.join(out_dir, "generation_config.json")
  if os.path.exists(gen):
    os.remove(gen)
  ids = tok(PROMPT)["input_ids"]
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits.float().numpy()
  expected = os.path.join(out_dir, "expected")
  os.makedirs(expected)
  with open(os.path.join(expected, "prompt.json"), "w") as f:
    json.dump({"text": PROMPT, "ids": ids}, f, indent=1)
  np.save(os.path.join(expected, "logits.npy"), logits.astype(np.float32))
  print(f"{family}: {model_type}, vocab {config.vocab_size} (tokenizer"
        f" {len(tok)}), bos {bos}, eos {eos}, prompt {len(ids)} ids,"
        f" files {sorted(os.listdir(out_dir))}")


def main() -> None:
  argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
  torch.set_num_threads(1)
  for seed, family in enumerate(FAMILIES, start=100):
    build(family, seed)
  with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
    json.dump({"transformers": transformers.__version__,
               "torch": torch.__version__, "python": sys.version.split()[0],
               "generator": "tests/make_hub_fixtures.py"}, f, indent=2)


if __name__ == "__main__":
  main()
