"""Builds the tiny Hugging Face fixtures under tests/fixtures/hf/.

Run by hand (never by the tests), with torch + transformers in a venv of their
own so the project venv stays free of torch:

  python3 -m venv .venv-fixtures
  .venv-fixtures/bin/pip install torch==2.13.0 transformers safetensors numpy
  .venv-fixtures/bin/python tests/make_hf_fixtures.py

For each case it builds a random causal LM of the case's model_type (llama,
llama with Llama-3 rope scaling, qwen2, qwen3, olmo2) through
`transformers.AutoModelForCausalLM`, saves it (config.json + safetensors), and
stores fixed input tokens (`tokens.npy`, int32 [B, T]), the fp32 logits
transformers computes for them (`logits.npy`, [B, T, V]) and, for the
families, transformers' greedy continuation of those tokens
(`greedy.npy`, int32 [B, GREEDY_TOKENS], `model.generate` with the KV cache).
Weights are redrawn with a larger spread than the default init (and norm
scales are not all ones) so that a wrong mapping or transpose changes the
logits visibly. The family configs set every value our loader has a default
for (head_dim, rms_norm_eps, rope) to something else, so a loader that
ignored config.json would fail.

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

# name -> (model_type, transformers config kwargs, save_pretrained kwargs)
CASES = {
    # Multi-head attention (num_key_value_heads == num_attention_heads).
    "mha": ("llama", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, rms_norm_eps=1e-6,
                 max_position_embeddings=64), {}),
    # Grouped-query attention, head_dim != hidden / heads, other rope theta.
    "gqa": ("llama", dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=64), {}),
    # Tied input/output embeddings (no lm_head.weight in the file).
    "tied": ("llama", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=64), {}),
    # A sharded checkpoint: model.safetensors.index.json + several shards.
    "sharded": ("llama", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64),
                dict(max_shard_size="20KB")),
    # Llama-3.1's rope scaling, with a short original context so that the
    # low-, medium- and high-frequency branches all occur at head_dim 16.
    "llama3": ("llama", dict(
        vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, rms_norm_eps=2e-6, max_position_embeddings=64,
        bos_token_id=5, eos_token_id=6,
        rope_parameters=dict(rope_type="llama3", rope_theta=20000.0,
                             factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0,
                             original_max_position_embeddings=32)), {}),
    # Qwen2.5: q/k/v biases, tied head (as Qwen2.5-0.5B/1.5B/3B).
    "qwen2": ("qwen2", dict(
        vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=3e-6, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=7, eos_token_id=8,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0)), {}),
    # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads (and != 128).
    "qwen3": ("qwen3", dict(
        vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=4e-6, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=9, eos_token_id=10,
        rope_parameters=dict(rope_type="default", rope_theta=50000.0)), {}),
    # OLMo-2: q/k RMSNorm over the whole projection, norms after sublayers.
    "olmo2": ("olmo2", dict(
        vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=3e-6, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=11, eos_token_id=12,
        pad_token_id=1,
        rope_parameters=dict(rope_type="default", rope_theta=30000.0)), {}),
}
# Cases whose greedy continuation is stored too.
FAMILY_CASES = ("llama3", "qwen2", "qwen3", "olmo2")
BATCH, LENGTH = 2, 12
GREEDY_TOKENS = 16


def build(name: str, model_type: str, config_kw: dict, save_kw: dict,
          seed: int) -> None:
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
  if name in FAMILY_CASES:
    np.save(os.path.join(out_dir, "greedy.npy"), greedy(model, tokens))
  files = sorted(os.listdir(out_dir))
  print(f"{name}: {files}")


def greedy(model, tokens: np.ndarray) -> np.ndarray:
  """transformers' greedy continuation (KV cache), GREEDY_TOKENS per row.

  No EOS stops it. Also checks that every step's argmax is clear (top-2 gap
  of the full-forward logits > 1e-3), so the tokens do not hinge on rounding.
  """
  gen = transformers.GenerationConfig(
      do_sample=False, max_new_tokens=GREEDY_TOKENS,
      min_new_tokens=GREEDY_TOKENS, eos_token_id=None, pad_token_id=0)
  with torch.no_grad():
    out = model.generate(torch.from_numpy(tokens).long(),
                         attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                         generation_config=gen).numpy()
    logits = model(torch.from_numpy(out[:, :-1])).logits.float().numpy()
  new = out[:, tokens.shape[1]:].astype(np.int32)
  steps = logits[:, tokens.shape[1] - 1:]
  top2 = np.sort(steps, axis=-1)[..., -2:]
  gap = float((top2[..., 1] - top2[..., 0]).min())
  if gap < 1e-3 or not np.array_equal(steps.argmax(-1), new):
    raise SystemExit(f"greedy: argmax gap {gap} too small, or generate"
                     " disagrees with the full forward; change the seed")
  return new


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
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, attn_implementation="eager", dtype=torch.float32)
    model_type = json.load(open(os.path.join(tmp, "config.json")))[
        "model_type"]
    if model_type != CASES[name][0]:
      raise SystemExit(f"{name}: hf.save wrote model_type={model_type!r}")
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
  parser.add_argument("--cases", nargs="+", choices=sorted(CASES),
                      default=list(CASES),
                      help="build/check only these (seeds do not change)")
  parser.add_argument("--roundtrip-only", action="store_true",
                      help="skip regeneration; only check hf.save output")
  args = parser.parse_args()
  torch.set_num_threads(1)
  if not args.roundtrip_only:
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, (model_type, config_kw, save_kw)) in enumerate(
        CASES.items()):
      if name in args.cases:
        build(name, model_type, config_kw, save_kw, seed)
    # Which versions wrote each case (cases rebuilt alone keep the others').
    versions_path = os.path.join(OUT, "VERSIONS.json")
    versions = {"generator": "tests/make_hf_fixtures.py", "cases": {}}
    if os.path.exists(versions_path):
      with open(versions_path) as f:
        versions["cases"] = json.load(f).get("cases", {})
    for name in args.cases:
      versions["cases"][name] = {"transformers": transformers.__version__,
                                 "torch": torch.__version__,
                                 "python": sys.version.split()[0]}
    with open(versions_path, "w") as f:
      json.dump(versions, f, indent=2, sort_keys=True)
  if not args.no_roundtrip:
    for name in args.cases:
      roundtrip(name, args.project_python)


if __name__ == "__main__":
  main()
