"""Train-step time with Muon vs AdamW on this CPU (~100M `llama_100m`).

One jitted step = forward + backward + clip + optimizer update, fp32, the
same batch for both optimizers (optim.presets.preset("adamw") / preset("muon"),
Muon on the q,k,v,o,gate,up,down kernels with 5 fp32 Newton-Schulz steps,
AdamW on the rest). Beside the measured times it prints the analytic
Newton-Schulz share of the step's flops: NS costs 4 m m n + 2 m m m per
iteration per m x n (m <= n) matrix, the step ~ 6 N T + attention
(LlamaConfig.flops_per_token). The share is also given for Llama-2-7B at the
Biderman et al. batch (768 x 1024 tokens), where NS is a small fraction.

Run: .venv/bin/python bench/muon_step.py [--batch 2 --seq 128 --iters 2]
Writes bench/results/muon_step.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optconsist_jax import optim
from optconsist_jax.model import Llama, preset
from optconsist_jax.model.config import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "muon_step.json")


def ns_flops(config: LlamaConfig, steps: int = 5) -> float:
  """Newton-Schulz flops of one Muon step over the hidden matrices."""
  d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
  shapes = ([(d, config.num_heads * h)] * 2 + [(d, config.num_kv_heads * h)] * 2
            + [(d, f)] * 3)
  per_layer = sum(4 * min(a, b) ** 2 * max(a, b) + 2 * min(a, b) ** 3
                  for a, b in shapes)
  return float(steps * per_layer * config.num_layers)


def share(config: LlamaConfig, tokens: int, seq: int) -> float:
  ns = ns_flops(config)
  return ns / (ns + config.flops_per_token(seq) * tokens)


def time_step(model_config, optim_config, batch, seq, warmup, iters):
  model = Llama(model_config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.build(optim_config, params)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, model_config.vocab_size,
                                    (batch, seq + 1)), jnp.int32)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.perf_counter()
  for _ in range(warmup):
    params, opt_state, loss = step(params, opt_state)
    loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  return {"step_s_median": statistics.median(times), "step_s": times,
          "warmup_s": compile_s, "final_loss": float(loss)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="llama_100m")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args()
  config = preset(args.preset)
  tokens = args.batch * args.seq
  results = {}
  for name in ("adamw", "muon"):
    cfg = optim.presets.preset(name, total_steps=100)
    results[name] = time_step(config, cfg, args.batch, args.seq, args.warmup,
                              args.iters)
    print(name, results[name], flush=True)
  seven_b = preset("llama2_7b")
  out = {
      "benchmark": "train step (fwd+bwd+update), Muon vs AdamW, fp32",
      "preset": args.preset, "params": config.num_params(),
      "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens,
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "jax": jax.__version__,
      "adamw": results["adamw"], "muon": results["muon"],
      "muon_over_adamw": (results["muon"]["step_s_median"]
                          / results["adamw"]["step_s_median"]),
      "ns_flops_per_step": ns_flops(config),
      "train_flops_per_step": config.flops_per_token(args.seq) * tokens,
      "ns_flop_share_analytic": share(config, tokens, args.seq),
      "llama2_7b_ns_flop_share_at_768x1024": share(seven_b, 768 * 1024, 1024),
      "command": "python bench/muon_step.py --preset {} --batch {} --seq {} "
                 "--warmup {} --iters {}".format(args.preset, args.batch,
                                                  args.seq, args.warmup,
                                                  args.iters),
  }
  os.makedirs(os.path.dirname(RESULT), exist_ok=True)
  with open(RESULT, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
