"""Builds the tiny Hugging Face Llama fixtures under tests/fixtures/hf/.

Run by hand (never by the tests), with torch + transformers in a venv of their
own so the project venv stays free of torch:

  python3 -m venv .venv-fixtures
  .venv-fixtures/bin/pip install torch==2.13.0 transformers safetensors numpy
  .venv-fixtures/bin/python tests/make_hf_fixtures.py

For each case it builds a random `transformers.LlamaForCausalLM`, saves it
(config.json + safetensors), and stores fixed input tokens (`tokens.npy`,
int32 [B, T]) and the fp32 logits transformers computes for them
(`logits.npy`, [B, T, V]). Weights are redrawn with a larger spread than the
default init (and norm scales are not all ones) so that a wrong mapping or
transpose changes the logits visibly.

Then (unless --no-roundtrip) it checks the other direction: the project's
Python (`--project-python`, default .venv/bin/python) loads each fixture with
`optconsist_jax.io.hf.load` and writes it back with `hf.save`; transformers must
load that folder and reproduce the expected logits. It prints OK per case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")

# name -> (transformers.LlamaConfig kwargs, save_pretrained kwargs)
CASES = {
    # Multi-head attention (num_key_value_heads == num_attention_heads).
    "mha": (dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, rms_norm_eps=1e-6,
                 max_position_embeddings=64), {}),
    # Grouped-query attention, head_dim != hidden / heads, other rope theta.
    "gqa": (dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=64), {}),
    # Tied input/output embeddings (no lm_head.weight in the file).
    "tied": (dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=64), {}),
    # A sharded checkpoint: model.safetensors.index.json + several shards.
    "sharded": (dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64),
                dict(max_shard_size="20KB")),
}
BATCH, LENGTH = 2, 12


def build(name: str, config_kw: dict, save_kw: dict, seed: int) -> None:
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**config_kw)
  model = transformers.LlamaForCausalLM._from_config(  # pylint: disable=protected-access
      config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  model.eval()
  out_dir = os.path.join(OUT, name)
  shutil.rmtree(out_dir, ignore_errors=True)
  model.save_pretrained(out_dir, **save_kw)
  # Not needed to load a model; keep the fixtures minimal.
  gen = os.path.join(out_dir, "generation_config.json")
  if os.path.exists(gen):
    os.remove(gen)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.vocab_size, (BATCH, LENGTH)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  np.save(os.path.join(out_dir, "tokens.npy"), tokens)
  np.save(os.path.join(out_dir, "logits.npy"), logits.astype(np.float32))
  files = sorted(os.listdir(out_dir))
  print(f"{name}: {files}")


_SAVE_SNIPPET = """
import sys
from optconsist_jax.io import hf
config, model = hf.load(sys.argv[1])
hf.save(config, model, sys.argv[2], max_shard_bytes=int(sys.argv[3]))
"""


def roundtrip(name: str, project_python: str) -> None:
  """Our load -> our save -> transformers load gives the expected logits."""
  src = os.path.join(OUT, name)
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The sharded case is also written sharded (several files + an index).
    max_shard_bytes = 20_000 if name == "sharded" else 2 * 10**9
    subprocess.run([project_python, "-c", _SAVE_SNIPPET, src, tmp,
                    str(max_shard_bytes)], check=True, env=env, cwd=ROOT)
    files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tokens = np.load(os.path.join(src, "tokens.npy"))
    expected = np.load(os.path.join(src, "logits.npy"))
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  err = float(np.max(np.abs(logits - expected)))
  if err > 1e-4:
    raise SystemExit(f"{name}: round trip through hf.save differs by {err}")
  print(f"{name}: transformers loads hf.save output ({len(files)} safetensors"
        f" file(s)), max |dlogits| = {err:.2e} OK")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--project-python",
                      default=os.path.join(ROOT, ".venv", "bin", "python"))
  parser.add_argument("--no-roundtrip", action="store_true")
  parser.add_argument("--roundtrip-only", action="store_true",
                      help="skip regeneration; only check hf.save output")
  args = parser.parse_args()
  torch.set_num_threads(1)
  if not args.roundtrip_only:
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, (config_kw, save_kw)) in enumerate(CASES.items()):
      build(name, config_kw, save_kw, seed)
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
      json.dump({"transformers": transformers.__version__,
                 "torch": torch.__version__,
                 "python": sys.version.split()[0],
                 "generator": "tests/make_hf_fixtures.py"}, f, indent=2)
  if not args.no_roundtrip:
    for name in CASES:
      roundtrip(name, args.project_python)


if __name__ == "__main__":
  main()
