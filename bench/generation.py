"""Greedy generation tokens/s with and without the KV cache.

Random weights of the `llama_100m` preset (speed does not depend on the
values), random prompt tokens, no EOS (every row generates `--new_tokens`).
Each mode is run once to compile and once timed; the timed run is reported.
Tokens/s counts generated tokens (batch x new tokens) over the wall time of
prefill + decoding.

Also recorded: the machine's load around each timed call (os.getloadavg, and
the share of all cores busy outside this process from /proc/stat), page faults
and system seconds (getrusage), and the XLA fp32 matmul peak with the matmul
floor of the work done: 2 x matmul params x (tokens processed), where the
cached run processes each prompt once and then one token per step, the
uncached run every prefix again (a decode step is memory-bound, so its
fraction of the floor is low by nature). Runs on the allocator every command
uses on CPU (--allocator tuned; tcmalloc or default: see machine_load.py).

Run: .venv/bin/python bench/generation.py [--preset llama_100m] [--batch 4]
       [--prompt_len 64] [--new_tokens 32]
Writes bench/results/generation.json. The machine may be shared: compare
figures only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine_load  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(model, tokens, lens, new_tokens: int, use_cache: bool) -> dict:
  from optconsist_jax.model import generate as gen  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  gen.greedy_decode(model, tokens, lens, new_tokens, eos_id=None,
                    use_cache=use_cache, chunk_size=new_tokens)
  compile_and_run = time.perf_counter() - t0
  with machine_load.Meter() as meter:
    out, lengths = gen.greedy_decode(model, tokens, lens, new_tokens,
                                     eos_id=None, use_cache=use_cache,
                                     chunk_size=new_tokens)
  seconds = meter.result["seconds"]
  generated = int(lengths.sum())
  assert generated == tokens.shape[0] * new_tokens
  return {"use_cache": use_cache, "seconds": seconds,
          "machine": {k: v for k, v in meter.result.items()
                      if k != "seconds"},
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
  p.add_argument("--allocator", choices=machine_load.ALLOCATORS,
                 default="tuned",
                 help="tuned: glibc kept from unmapping, as every command"
                 " runs on CPU (default); tcmalloc: preloaded (installed);"
                 " default: glibc's defaults")
  args = p.parse_args()
  allocator_used = machine_load.use_allocator(args.allocator)

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

  load_before = os.getloadavg()
  peak = machine_load.jax_matmul_peak()
  cached = run(model, tokens, lens, args.new_tokens, use_cache=True)
  full = run(model, tokens, lens, args.new_tokens, use_cache=False)
  same = cached.pop("tokens") == full.pop("tokens")
  # Matmul flops of the work each mode does (rows x positions through every
  # projection; attention over the short contexts is left out).
  b, p_len, n = args.batch, args.prompt_len, args.new_tokens
  matmul_params = (config.flops_per_token(1) - 12 * config.num_layers
                   * config.num_heads * config.head_dim) / 6
  positions = {True: p_len + n - 1,
               False: sum(p_len + i for i in range(n))}
  for r in (cached, full):
    flops = 2 * matmul_params * b * positions[r["use_cache"]]
    r["matmul_flops"] = flops
    r["jax_matmul_floor_s"] = flops / (peak["gflops"] * 1e9)
    r["fraction_of_matmul_floor"] = r["jax_matmul_floor_s"] / r["seconds"]
  result = {
      "command": "python " + " ".join(sys.argv),
      "preset": args.preset, "params": parameter_count(model),
      "batch": args.batch, "prompt_len": args.prompt_len,
      "prompt_lens": lens.tolist(), "new_tokens": args.new_tokens,
      "dtype": config.dtype,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
      "load_average_before": load_before,
      "load_average_after": os.getloadavg(),
      "ld_preload": os.environ.get("LD_PRELOAD", ""),
      "allocator": allocator_used,
      "jax_matmul_peak_gflops": peak["gflops"], "matmul_samples": peak,
      "note": ("tokens/s = generated tokens / wall time of the second"
               " (compiled) call; machine.other_load > 0.1 = other processes"
               " were busy (noisy)"),
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
          f" ({result[k]['seconds']:.2f} s,"
          f" {result[k]['fraction_of_matmul_floor']:.2f} of the matmul floor,"
          f" other load {result[k]['machine']['other_load']:.2f})")


if __name__ == "__main__":
  main()
