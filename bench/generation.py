"""Greedy generation tokens/s with and without the KV cache.

Random weights of the `llama_100m` preset (speed does not depend on the
values), random prompt tokens, no EOS (every row generates `--new_tokens`).
Each mode is run once to compile and once timed; the timed run is reported.
Tokens/s counts generated tokens (batch x new tokens) over the wall time of
prefill + decoding.

Run: .venv/bin/python bench/generation.py [--preset llama_100m] [--batch 4]
       [--prompt_len 64] [--new_tokens 32]
Writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def run(model, tokens, lens, new_tokens: int, use_cache: bool) -> dict:
  from optconsist_jax import generate as gen  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  gen.greedy_decode(model, tokens, lens, new_tokens, eos_id=None,
                    use_cache=use_cache, chunk_size=new_tokens)
  compile_and_run = time.perf_counter() - t0
  t0 = time.perf_counter()
  out, lengths = gen.greedy_decode(model, tokens, lens, new_tokens,
                                   eos_id=None, use_cache=use_cache,
                                   chunk_size=new_tokens)
  seconds = time.perf_counter() - t0
  generated = int(lengths.sum())
  assert generated == tokens.shape[0] * new_tokens
  return {"use_cache": use_cache, "seconds": seconds,
          "first_call_seconds_incl_compile": compile_and_run,
          "generated_tokens": generated,
          "tokens_per_second": generated / seconds,
          "tokens": out.tolist()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="llama_100m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "generation.json"))
  args = p.parse_args()

  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import Llama, preset  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model.llama import parameter_count  # pylint: disable=g-import-not-at-top

  config = preset(args.preset)
  model = Llama(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size,
                        (args.batch, args.prompt_len)).astype(np.int32)
  # Rows of different prompt lengths (left-padded), as in real evaluation.
  lens = np.array([args.prompt_len - (i * args.prompt_len) // (2 * args.batch)
                   for i in range(args.batch)], np.int32)
  for r, n in enumerate(lens):
    tokens[r, :args.prompt_len - n] = 0

  cached = run(model, tokens, lens, args.new_tokens, use_cache=True)
  full = run(model, tokens, lens, args.new_tokens, use_cache=False)
  same = cached.pop("tokens") == full.pop("tokens")
  result = {
      "command": "python " + " ".join(sys.argv),
      "preset": args.preset, "params": parameter_count(model),
      "batch": args.batch, "prompt_len": args.prompt_len,
      "prompt_lens": lens.tolist(), "new_tokens": args.new_tokens,
      "dtype": config.dtype,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
      "note": ("shared CPU (other jobs running); tokens/s = generated tokens"
               " / wall time of the second (compiled) call"),
      "with_cache": cached, "without_cache": full,
      "speedup": cached["tokens_per_second"] / full["tokens_per_second"],
      "same_tokens_with_and_without_cache": same,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items()
                    if k not in ("with_cache", "without_cache")}, indent=2))
  for k in ("with_cache", "without_cache"):
    print(k, f"{result[k]['tokens_per_second']:.1f} tokens/s"
          f" ({result[k]['seconds']:.2f} s)")


if __name__ == "__main__":
  main()
