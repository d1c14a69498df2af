"""Tokens/s the data pipeline delivers on this CPU vs what a 7B step needs.

Measures, on synthetic MetaMathQA-format records with the shipped tiny
tokenizer (Llama-2's tokenizer.model is not available offline):
  * preparation: read + tokenize + pack, tokens/s (done once per run, cached);
  * iteration: packed [B, T] batches from the grain pipeline with 0 and 2
    worker processes, tokens/s (row slots B*T per second, and target tokens).
Requirement: a Llama-2-7B training step on a v5p-8 host (4 chips), from
6 * N flops per token, v5p peak 459 TFLOP/s bf16 per chip, assumed MFU 40%.

Run: .venv/bin/python bench/data_pipeline.py [--examples N] [--steps N]
Writes bench/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from absl import logging


def needed_tokens_per_s_per_host(chips_per_host: int = 4,
                                 peak_flops: float = 459e12,
                                 mfu: float = 0.40) -> dict:
  from optconsist_jax.model import preset  # pylint: disable=g-import-not-at-top
  n = preset("llama2_7b").num_params()
  per_chip = peak_flops * mfu / (6 * n)
  return {"model": "llama2_7b", "params": n, "flops_per_token": 6 * n,
          "peak_flops_per_chip_bf16": peak_flops, "mfu": mfu,
          "chips_per_host": chips_per_host,
          "tokens_per_s_per_chip": per_chip,
          "tokens_per_s_per_host": per_chip * chips_per_host,
          "arithmetic": (f"{peak_flops:.3g} * {mfu} / (6 * {n}) * "
                         f"{chips_per_host} chips")}


def iterate(config, store, steps: int) -> dict:
  from optconsist_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pl = pipeline.build_pipeline(config, store=store, process_index=0,
                               process_count=1)
  it = iter(pl)
  t0 = time.perf_counter()
  first = next(it)  # Includes worker start-up.
  t_first = time.perf_counter() - t0
  del first
  targets = 0.0
  t1 = time.perf_counter()
  for _ in range(steps):
    b = next(it)
    targets += float(b["weights"].sum())
  dt = time.perf_counter() - t1
  if hasattr(it, "close"):
    it.close()
  rows, t = b["inputs"].shape
  return {"num_workers": config.num_workers, "steps_timed": steps,
          "first_batch_s": t_first, "seconds": dt,
          "tokens_per_s": steps * rows * t / dt,
          "target_tokens_per_s": targets / dt,
          "batches_per_s": steps / dt}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--examples", type=int, default=20000)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "data_pipeline.json"))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  from optconsist_jax.data import pipeline, supervised  # pylint: disable=g-import-not-at-top

  config = pipeline.DataConfig(
      format="synthetic", synthetic_examples=args.examples,
      seq_len=args.seq_len, global_batch_size=args.batch, seed=0)
  tok = pipeline.load_tokenizer(config)
  t0 = time.perf_counter()
  records = pipeline.load_records(config)
  t_read = time.perf_counter() - t0
  t0 = time.perf_counter()
  store, stats = pipeline.tokenize_records(records, tok, args.seq_len + 1)
  t_tok = time.perf_counter() - t0
  t0 = time.perf_counter()
  rows = supervised.pack_rows(store.lengths, args.seq_len, seed=0)
  t_pack = time.perf_counter() - t0
  n_tokens = int(len(store.tokens))
  prep = {"examples": len(records), "tokens": n_tokens,
          "generate_s": t_read, "tokenize_s": t_tok, "pack_s": t_pack,
          "tokenize_tokens_per_s": n_tokens / t_tok,
          "pack_tokens_per_s": n_tokens / t_pack, "rows": len(rows),
          "fill": float((store.lengths - 1).sum() / (len(rows) * args.seq_len)),
          "truncation": stats.report()}
  runs = [iterate(config.replace(num_workers=w), store, args.steps)
          for w in (0, 2)]
  need = needed_tokens_per_s_per_host()
  for r in runs:
    r["times_needed_per_host"] = r["tokens_per_s"] / need["tokens_per_s_per_host"]
  result = {
      "command": "bench/data_pipeline.py " + " ".join(
          f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(),
                  "note": "2 cores shared with other jobs; figures are lower"
                          " bounds"},
      "seq_len": args.seq_len, "batch_rows": args.batch,
      "tokenizer": "tiny (2048 pieces, shipped)",
      "preparation": prep, "iteration": runs, "needed_7b_v5p8": need,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
